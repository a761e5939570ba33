//! Loop devices held by guards.
//!
//! Partition scanning creates no `/dev/loopNpM` nodes on some hosts (no udev, or a
//! kernel that does not scan), so a partition is always attached as its own loop
//! device with an offset and a size limit.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot attach {file} as a loop device (offset {offset}, size {size:?}): {source}")]
pub struct LoopError {
    file: PathBuf,
    offset: u64,
    size: Option<u64>,
    source: std::io::Error,
}

/// An attached loop device; detached when dropped. Autoclear is set too, so the
/// kernel frees it as soon as the last user closes it even if we are killed.
pub struct LoopDevice {
    device: loopdev::LoopDevice,
    path: PathBuf,
    attached: bool,
    ticket: Option<crate::journal::Ticket>,
}

impl LoopDevice {
    /// Attaches `file` from `offset` for `size` bytes (the rest of the file when `None`).
    pub fn attach(
        file: &Path,
        offset: u64,
        size: Option<u64>,
        read_only: bool,
    ) -> Result<LoopDevice, LoopError> {
        let err = |source| LoopError {
            file: file.to_owned(),
            offset,
            size,
            source,
        };
        let ticket = crate::journal::acquire(crate::journal::Resource::Loop {
            backing: crate::host::fsutil::absolute(file),
            offset,
        });
        let attach_once = || {
            let control = loopdev::LoopControl::open()?;
            let device = control.next_free()?;
            let mut attach = device
                .with()
                .offset(offset)
                .autoclear(true)
                .read_only(read_only);
            if let Some(s) = size {
                attach = attach.size_limit(s);
            }
            attach.attach(file)?;
            let path = device
                .path()
                .ok_or_else(|| std::io::Error::other("loop device has no path"))?;
            Ok::<_, std::io::Error>((device, path))
        };
        // "Next free" and "attach" are two steps: another process may take the same
        // device in between (EBUSY). Ask again for a free one.
        let mut attached = attach_once();
        for _ in 0..20 {
            match &attached {
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    attached = attach_once();
                }
                _ => break,
            }
        }
        let attached = attached.map_err(err);
        let (device, path) = match attached {
            Ok(v) => v,
            Err(e) => {
                crate::journal::release(ticket);
                return Err(e);
            }
        };
        tracing::debug!(
            "attached {} at offset {offset} as {}",
            file.display(),
            path.display()
        );
        Ok(LoopDevice {
            device,
            path,
            attached: true,
            ticket,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detaches now, reporting failure.
    pub fn detach(mut self) -> std::io::Result<()> {
        self.attached = false;
        self.device.detach()?;
        crate::journal::release(self.ticket.take());
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = self.device.detach() {
                // With autoclear set the kernel still frees it when the last opener closes.
                tracing::warn!("could not detach {}: {e}", self.path.display());
            } else {
                tracing::debug!("detached {}", self.path.display());
                crate::journal::release(self.ticket.take());
            }
        }
    }
}
