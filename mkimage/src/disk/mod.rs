//! Inspecting and resizing disk images without trusting them: the container format
//! (`qemu-img info`), the partition table (`sfdisk --json`), ext2/3/4 superblocks
//! (read straight from the file), and the `e2fsck`/`resize2fs` wrappers.
//!
//! Nothing here mounts anything; loop devices are the caller's business.

use crate::host::{Cmd, CmdError};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// What `qemu-img info` says about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `raw`, `qcow2`, `vmdk`, …
    pub format: String,
    /// Size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// Set when the image refers to another file (a qcow2 overlay).
    pub backing_file: Option<String>,
}

/// `qemu-img info --output=json FILE`.
pub fn image_info(path: &Path) -> anyhow::Result<ImageInfo> {
    let out = Cmd::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()?;
    parse_image_info(&out)
}

pub fn parse_image_info(json: &str) -> anyhow::Result<ImageInfo> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("qemu-img info printed no JSON: {e}"))?;
    let format = v["format"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("qemu-img info names no format"))?
        .to_owned();
    let virtual_size = v["virtual-size"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("qemu-img info gives no virtual size"))?;
    let backing_file = v["backing-filename"]
        .as_str()
        .or_else(|| v["full-backing-filename"].as_str())
        .map(str::to_owned);
    Ok(ImageInfo {
        format,
        virtual_size,
        backing_file,
    })
}

/// The fields of an ext2/3/4 superblock this crate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtSuperblock {
    pub label: String,
    pub block_size: u64,
    pub block_count: u64,
    /// `ext2`, `ext3` or `ext4`, judged by the feature flags.
    pub kind: &'static str,
}

impl ExtSuperblock {
    pub fn bytes(&self) -> u64 {
        self.block_size * self.block_count
    }
}

const EXT_MAGIC: u16 = 0xEF53;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const COMPAT_HAS_JOURNAL: u32 = 0x4;

/// Reads the ext superblock of a filesystem that starts `offset` bytes into `path`;
/// `None` when there is none (wrong magic, short file).
pub fn read_ext_superblock(path: &Path, offset: u64) -> std::io::Result<Option<ExtSuperblock>> {
    let mut f = std::fs::File::open(path)?;
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(offset + 1024))?;
    if let Err(e) = f.read_exact(&mut sb) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(parse_ext_superblock(&sb))
}

/// Parses the 1024 superblock bytes (found at byte 1024 of the filesystem).
pub fn parse_ext_superblock(sb: &[u8; 1024]) -> Option<ExtSuperblock> {
    let le16 = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if le16(0x38) != EXT_MAGIC {
        return None;
    }
    let log_block = le32(0x18);
    if log_block > 6 {
        return None;
    }
    let block_size = 1024u64 << log_block;
    let incompat = le32(0x60);
    let compat = le32(0x5C);
    let mut block_count = u64::from(le32(0x04));
    if incompat & INCOMPAT_64BIT != 0 {
        block_count |= u64::from(le32(0x150)) << 32;
    }
    let label_raw = &sb[0x78..0x88];
    let end = label_raw.iter().position(|&b| b == 0).unwrap_or(16);
    let label = String::from_utf8_lossy(&label_raw[..end]).into_owned();
    let kind = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT) != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Some(ExtSuperblock {
        label,
        block_size,
        block_count,
        kind,
    })
}

/// One entry of a partition table, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number as `sfdisk -N` wants it.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// MBR type byte (`83`) or GPT type GUID.
    pub part_type: String,
    /// GPT partition name, if any.
    pub name: Option<String>,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }

    /// A Linux data/root partition type (MBR 0x83, GPT Linux filesystem or x86-64 root).
    pub fn is_linux(&self) -> bool {
        let t = self.part_type.to_ascii_uppercase();
        matches!(
            t.as_str(),
            "83" | "0FC63DAF-8483-4772-8E79-3D69D8477DE4" | "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    /// `dos` or `gpt`.
    pub label: String,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
}

/// Reads the partition table of an image file with `sfdisk --json`; `None` when the
/// file has no recognised table.
pub fn partition_table(path: &Path) -> anyhow::Result<Option<PartitionTable>> {
    match Cmd::new("sfdisk").arg("--json").arg(path).output() {
        Ok(out) => parse_sfdisk_json(&out).map(Some),
        Err(CmdError::Failed { stderr_tail, .. })
            if stderr_tail
                .iter()
                .any(|l| l.contains("does not contain a recognized partition table")) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

pub fn parse_sfdisk_json(json: &str) -> anyhow::Result<PartitionTable> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| anyhow::anyhow!("sfdisk printed no JSON: {e}"))?;
    let t = &v["partitiontable"];
    let label = t["label"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("sfdisk names no label type"))?
        .to_owned();
    let sector_size = t["sectorsize"].as_u64().unwrap_or(512);
    let mut partitions = Vec::new();
    for p in t["partitions"].as_array().into_iter().flatten() {
        let node = p["node"].as_str().unwrap_or_default();
        let number = node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("cannot number partition `{node}`"))?;
        let start = p["start"].as_u64().unwrap_or(0) * sector_size;
        let size = p["size"].as_u64().unwrap_or(0) * sector_size;
        let part_type = match &p["type"] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        partitions.push(Partition {
            number,
            start,
            size,
            part_type,
            name: p["name"].as_str().map(str::to_owned),
        });
    }
    Ok(PartitionTable {
        label,
        sector_size,
        partitions,
    })
}

/// Where the root filesystem of an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The whole file is one filesystem (container images, the Raspberry Pi image).
    Bare { fs: ExtSuperblock },
    /// A partitioned disk; `root` indexes `table.partitions`.
    Partitioned {
        table: PartitionTable,
        root: usize,
        fs: ExtSuperblock,
    },
}

impl Layout {
    /// Byte offset and length of the root filesystem inside the file (`None`
    /// length: to the end of the file).
    pub fn root_range(&self) -> (u64, Option<u64>) {
        match self {
            Layout::Bare { .. } => (0, None),
            Layout::Partitioned { table, root, .. } => {
                let p = &table.partitions[*root];
                (p.start, Some(p.size))
            }
        }
    }

    pub fn root_fs(&self) -> &ExtSuperblock {
        match self {
            Layout::Bare { fs } | Layout::Partitioned { fs, .. } => fs,
        }
    }

    /// The root partition, if the image is partitioned.
    pub fn root_partition(&self) -> Option<&Partition> {
        match self {
            Layout::Bare { .. } => None,
            Layout::Partitioned { table, root, .. } => Some(&table.partitions[*root]),
        }
    }

    /// True when the root filesystem can grow into space added at the end of the file.
    pub fn root_is_last(&self) -> bool {
        match self {
            Layout::Bare { .. } => true,
            Layout::Partitioned { table, root, .. } => {
                let r = &table.partitions[*root];
                table.partitions.iter().all(|p| p.end() <= r.end())
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Layout::Bare { fs } => format!("bare {} filesystem (label `{}`)", fs.kind, fs.label),
            Layout::Partitioned { table, fs, .. } => {
                let p = self.root_partition().expect("partitioned");
                format!(
                    "{} partition table, root is partition {} ({} at {} MiB, label `{}`)",
                    table.label,
                    p.number,
                    fs.kind,
                    p.start / 1024 / 1024,
                    fs.label
                )
            }
        }
    }
}

/// Finds the root filesystem of a raw image: the whole file if it is an ext
/// filesystem, else the ext partition labelled `root`, else the largest Linux
/// partition holding an ext filesystem.
pub fn detect_layout(path: &Path) -> anyhow::Result<Layout> {
    // The table first: a disk's boot code may sit where a bare superblock would.
    let Some(table) = partition_table(path)? else {
        return match read_ext_superblock(path, 0)? {
            Some(fs) => Ok(Layout::Bare { fs }),
            None => Err(anyhow::anyhow!(
                "{} has neither a partition table nor an ext2/3/4 filesystem",
                path.display()
            )),
        };
    };
    let mut candidates = Vec::new();
    for (i, p) in table.partitions.iter().enumerate() {
        if let Some(fs) = read_ext_superblock(path, p.start)? {
            candidates.push((i, fs));
        }
    }
    let pick = pick_root(&table, &candidates).ok_or_else(|| {
        anyhow::anyhow!(
            "no partition of {} holds an ext2/3/4 filesystem",
            path.display()
        )
    })?;
    let (root, fs) = candidates[pick].clone();
    Ok(Layout::Partitioned { table, root, fs })
}

/// Index into `candidates` of the root partition.
fn pick_root(table: &PartitionTable, candidates: &[(usize, ExtSuperblock)]) -> Option<usize> {
    let labelled = |n: &str| {
        candidates
            .iter()
            .position(|(i, fs)| fs.label == n || table.partitions[*i].name.as_deref() == Some(n))
    };
    labelled("root")
        .or_else(|| labelled("cloudimg-rootfs"))
        .or_else(|| {
            candidates
                .iter()
                .enumerate()
                .filter(|(_, (i, _))| table.partitions[*i].is_linux())
                .max_by_key(|(_, (i, _))| table.partitions[*i].size)
                .map(|(k, _)| k)
        })
        .or_else(|| {
            candidates
                .iter()
                .enumerate()
                .max_by_key(|(_, (i, _))| table.partitions[*i].size)
                .map(|(k, _)| k)
        })
}

/// Extends partition `number` of the raw image `path` to the end of the file (the
/// file must already have its new size). For GPT the backup header is moved to the
/// new end first.
pub fn grow_partition_to_end(
    path: &Path,
    table: &PartitionTable,
    number: u32,
) -> anyhow::Result<()> {
    if table.label == "gpt" {
        Cmd::new("sfdisk")
            .args([
                "-q",
                "--no-reread",
                "--no-tell-kernel",
                "--relocate",
                "gpt-bak-std",
            ])
            .arg(path)
            .run()?;
    }
    Cmd::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "-N"])
        .arg(number.to_string())
        .arg(path)
        .stdin_bytes(", +\n")
        .run()?;
    Ok(())
}

/// `e2fsck -fy DEVICE`. Exit codes 1 and 2 (errors corrected) count as success.
pub fn e2fsck(device: &Path) -> anyhow::Result<()> {
    match Cmd::new("e2fsck").args(["-f", "-y"]).arg(device).run() {
        Ok(()) => Ok(()),
        Err(CmdError::Failed { status, .. })
            if status == "exit code 1" || status == "exit code 2" =>
        {
            tracing::warn!("e2fsck corrected errors on {}", device.display());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// `resize2fs DEVICE`: grows the filesystem to fill the device.
pub fn resize2fs(device: &Path) -> anyhow::Result<()> {
    Cmd::new("resize2fs").arg(device).run()?;
    Ok(())
}

/// Parses a size as `--grow` takes it: a number with an optional binary unit
/// (`K`, `M`, `G`, `T`, also written `MiB`, `MB`), MiB when there is none.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M, 3G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 1 << 20,
        "K" | "KB" | "KIB" => 1 << 10,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown size unit (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("3G"), Ok(3 << 30));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
    }

    #[test]
    fn sfdisk_json_is_read_in_bytes() {
        let t = parse_sfdisk_json(
            r#"{"partitiontable":{"label":"dos","id":"0x1","device":"d.img","unit":"sectors",
            "sectorsize":512,"partitions":[{"node":"d.img1","start":2048,"size":4096,"type":"83","bootable":true},
            {"node":"d.img2","start":6144,"size":100,"type":"82"}]}}"#,
        )
        .unwrap();
        assert_eq!(t.label, "dos");
        assert_eq!(t.partitions[0].number, 1);
        assert_eq!(t.partitions[0].start, 1 << 20);
        assert_eq!(t.partitions[0].size, 2 << 20);
        assert!(t.partitions[0].is_linux());
        assert!(!t.partitions[1].is_linux());
        assert_eq!(t.partitions[1].number, 2);
    }

    #[test]
    fn root_prefers_label_then_largest_linux() {
        let p = |number, size, t: &str| Partition {
            number,
            start: u64::from(number) << 30,
            size,
            part_type: t.into(),
            name: None,
        };
        let fs = |l: &str| ExtSuperblock {
            label: l.into(),
            block_size: 4096,
            block_count: 1,
            kind: "ext4",
        };
        let table = PartitionTable {
            label: "dos".into(),
            sector_size: 512,
            partitions: vec![p(1, 100, "83"), p(2, 500, "83"), p(3, 50, "83")],
        };
        let c = vec![(0, fs("boot")), (1, fs("data")), (2, fs("root"))];
        assert_eq!(pick_root(&table, &c), Some(2));
        let c = vec![(0, fs("boot")), (1, fs("data"))];
        assert_eq!(pick_root(&table, &c), Some(1));
        let l = Layout::Partitioned {
            table,
            root: 1,
            fs: fs("data"),
        };
        assert!(!l.root_is_last());
    }

    #[test]
    fn ext_superblock_fields() {
        let mut sb = [0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&EXT_MAGIC.to_le_bytes());
        sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&INCOMPAT_EXTENTS.to_le_bytes());
        sb[0x78..0x7C].copy_from_slice(b"root");
        let s = parse_ext_superblock(&sb).unwrap();
        assert_eq!(s.block_size, 4096);
        assert_eq!(s.block_count, 1000);
        assert_eq!(s.label, "root");
        assert_eq!(s.kind, "ext4");
        sb[0x38] = 0;
        assert!(parse_ext_superblock(&sb).is_none());
    }

    #[test]
    fn qemu_info_json() {
        let i = parse_image_info(
            r#"{"virtual-size": 1073741824, "filename": "a.qcow2", "format": "qcow2",
            "backing-filename": "/etc/x"}"#,
        )
        .unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 1 << 30);
        assert_eq!(i.backing_file.as_deref(), Some("/etc/x"));
    }
}
