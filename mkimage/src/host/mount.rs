//! Mounts held by guards.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("cannot mount {what} on {target}: {source}")]
pub struct MountError {
    what: String,
    target: PathBuf,
    source: nix::Error,
}

/// A mounted filesystem, unmounted (non-recursively) when dropped.
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
    active: bool,
    ticket: Option<crate::journal::Ticket>,
}

fn journal(target: &Path) -> Option<crate::journal::Ticket> {
    crate::journal::acquire(crate::journal::Resource::Mount {
        target: crate::host::fsutil::absolute(target),
    })
}

impl MountGuard {
    /// Mounts `source` of type `fstype` on `target`.
    pub fn mount(
        source: &Path,
        target: &Path,
        fstype: &str,
        options: Option<&str>,
    ) -> Result<MountGuard, MountError> {
        let ticket = journal(target);
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::empty(),
            options,
        )
        .map_err(|e| {
            crate::journal::release(ticket);
            MountError {
                what: format!("{} ({fstype})", source.display()),
                target: target.to_owned(),
                source: e,
            }
        })?;
        tracing::debug!("mounted {} on {}", source.display(), target.display());
        Ok(MountGuard {
            target: target.to_owned(),
            active: true,
            ticket,
        })
    }

    /// Bind-mounts `source` on `target`. Deliberately not recursive (no MS_REC): a
    /// recursive bind of the host's /dev would make a later recursive unmount reach
    /// into the host's own mounts.
    pub fn bind(source: &Path, target: &Path) -> Result<MountGuard, MountError> {
        let ticket = journal(target);
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            crate::journal::release(ticket);
            MountError {
                what: format!("bind of {}", source.display()),
                target: target.to_owned(),
                source: e,
            }
        })?;
        // Keep mount events inside from propagating back to the host.
        let _ = mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        );
        tracing::debug!("bound {} on {}", source.display(), target.display());
        Ok(MountGuard {
            target: target.to_owned(),
            active: true,
            ticket,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure (Drop does the same but can only log).
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.active = false;
        unmount(&self.target)?;
        crate::journal::release(self.ticket.take());
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.active {
            match unmount(&self.target) {
                Ok(()) => crate::journal::release(self.ticket.take()),
                Err(e) => tracing::error!("could not unmount {}: {e}", self.target.display()),
            }
        }
    }
}

/// Unmounts one mount point (never recursively). Busy mounts are retried for a few
/// seconds (a process in the chroot may still be exiting), then detached lazily.
pub fn unmount(target: &Path) -> std::io::Result<()> {
    for attempt in 0..20 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => {
                tracing::debug!("unmounted {}", target.display());
                return Ok(());
            }
            Err(nix::Error::EBUSY) if attempt < 19 => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()), // not mounted
            Err(nix::Error::EBUSY) => break,
            Err(e) => return Err(std::io::Error::from(e)),
        }
    }
    tracing::warn!("{} stays busy; detaching it lazily", target.display());
    umount2(target, MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}
