//! Stage `assemble`: the bootable raw disk, made without a loop device or a mount.
//!
//! 1. a sparse file of the recipe's size with an MBR holding one bootable Linux
//!    partition from 1 MiB to the end (`sfdisk` on the file);
//! 2. the ext4 root filesystem written straight into the partition's byte range
//!    from the image tree (`mkfs.ext4 -E offset=… -d ROOTFS`);
//! 3. GRUB's boot sector code into the MBR (first 440 bytes, the partition table is
//!    kept) and a core image, built for exactly this disk, into the gap before the
//!    partition.

use super::bootloader::GRUB_PC_DIR;
use super::{Ctx, StageOps, StageResult};
use crate::host::Cmd;
use serde_json::json;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

pub const PART_OFFSET: u64 = 1024 * 1024;
const MBR_CODE_LEN: usize = 440;

pub struct Assemble {
    pub size_mib: u64,
}

impl StageOps for Assemble {
    fn name(&self) -> String {
        "assemble".into()
    }

    fn describe(&self) -> String {
        format!(
            "{} MiB raw disk: MBR, ext4 root from 1 MiB (mkfs -d), GRUB in the MBR gap",
            self.size_mib
        )
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "size_mib": self.size_mib, "part_offset": PART_OFFSET, "fs": "ext4" })
    }

    fn check(&self, _ctx: &Ctx) -> StageResult {
        for tool in ["sfdisk", "mkfs.ext4", "grub-mkimage"] {
            if crate::host::fsutil::which(tool).is_none() {
                let pkg = crate::host::fsutil::package_for_tool(tool).unwrap_or(tool);
                anyhow::bail!("`{tool}` is not installed (Debian package `{pkg}`)");
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let disk = ctx
            .disk
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no output path for the disk image"))?;
        let total = ctx.disk_size_mib.unwrap_or(self.size_mib) * 1024 * 1024;
        let need = crate::host::fsutil::tree_size(&ctx.rootfs);
        if need + need / 10 + 64 * 1024 * 1024 > total {
            anyhow::bail!(
                "the image tree needs about {} MiB but the disk is {} MiB: raise `size`",
                need / 1024 / 1024 + need / 10 / 1024 / 1024 + 64,
                total >> 20
            );
        }
        create_sparse(&disk, total)?;
        Cmd::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(&disk)
            .stdin_bytes(format!(
                "label: dos\nstart={}, type=83, bootable\n",
                PART_OFFSET / 512
            ))
            .run()?;
        let fs_kib = (total - PART_OFFSET) / 1024;
        Cmd::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-U", &ctx.fs_uuid])
            .arg("-E")
            .arg(format!("offset={PART_OFFSET},{LAZY_JOURNAL}"))
            .arg("-d")
            .arg(&ctx.rootfs)
            .arg(&disk)
            .arg(format!("{fs_kib}k"))
            .run()?;
        super::fail_point("assemble")?;
        install_grub(&disk, &ctx.fs_uuid, &ctx.work)?;
        // A read-only full check of what was just written, before it can become output.
        Cmd::new("e2fsck")
            .args(["-f", "-n"])
            .arg(format!("{}?offset={PART_OFFSET}", disk.display()))
            .run()?;
        Ok(())
    }
}

/// The journal of a new filesystem in a new sparse file is already zeros: writing them
/// (mke2fs's default) only allocates 32–64 MiB of the image for nothing. Journal
/// recovery stops at the first block that is not a valid descriptor of the expected
/// sequence, so blocks never written are safe to leave as holes.
pub const LAZY_JOURNAL: &str = "lazy_journal_init=1";

pub fn create_sparse(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    f.set_len(size)
}

/// Writes GRUB's MBR code and a core image that finds the root filesystem by UUID.
pub fn install_grub(disk: &Path, uuid: &str, work: &Path) -> anyhow::Result<()> {
    let early = work.join("grub-early.cfg");
    std::fs::write(
        &early,
        format!("search.fs_uuid {uuid} root\nset prefix=($root)/boot/grub\n"),
    )?;
    let core = work.join("core.img");
    Cmd::new("grub-mkimage")
        .args(["-O", "i386-pc", "-d", GRUB_PC_DIR, "-o"])
        .arg(&core)
        .arg("-c")
        .arg(&early)
        .args([
            "-p",
            "/boot/grub",
            "biosdisk",
            "part_msdos",
            "ext2",
            "search_fs_uuid",
        ])
        .run()?;
    let core_bytes = std::fs::read(&core)?;
    if core_bytes.len() as u64 > PART_OFFSET - 512 {
        anyhow::bail!(
            "GRUB core image is {} bytes, larger than the gap before the partition",
            core_bytes.len()
        );
    }
    let boot = std::fs::read(Path::new(GRUB_PC_DIR).join("boot.img"))?;
    if boot.len() < MBR_CODE_LEN {
        anyhow::bail!("{GRUB_PC_DIR}/boot.img is too short");
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
    // Only the code area: bytes 440.. hold the disk signature and partition table.
    f.write_all(&boot[..MBR_CODE_LEN])?;
    f.seek(SeekFrom::Start(512))?;
    f.write_all(&core_bytes)?;
    f.sync_all()?;
    Ok(())
}
