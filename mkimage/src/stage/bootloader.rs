//! Stage `bootloader`: GRUB's runtime files and our own `grub.cfg` inside the image,
//! and the fstab that names the root filesystem by UUID.
//!
//! We write grub.cfg ourselves: `grub-mkconfig` emits no entries when / sits on a
//! loop device, and a build needs no loop device at all (see `assemble`).

use super::{Ctx, StageOps, StageResult};
use crate::recipe::{Cloud, Hypervisor};
use serde_json::json;
use std::path::Path;

/// Where the host's grub-pc-bin keeps the i386-pc (BIOS) platform files.
pub const GRUB_PC_DIR: &str = "/usr/lib/grub/i386-pc";

/// Packages the disk layouts need in the image (installed with the base, see
/// `plan::hoisted_packages`): `sfdisk`, for the growroot script.
pub const PACKAGES: &[&str] = &["fdisk"];

/// Grows the root partition to the end of its disk, then the ext4 filesystem in it,
/// online. A cloud usually gives an instance a larger disk than the image (and an
/// `--optimize` image is sized to its tree plus a little headroom), so without this
/// the extra space would be unusable. Runs at every boot and does nothing once the
/// partition reaches the end of the disk. MBR entries count sectors in 32 bits: the
/// partition stops at 2 TiB.
const GROWROOT_SCRIPT: &str = r#"#!/bin/sh
# written by mkimage: grow the root partition and its filesystem to the end of the disk
set -eu
say() { echo "mkimage-growroot: $*"; }
part=$(basename "$(readlink -f "$(findmnt -n -o SOURCE /)")")
sys=/sys/class/block/$part
if [ ! -r "$sys/partition" ]; then say "/ is not on a partition; nothing to grow"; exit 0; fi
command -v sfdisk >/dev/null || { say "no sfdisk in the image; not growing"; exit 0; }
n=$(cat "$sys/partition")
disk=$(basename "$(readlink -f "$sys/..")")
start=$(cat "$sys/start")
size=$(cat "$sys/size")
want=$(( $(cat "/sys/class/block/$disk/size") - start ))
[ "$want" -le 4294967295 ] || want=4294967295
# Less than 1 MiB to gain (alignment, or already grown): leave the table alone.
if [ $(( want - size )) -lt 2048 ]; then exit 0; fi
say "growing /dev/$disk partition $n from $size to $want sectors"
echo ",$want" | sfdisk --force --no-reread --no-tell-kernel -q -N "$n" "/dev/$disk"
# The kernel keeps the old size of a partition in use until told (BLKPG).
partx --update --nr "$n" "/dev/$disk"
resize2fs "/dev/$part"
say "/ is now $(df -m --output=size / | tail -n 1 | tr -d ' ') MiB"
"#;

const GROWROOT_UNIT: &str = "[Unit]
Description=Grow the root partition and filesystem to the end of the disk
After=systemd-remount-fs.service local-fs.target
ConditionVirtualization=!container

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/mkimage-growroot
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

pub struct Bootloader {
    pub cloud: Cloud,
    pub hypervisor: Hypervisor,
    pub dist: String,
}

impl Bootloader {
    /// Kernel consoles: serial always; Xen's hvc0 on EC2 so the console log works
    /// on Xen instances (the last one named becomes /dev/console).
    fn consoles(&self) -> &'static str {
        match (self.cloud, self.hypervisor) {
            (Cloud::Ec2, _) | (_, Hypervisor::Xen) => {
                "console=tty0 console=hvc0 console=ttyS0,115200n8"
            }
            _ => "console=tty0 console=ttyS0,115200n8",
        }
    }

    pub fn grub_cfg(&self, uuid: &str, kver: &str) -> String {
        format!(
            "# written by mkimage\n\
             serial --unit=0 --speed=115200\n\
             terminal_input serial console\n\
             terminal_output serial console\n\
             set default=0\n\
             set timeout=0\n\
             insmod part_msdos\n\
             insmod ext2\n\
             search --no-floppy --fs-uuid --set=root {uuid}\n\
             menuentry 'Debian GNU/Linux {dist} ({kver})' {{\n\
             \tlinux /boot/vmlinuz-{kver} root=UUID={uuid} ro {consoles} net.ifnames=0\n\
             \tinitrd /boot/initrd.img-{kver}\n\
             }}\n",
            dist = self.dist,
            consoles = self.consoles(),
        )
    }

    /// Legacy GRUB menu for EC2 paravirtual instances (PV-GRUB reads menu.lst).
    pub fn menu_lst(&self, uuid: &str, kver: &str) -> String {
        format!(
            "# written by mkimage, for PV-GRUB on paravirtual instances\n\
             default 0\n\
             timeout 0\n\n\
             title Debian GNU/Linux {dist} ({kver})\n\
             root (hd0,0)\n\
             kernel /boot/vmlinuz-{kver} root=UUID={uuid} ro console=hvc0\n\
             initrd /boot/initrd.img-{kver}\n",
            dist = self.dist
        )
    }
}

impl StageOps for Bootloader {
    fn name(&self) -> String {
        "bootloader".into()
    }

    fn describe(&self) -> String {
        let extra = if self.cloud == Cloud::Ec2 {
            " + PV-GRUB menu.lst"
        } else {
            ""
        };
        format!("GRUB (BIOS) files, grub.cfg and fstab by UUID{extra}")
    }

    fn inputs(&self) -> serde_json::Value {
        json!({
            "cloud": self.cloud,
            "hypervisor": self.hypervisor,
            "consoles": self.consoles(),
            "growroot": [GROWROOT_SCRIPT, GROWROOT_UNIT],
        })
    }

    fn check(&self, _ctx: &Ctx) -> StageResult {
        for f in ["boot.img", "normal.mod", "moddep.lst"] {
            if !Path::new(GRUB_PC_DIR).join(f).exists() {
                anyhow::bail!(
                    "{GRUB_PC_DIR}/{f} is missing: install the Debian package `grub-pc-bin`"
                );
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let kver = match &ctx.kernel_version {
            Some(k) => k.clone(),
            None => super::kernel::installed_kernel_version(&ctx.rootfs)
                .ok_or_else(|| anyhow::anyhow!("no kernel in the image's /boot"))?,
        };
        let dest = ctx.root_path("boot/grub/i386-pc");
        std::fs::create_dir_all(&dest)?;
        for e in std::fs::read_dir(GRUB_PC_DIR)?.flatten() {
            let name = e.file_name();
            let n = name.to_string_lossy();
            if n.ends_with(".mod") || n.ends_with(".lst") {
                std::fs::copy(e.path(), dest.join(&name))?;
            }
        }
        let uuid = ctx.fs_uuid.clone();
        ctx.write_file("boot/grub/grub.cfg", &self.grub_cfg(&uuid, &kver))?;
        if self.cloud == Cloud::Ec2 {
            ctx.write_file("boot/grub/menu.lst", &self.menu_lst(&uuid, &kver))?;
        }
        ctx.write_file(
            "etc/fstab",
            &format!("# <file system> <mount point> <type> <options> <dump> <pass>\nUUID={uuid} / ext4 defaults,errors=remount-ro 0 1\n"),
        )?;
        install_growroot(ctx)?;
        super::fail_point("bootloader")?;
        Ok(())
    }
}

/// The growroot script and its unit, enabled (a symlink: no chroot needed).
fn install_growroot(ctx: &Ctx) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let script = "usr/local/sbin/mkimage-growroot";
    ctx.write_file(script, GROWROOT_SCRIPT)?;
    std::fs::set_permissions(
        ctx.root_path(script),
        std::fs::Permissions::from_mode(0o755),
    )?;
    ctx.write_file("etc/systemd/system/mkimage-growroot.service", GROWROOT_UNIT)?;
    let wants = ctx.root_path("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("mkimage-growroot.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/etc/systemd/system/mkimage-growroot.service", &link)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_names_root_by_uuid_and_serial_console() {
        let b = Bootloader {
            cloud: Cloud::Openstack,
            hypervisor: Hypervisor::Kvm,
            dist: "bookworm".into(),
        };
        let cfg = b.grub_cfg("1234-abcd", "6.1.0-1-cloud-amd64");
        assert!(cfg.contains("root=UUID=1234-abcd ro"));
        assert!(cfg.contains("search --no-floppy --fs-uuid --set=root 1234-abcd"));
        assert!(cfg.contains("console=ttyS0,115200n8"));
        assert!(cfg.contains("linux /boot/vmlinuz-6.1.0-1-cloud-amd64"));
        assert!(!cfg.contains("hvc0"));
    }

    #[test]
    fn ec2_gets_xen_console_and_uuid_menu_lst() {
        let b = Bootloader {
            cloud: Cloud::Ec2,
            hypervisor: Hypervisor::Xen,
            dist: "bookworm".into(),
        };
        assert!(b.grub_cfg("u", "k").contains("console=hvc0"));
        let m = b.menu_lst("u-1", "k1");
        assert!(m.contains("root=UUID=u-1"));
        assert!(!m.contains("xvda1"));
    }
}
