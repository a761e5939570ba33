//! Stage `kernel`: the kernel and its initramfs.
//!
//! The kernel's packages are normally installed by the `debootstrap` stage, in the same
//! apt transaction as the base (one download, one dpkg run), with `update-initramfs`
//! diverted; this stage puts `update-initramfs` back and makes the initramfs once. A
//! tree without the kernel (a base from elsewhere) gets it installed here with apt.

use super::{Ctx, StageOps, StageResult};
use crate::host::ChrootSession;
use serde_json::json;

/// The storage drivers an image's initramfs carries (with their dependencies): those
/// of the hypervisors and clouds images are made for — QEMU/KVM and OpenStack
/// (virtio, IDE/SATA), Xen and older EC2 (blkfront), EC2 Nitro (NVMe), VirtualBox
/// (AHCI, PIIX), VMware (PVSCSI, LSI) and Hyper-V. initramfs-tools' default (`most`)
/// copies every storage driver there is: 15 MiB and 6.4 s here, against 6 MiB and
/// 1.8 s for this list. Drivers built into the kernel are skipped by modprobe.
pub const INITRAMFS_MODULES: &[&str] = &[
    "ext4",
    "crc32c_generic",
    "crc32c-intel",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "sr_mod",
    "xen-blkfront",
    "nvme",
    "ahci",
    "ata_piix",
    "ata_generic",
    "vmw_pvscsi",
    "mptspi",
    "hv_storvsc",
    // Not storage: the host's entropy, early, so first-boot key generation never waits.
    "virtio-rng",
];

/// initramfs-tools configuration: only the modules [`INITRAMFS_MODULES`] names.
const INITRAMFS_CONF: &str =
    "# mkimage: storage drivers come from hooks/mkimage-storage\nMODULES=list\n";

fn initramfs_hook() -> String {
    format!(
        "#!/bin/sh\n\
         # mkimage: the storage drivers of the hypervisors and clouds this image is for.\n\
         [ \"$1\" = prereqs ] && exit 0\n\
         . /usr/share/initramfs-tools/hook-functions\n\
         manual_add_modules {}\n",
        INITRAMFS_MODULES.join(" ")
    )
}

pub struct Kernel {
    pub package: String,
}

/// The newest kernel version present in the image's /boot.
pub fn installed_kernel_version(root: &std::path::Path) -> Option<String> {
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .collect();
    versions.sort();
    versions.pop()
}

impl StageOps for Kernel {
    fn name(&self) -> String {
        "kernel".into()
    }

    fn describe(&self) -> String {
        format!("{} and its initramfs (made once)", self.package)
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "package": self.package, "initramfs_modules": INITRAMFS_MODULES })
    }

    /// The kernel install is the slowest step after the base: caching the tree after
    /// it makes rebuilds that change only later stages skip both.
    fn cacheable(&self) -> bool {
        true
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point("kernel")?;
        let wanted = [self.package.clone(), "initramfs-tools".into()];
        let missing = crate::build::missing_packages(&ctx.rootfs, &wanted);
        if !missing.is_empty() {
            chroot.cmd("apt-get").args(["-q", "update"]).run()?;
            chroot.apt_install(&missing)?;
        }
        let diverted = ctx.root_path(
            crate::stage::debootstrap::DIVERTED_UPDATE_INITRAMFS.trim_start_matches('/'),
        );
        if diverted.exists() {
            std::fs::remove_file(ctx.root_path("usr/sbin/update-initramfs"))?;
            chroot
                .cmd("dpkg-divert")
                .args(["--quiet", "--local", "--rename", "--remove"])
                .arg("/usr/sbin/update-initramfs")
                .run()?;
        }
        let version = installed_kernel_version(&ctx.rootfs).ok_or_else(|| {
            anyhow::anyhow!(
                "no /boot/vmlinuz-* in the image after installing {}",
                self.package
            )
        })?;
        ctx.write_file("etc/initramfs-tools/conf.d/mkimage.conf", INITRAMFS_CONF)?;
        let hook = "etc/initramfs-tools/hooks/mkimage-storage";
        ctx.write_file(hook, &initramfs_hook())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ctx.root_path(hook), std::fs::Permissions::from_mode(0o755))?;
        let made = ctx
            .root_path(&format!("boot/initrd.img-{version}"))
            .exists();
        chroot
            .cmd("update-initramfs")
            .args([if made { "-u" } else { "-c" }, "-k", &version])
            .run()?;
        chroot.exit()?;
        if !ctx
            .root_path(&format!("boot/initrd.img-{version}"))
            .exists()
        {
            anyhow::bail!("the kernel {version} was installed but no initrd was generated");
        }
        tracing::info!("kernel {version}");
        ctx.kernel_version = Some(version);
        Ok(())
    }
}
