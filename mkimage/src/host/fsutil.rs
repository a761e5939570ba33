//! Small filesystem helpers: the mount table, safe removal of work trees, sizes.

use std::path::{Path, PathBuf};

/// The Debian package that provides a host tool, for "install X" hints.
pub fn package_for_tool(tool: &str) -> Option<&'static str> {
    let name = Path::new(tool).file_name()?.to_str()?;
    Some(match name {
        "debootstrap" => "debootstrap",
        "mmdebstrap" => "mmdebstrap",
        "sfdisk" => "fdisk",
        "mkfs.ext4" | "e2fsck" | "resize2fs" | "debugfs" | "tune2fs" | "dumpe2fs" => "e2fsprogs",
        "grub-mkimage" => "grub-common",
        "qemu-img" => "qemu-utils",
        "qemu-system-x86_64" => "qemu-system-x86",
        "losetup" | "blkid" => "mount",
        "tar" => "tar",
        "zstd" => "zstd",
        "genisoimage" => "genisoimage",
        "systemd-nspawn" => "systemd-container",
        _ => return None,
    })
}

/// The host tools a build needs, with the Debian package of each.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("grub-mkimage", "grub-common"),
    ("qemu-img", "qemu-utils"),
];

/// Finds an executable on PATH (also looking in the sbin directories root uses).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Mount points (from /proc/self/mountinfo) at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

pub fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a work tree, but never through a mount point: anything still mounted
/// below `dir` is unmounted first (one mount at a time, never recursively), and if
/// that fails the tree is left in place — deleting through a bind of the host's
/// /dev would destroy the host.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for m in mounts_under(dir) {
        tracing::warn!(
            "{} is still mounted; unmounting it before removal",
            m.display()
        );
        if let Err(e) = crate::host::mount::unmount(&m) {
            return Err(std::io::Error::other(format!(
                "not removing {}: {} is still mounted ({e})",
                dir.display(),
                m.display()
            )));
        }
    }
    if !mounts_under(dir).is_empty() {
        return Err(std::io::Error::other(format!(
            "not removing {}: something is still mounted below it",
            dir.display()
        )));
    }
    std::fs::remove_dir_all(dir)
}

/// Apparent and allocated size of a file, in bytes.
pub fn sizes(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.blocks() * 512))
}

/// Total size of a directory tree (apparent bytes of regular files), not crossing mounts.
pub fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::symlink_metadata(dir) {
        Ok(m) => m.dev(),
        Err(_) => return 0,
    };
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// fsync a file by path.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .sync_all()
}

/// A file written under a temporary name beside its final path and renamed into
/// place only by [`PendingFile::commit`]; dropped uncommitted, it is removed. This is
/// how no half-written image ever sits at the output path.
pub struct PendingFile {
    temp: PathBuf,
    dest: PathBuf,
    committed: bool,
    ticket: Option<crate::journal::Ticket>,
}

impl PendingFile {
    pub fn new(dest: &Path) -> PendingFile {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        let ticket = crate::journal::acquire(crate::journal::Resource::Partial {
            path: absolute(&temp),
        });
        PendingFile {
            temp,
            dest: dest.to_owned(),
            committed: false,
            ticket,
        }
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs the file and renames it to its final name.
    pub fn commit(mut self) -> std::io::Result<PathBuf> {
        sync_file(&self.temp)?;
        std::fs::rename(&self.temp, &self.dest)?;
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.committed = true;
        crate::journal::release(self.ticket.take());
        Ok(self.dest.clone())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed && self.temp.exists() {
            tracing::debug!("removing unfinished {}", self.temp.display());
            let _ = std::fs::remove_file(&self.temp);
        }
        if !self.temp.exists() {
            crate::journal::release(self.ticket.take());
        }
    }
}

/// `p` made absolute against the current directory (journal entries must not
/// depend on where `gc` runs).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn pending_file_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        {
            let p = PendingFile::new(&dest);
            std::fs::write(p.path(), b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let p = PendingFile::new(&dest);
        std::fs::write(p.path(), b"whole").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
