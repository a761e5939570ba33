//! A chroot session: the bind mounts and policy files a package install needs,
//! undone in reverse order when the session is dropped.

use super::cmd::{Cmd, CmdError};
use super::mount::{MountError, MountGuard};
use std::path::{Path, PathBuf};

/// Stops maintainer scripts from starting daemons inside the image during installs.
const POLICY_RC_D: &str =
    "#!/bin/sh\n# installed by mkimage for the duration of a build step\nexit 101\n";

#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot prepare the chroot at {root}: {source}")]
    Io {
        root: PathBuf,
        source: std::io::Error,
    },
}

pub struct ChrootSession {
    root: PathBuf,
    // Declared in acquisition order; Drop unmounts them in reverse.
    mounts: Vec<MountGuard>,
    restore_resolv: Option<Restore>,
    policy_installed: bool,
}

/// How to put /etc/resolv.conf back the way the image had it.
enum Restore {
    Symlink(PathBuf),
    File(Vec<u8>),
    Absent,
}

impl ChrootSession {
    /// Binds /dev, /dev/pts, mounts /proc and /sys, installs policy-rc.d and the
    /// host's resolv.conf (so apt can resolve the mirror).
    pub fn enter(root: &Path) -> Result<ChrootSession, ChrootError> {
        let io = |source| ChrootError::Io {
            root: root.to_owned(),
            source,
        };
        let mut s = ChrootSession {
            root: root.to_owned(),
            mounts: Vec::new(),
            restore_resolv: None,
            policy_installed: false,
        };
        // An image's tree is not trusted: a symlink where a mount point, policy-rc.d
        // or resolv.conf belongs would make us mount or write on the host.
        for d in ["dev", "dev/pts", "proc", "sys", "etc", "usr/sbin"] {
            let p = root.join(d);
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                if !m.is_dir() {
                    return Err(io(std::io::Error::other(format!(
                        "{} is not a real directory (symlink?): refusing to use it",
                        p.display()
                    ))));
                }
            }
            std::fs::create_dir_all(&p).map_err(io)?;
        }
        s.mounts
            .push(MountGuard::bind(Path::new("/dev"), &root.join("dev"))?);
        s.mounts.push(MountGuard::bind(
            Path::new("/dev/pts"),
            &root.join("dev/pts"),
        )?);
        s.mounts.push(MountGuard::mount(
            Path::new("proc"),
            &root.join("proc"),
            "proc",
            None,
        )?);
        s.mounts.push(MountGuard::mount(
            Path::new("sysfs"),
            &root.join("sys"),
            "sysfs",
            None,
        )?);

        let policy = root.join("usr/sbin/policy-rc.d");
        if std::fs::symlink_metadata(&policy).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io(std::io::Error::other(format!(
                "{} is a symlink: refusing to write through it",
                policy.display()
            ))));
        }
        if !policy.exists() {
            std::fs::create_dir_all(policy.parent().unwrap()).map_err(io)?;
            std::fs::write(&policy, POLICY_RC_D).map_err(io)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755))
                .map_err(io)?;
            s.policy_installed = true;
        }

        let resolv = root.join("etc/resolv.conf");
        let restore = match std::fs::symlink_metadata(&resolv) {
            Ok(m) if m.file_type().is_symlink() => {
                Restore::Symlink(std::fs::read_link(&resolv).map_err(io)?)
            }
            Ok(_) => Restore::File(std::fs::read(&resolv).map_err(io)?),
            Err(_) => Restore::Absent,
        };
        if let Ok(host) = std::fs::read("/etc/resolv.conf") {
            let _ = std::fs::remove_file(&resolv);
            std::fs::write(&resolv, host).map_err(io)?;
            s.restore_resolv = Some(restore);
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A command run inside the chroot with a clean, non-interactive environment.
    pub fn cmd(&self, program: &str) -> Cmd {
        Cmd::new("chroot")
            .arg(&self.root)
            .arg("/usr/bin/env")
            .arg("-i")
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .arg("LC_ALL=C.UTF-8")
            .arg("HOME=/root")
            .arg(program)
    }

    /// `apt-get install -y --no-install-recommends PACKAGES` inside the chroot.
    pub fn apt_install(&self, packages: &[String]) -> Result<(), CmdError> {
        if packages.is_empty() {
            return Ok(());
        }
        self.cmd("apt-get")
            .args([
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "Dpkg::Use-Pty=0",
                // The tree is synced once, when the image is written: dpkg's fsync per
                // file only slows the install down (as mmdebstrap does for the base).
                "-o",
                "Dpkg::Options::=--force-unsafe-io",
                "install",
            ])
            .args(packages)
            .run()
    }

    /// Ends the session now, reporting the first failure.
    pub fn exit(mut self) -> Result<(), std::io::Error> {
        self.release()
    }

    fn release(&mut self) -> Result<(), std::io::Error> {
        let mut first_err = None;
        if let Some(r) = self.restore_resolv.take() {
            let resolv = self.root.join("etc/resolv.conf");
            let _ = std::fs::remove_file(&resolv);
            let res = match r {
                Restore::Symlink(t) => std::os::unix::fs::symlink(t, &resolv),
                Restore::File(b) => std::fs::write(&resolv, b),
                Restore::Absent => Ok(()),
            };
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        if self.policy_installed {
            self.policy_installed = false;
            if let Err(e) = std::fs::remove_file(self.root.join("usr/sbin/policy-rc.d")) {
                first_err.get_or_insert(e);
            }
        }
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.unmount() {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for ChrootSession {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!("cleaning up the chroot at {}: {e}", self.root.display());
        }
    }
}
