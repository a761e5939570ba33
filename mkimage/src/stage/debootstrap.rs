//! Stage `debootstrap`: the base Debian tree, from the recipe's mirror.
//!
//! The default engine is mmdebstrap (it runs dpkg with unsafe I/O and is about 3x
//! faster here than debootstrap); debootstrap is the fallback when mmdebstrap is
//! missing. The result is cached by the build driver under a key made of suite,
//! architecture, mirror, variant and package set.

use super::{Ctx, StageOps, StageResult};
use crate::host::{fsutil, Cmd};
use serde_json::json;

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
    pub packages: Vec<String>,
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
        let target = &ctx.rootfs;
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
            c.arg(&self.dist)
                .arg(target)
                .arg(format!("deb {} {} main", self.mirror, self.dist))
                .run()?;
        } else {
            let mut c = Cmd::new("debootstrap")
                .arg(format!("--variant={}", self.variant))
                .arg(format!("--arch={}", self.arch));
            if !include.is_empty() {
                c = c.arg(format!("--include={include}"));
            }
            c.arg(&self.dist).arg(target).arg(&self.mirror).run()?;
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
