//! Stage `debootstrap`: the base Debian tree, from the recipe's mirror.
//!
//! The default engine is mmdebstrap (it runs dpkg with unsafe I/O and is about 3x
//! faster here than debootstrap); debootstrap is the fallback when mmdebstrap is
//! missing. The result is cached by the build driver under a key made of suite,
//! architecture, mirror, variant and package set.

use super::{Ctx, StageOps, StageResult};
use crate::host::{fsutil, ChrootSession, Cmd};
use serde_json::json;
use std::path::Path;

/// Packages every image needs on top of minbase: an init, device manager, locales,
/// and what the network configuration and GRUB runtime rely on.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "locales",
    "iproute2",
    "ca-certificates",
    "kmod",
];

pub struct Debootstrap {
    pub dist: String,
    pub arch: String,
    pub mirror: String,
    pub variant: String,
    /// Every package the tree needs: the base set and those later stages hoist into
    /// this one apt transaction (the kernel's, the runtime's), see `plan::stages`.
    pub packages: Vec<String>,
    /// The kernel is among `packages`: divert `update-initramfs` while they install,
    /// so the initramfs is made once, by the `kernel` stage, instead of twice (once by
    /// the kernel's postinst and once more by the initramfs-tools trigger).
    pub defer_initramfs: bool,
}

/// mmdebstrap's hooks that run the bootstrap under eatmydata (Debian package `eatmydata`).
const EATMYDATA_HOOKS: &str = "/usr/share/mmdebstrap/hooks/eatmydata";

/// Where the real `update-initramfs` waits while a stub stands in for it.
pub const DIVERTED_UPDATE_INITRAMFS: &str = "/usr/sbin/update-initramfs.mkimage";

/// Shell run in the chroot at `$1` before the kernel's packages are unpacked.
fn divert_update_initramfs_hook() -> String {
    format!(
        "chroot \"$1\" dpkg-divert --quiet --local --rename --divert {DIVERTED_UPDATE_INITRAMFS} --add /usr/sbin/update-initramfs \
         && mkdir -p \"$1/usr/sbin\" \
         && printf '#!/bin/sh\\n# mkimage: the kernel stage makes the initramfs once\\nexit 0\\n' > \"$1/usr/sbin/update-initramfs\" \
         && chmod 755 \"$1/usr/sbin/update-initramfs\""
    )
}

impl Debootstrap {
    /// `MKIMAGE_BOOTSTRAP_ENGINE=debootstrap|mmdebstrap` forces one (the bench
    /// compares them); otherwise mmdebstrap when installed.
    pub fn engine() -> &'static str {
        match std::env::var("MKIMAGE_BOOTSTRAP_ENGINE").as_deref() {
            Ok("debootstrap") => return "debootstrap",
            Ok("mmdebstrap") => return "mmdebstrap",
            _ => {}
        }
        if fsutil::which("mmdebstrap").is_some() {
            "mmdebstrap"
        } else {
            "debootstrap"
        }
    }
}

impl StageOps for Debootstrap {
    fn name(&self) -> String {
        "debootstrap".into()
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} ({}, {} extra packages) from {}",
            Self::engine(),
            self.dist,
            self.arch,
            self.variant,
            self.packages.len(),
            self.mirror
        )
    }

    fn inputs(&self) -> serde_json::Value {
        // The engine is not part of the key: both produce the same package set.
        let mut pkgs = self.packages.clone();
        pkgs.sort();
        pkgs.dedup();
        json!({
            "suite": self.dist,
            "arch": self.arch,
            "mirror": self.mirror.trim_end_matches('/'),
            "variant": self.variant,
            "packages": pkgs,
            "defer_initramfs": self.defer_initramfs,
        })
    }

    fn cacheable(&self) -> bool {
        true
    }

    fn check(&self, _ctx: &Ctx) -> StageResult {
        if fsutil::which("mmdebstrap").is_none() && fsutil::which("debootstrap").is_none() {
            anyhow::bail!("neither mmdebstrap nor debootstrap is installed (Debian packages `mmdebstrap` or `debootstrap`)");
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let target = &ctx.rootfs.clone();
        if target.exists() {
            fsutil::remove_tree(target)?;
        }
        let include = self.packages.join(",");
        if Self::engine() == "mmdebstrap" {
            let mut c = Cmd::new("mmdebstrap")
                .arg(format!("--variant={}", self.variant))
                .arg(format!("--architectures={}", self.arch))
                .arg("--components=main")
                .arg("--mode=root")
                .arg("--dpkgopt=force-unsafe-io")
                .arg("--aptopt=Acquire::Retries \"3\"");
            if !include.is_empty() {
                c = c.arg(format!("--include={include}"));
            }
            if self.defer_initramfs {
                c = c.arg(format!(
                    "--essential-hook={}",
                    divert_update_initramfs_hook()
                ));
            }
            // What dpkg's unsafe I/O does not cover (apt, ldconfig, maintainer scripts)
            // stops syncing too: the tree is synced once, when the image is written.
            if Path::new(EATMYDATA_HOOKS).is_dir() && fsutil::which("eatmydata").is_some() {
                c = c.arg(format!("--hook-dir={EATMYDATA_HOOKS}"));
            }
            c.arg(&self.dist)
                .arg(target)
                .arg(format!("deb {} {} main", self.mirror, self.dist))
                .run()?;
        } else {
            // debootstrap has no hooks: the base first, then the rest with apt, the
            // initramfs diverted the same way.
            Cmd::new("debootstrap")
                .arg(format!("--variant={}", self.variant))
                .arg(format!("--arch={}", self.arch))
                .arg(&self.dist)
                .arg(target)
                .arg(&self.mirror)
                .run()?;
            ctx.write_file(
                "etc/apt/sources.list",
                &format!("deb {} {} main\n", self.mirror, self.dist),
            )?;
            if self.defer_initramfs {
                Cmd::new("sh")
                    .args(["-e", "-c", &divert_update_initramfs_hook(), "sh"])
                    .arg(target)
                    .run()?;
            }
            let chroot = ChrootSession::enter(target)?;
            chroot.cmd("apt-get").args(["-q", "update"]).run()?;
            chroot.apt_install(&self.packages)?;
            chroot.exit()?;
        }
        super::fail_point("debootstrap")?;
        // Both engines leave sources naming the mirror; make it explicit and the same.
        ctx.write_file(
            "etc/apt/sources.list",
            &format!("deb {} {} main\n", self.mirror, self.dist),
        )?;
        Ok(())
    }
}
