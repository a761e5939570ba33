//! Writing into a mounted image without ever following a symlink, and copying an
//! application tree into it.
//!
//! Every write goes through an [`ImageDir`]: a directory file descriptor reached from
//! the mount point one component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a
//! symlink anywhere on the way (in the image or planted by the application) makes
//! the open fail instead of leading out of the image. Files are created with
//! `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` after removing whatever non-directory
//! entry had the name; symlinks are created with `symlinkat`, never resolved.

use crate::host::signals;
use indicatif::ProgressBar;
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{symlinkat, unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// A real directory inside the image, held open.
pub struct ImageDir {
    fd: OwnedFd,
    /// Path inside the image, for messages.
    path: PathBuf,
}

fn check_name(name: &OsStr) -> std::io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a single file name", name.to_string_lossy()),
        ));
    }
    Ok(())
}

impl ImageDir {
    /// Opens the mount point itself (the image's `/`).
    pub fn open_root(mount: &Path) -> std::io::Result<ImageDir> {
        let fd = openat(
            None,
            mount,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        Ok(ImageDir {
            // SAFETY: openat just returned this descriptor and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: PathBuf::from("/"),
        })
    }

    pub fn image_path(&self) -> &Path {
        &self.path
    }

    fn kind(&self, name: &OsStr) -> std::io::Result<Option<SFlag>> {
        match fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(SFlag::from_bits_truncate(
                st.st_mode & SFlag::S_IFMT.bits(),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Opens the directory at `path` (absolute, inside the image) below this one,
    /// creating missing components when `create`. Every existing component must be
    /// a real directory: a symlink or file on the way is an error.
    pub fn open_path(&self, path: &Path, create: bool) -> std::io::Result<ImageDir> {
        let mut cur = self.dup()?;
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => cur = cur.child_dir(n, create, false, 0o755)?,
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("`{}` must not contain `..`", path.display()),
                    ))
                }
            }
        }
        Ok(cur)
    }

    fn dup(&self) -> std::io::Result<ImageDir> {
        Ok(ImageDir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Opens (or makes) the subdirectory `name`. With `replace`, a non-directory
    /// entry of that name (file, symlink) is removed first; without, it is an error.
    pub fn child_dir(
        &self,
        name: &OsStr,
        create: bool,
        replace: bool,
        mode: u32,
    ) -> std::io::Result<ImageDir> {
        check_name(name)?;
        let path = self.path.join(name);
        match self.kind(name)? {
            Some(SFlag::S_IFDIR) => {}
            Some(_) if replace => {
                self.unlink(name)?;
                self.mkdir(name, mode)?;
            }
            Some(k) => {
                return Err(std::io::Error::other(format!(
                    "{} in the image is {}, not a directory; refusing to go through it",
                    path.display(),
                    describe_kind(k)
                )))
            }
            None if create => self.mkdir(name, mode)?,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} does not exist in the image", path.display()),
                ))
            }
        }
        let fd = openat(
            Some(self.fd.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::other(format!(
                "cannot open {} in the image without following links: {e}",
                path.display()
            ))
        })?;
        Ok(ImageDir {
            // SAFETY: fresh descriptor from openat.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path,
        })
    }

    fn mkdir(&self, name: &OsStr, mode: u32) -> std::io::Result<()> {
        match mkdirat(
            Some(self.fd.as_raw_fd()),
            name,
            Mode::from_bits_truncate(mode),
        ) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    fn unlink(&self, name: &OsStr) -> std::io::Result<()> {
        match unlinkat(Some(self.fd.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// True when `name` in this directory is a symlink (never followed).
    pub fn is_symlink(&self, name: &OsStr) -> std::io::Result<bool> {
        check_name(name)?;
        Ok(self.kind(name)? == Some(SFlag::S_IFLNK))
    }

    /// Removes a non-directory entry (a missing one is fine).
    pub fn remove_file(&self, name: &OsStr) -> std::io::Result<()> {
        check_name(name)?;
        self.unlink(name)
    }

    fn clear_for(&self, name: &OsStr) -> std::io::Result<()> {
        match self.kind(name)? {
            None => Ok(()),
            Some(SFlag::S_IFDIR) => Err(std::io::Error::other(format!(
                "{} is a directory in the image; not replacing it with a file",
                self.path.join(name).display()
            ))),
            Some(_) => self.unlink(name),
        }
    }

    /// Creates the regular file `name` (replacing a file or symlink of that name).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> std::io::Result<std::fs::File> {
        check_name(name)?;
        self.clear_for(name)?;
        let fd = openat(
            Some(self.fd.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(io)?;
        // SAFETY: fresh descriptor from openat.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        fchmod(f.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(io)?;
        Ok(f)
    }

    /// Creates the symlink `name -> target` (replacing a file or symlink of that name).
    pub fn symlink(&self, target: &Path, name: &OsStr) -> std::io::Result<()> {
        check_name(name)?;
        self.clear_for(name)?;
        symlinkat(target, Some(self.fd.as_raw_fd()), name).map_err(io)
    }

    fn set_mode_and_mtime(&self, mode: u32, md: &std::fs::Metadata) -> std::io::Result<()> {
        fchmod(self.fd.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(io)?;
        let t = TimeSpec::new(md.mtime(), md.mtime_nsec());
        futimens(self.fd.as_raw_fd(), &t, &t).map_err(io)
    }
}

fn describe_kind(k: SFlag) -> &'static str {
    match k {
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFREG => "a regular file",
        _ => "a special file",
    }
}

/// An entry of the application tree that was not copied, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Path relative to the application directory.
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
    /// SHA-256 over the sorted listing of what was copied (paths, modes, file
    /// digests, link targets): the same tree gives the same digest.
    pub digest: String,
}

/// Bytes of regular files below `dir` (symlinks not followed), for the progress bar.
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            total += tree_bytes(&e.path());
        } else if md.is_file() {
            total += md.len();
        }
    }
    total
}

/// File modes are kept except setuid, setgid and sticky bits.
const MODE_MASK: u32 = 0o777;

struct Walker<'a> {
    src_root: &'a Path,
    dest: &'a Path,
    stats: CopyStats,
    listing: Sha256,
    bar: &'a ProgressBar,
}

/// Copies the contents of `src` into the image directory `dest` (an absolute path
/// inside the image, created if missing). Symlinks are copied as symlinks only when
/// they resolve inside `dest` (see [`link_stays_inside`]); others, and special
/// files, are skipped and listed in the result.
pub fn copy_tree(
    src: &Path,
    image_root: &ImageDir,
    dest: &Path,
    bar: &ProgressBar,
) -> std::io::Result<CopyStats> {
    let src_md = std::fs::metadata(src)?;
    if !src_md.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let dest_dir = image_root.open_path(dest, true)?;
    let mut w = Walker {
        src_root: src,
        dest,
        stats: CopyStats::default(),
        listing: Sha256::new(),
        bar,
    };
    w.dir(src, Path::new(""), &dest_dir)?;
    dest_dir.set_mode_and_mtime(src_md.mode() & MODE_MASK, &src_md)?;
    w.stats.digest = hex::encode(w.listing.finalize());
    Ok(w.stats)
}

impl Walker<'_> {
    fn record(&mut self, kind: &str, rel: &Path, rest: &[u8]) {
        self.listing.update(kind.as_bytes());
        self.listing.update(b" ");
        self.listing.update(rel.as_os_str().as_bytes());
        self.listing.update(b" ");
        self.listing.update(rest);
        self.listing.update(b"\n");
    }

    fn skip(&mut self, rel: &Path, reason: String) {
        tracing::warn!("not copying {}: {reason}", rel.display());
        self.record("S", rel, reason.as_bytes());
        self.stats.skipped.push(Skipped {
            path: rel.to_owned(),
            reason,
        });
    }

    fn dir(&mut self, src: &Path, rel: &Path, out: &ImageDir) -> std::io::Result<()> {
        let mut names: Vec<OsString> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            if signals::interrupted() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted",
                ));
            }
            let path = src.join(&name);
            let rel = rel.join(&name);
            let md = path.symlink_metadata()?;
            let ft = md.file_type();
            let mode = md.mode() & MODE_MASK;
            if ft.is_dir() {
                let child = out.child_dir(&name, true, true, 0o700)?;
                self.record("D", &rel, format!("{mode:o}").as_bytes());
                self.dir(&path, &rel, &child)?;
                child.set_mode_and_mtime(mode, &md)?;
                self.stats.dirs += 1;
            } else if ft.is_file() {
                let digest = self.file(&path, &name, out, mode, &md)?;
                self.record(
                    "F",
                    &rel,
                    format!("{mode:o} {} {digest}", md.len()).as_bytes(),
                );
                self.stats.files += 1;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                if link_stays_inside(self.src_root, self.dest, &rel, &target) {
                    out.symlink(&target, &name)?;
                    self.record("L", &rel, target.as_os_str().as_bytes());
                    self.stats.symlinks += 1;
                } else {
                    self.skip(
                        &rel,
                        format!(
                            "symlink to `{}` leads outside {} in the image",
                            target.display(),
                            self.dest.display()
                        ),
                    );
                }
            } else {
                self.skip(&rel, "not a regular file, directory or symlink".into());
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        path: &Path,
        name: &OsStr,
        out: &ImageDir,
        mode: u32,
        md: &std::fs::Metadata,
    ) -> std::io::Result<String> {
        // O_NOFOLLOW: if the entry was swapped for a symlink since we looked, fail.
        let mut src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(path)?;
        let smd = src.metadata()?;
        if !smd.is_file() || smd.ino() != md.ino() || smd.dev() != md.dev() {
            return Err(std::io::Error::other(format!(
                "{} changed while it was being copied",
                path.display()
            )));
        }
        let mut dst = out.create_file(name, 0o600)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
            self.stats.bytes += n as u64;
            self.bar.inc(n as u64);
            if signals::interrupted() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted",
                ));
            }
        }
        fchmod(dst.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(io)?;
        let t = TimeSpec::new(md.mtime(), md.mtime_nsec());
        futimens(dst.as_raw_fd(), &t, &t).map_err(io)?;
        Ok(hex::encode(h.finalize()))
    }
}

fn libc_o_nofollow() -> i32 {
    OFlag::O_NOFOLLOW.bits()
}

/// Whether a symlink at `link_rel` (relative to the application directory, which
/// lands at `dest` in the image) pointing at `target` resolves inside `dest`.
///
/// The target is resolved lexically from the link's place in the image (absolute
/// targets from the image root). Because `..` after a symlink does not mean what it
/// says lexically, any intermediate component inside `dest` that is itself a symlink
/// in the application tree makes the answer "no".
pub fn link_stays_inside(src_root: &Path, dest: &Path, link_rel: &Path, target: &Path) -> bool {
    let normal = |p: &Path| -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                _ => None,
            })
            .collect()
    };
    let dest_c = normal(dest);
    let comps: Vec<Component> = target.components().collect();
    if comps.is_empty() {
        return false;
    }
    let mut cur: Vec<OsString> = if target.is_absolute() {
        Vec::new()
    } else {
        normal(&dest.join(link_rel.parent().unwrap_or(Path::new(""))))
    };
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::RootDir => cur.clear(),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(n) => {
                cur.push(n.to_os_string());
                let last = i + 1 == comps.len();
                if !last && cur.len() > dest_c.len() && cur.starts_with(&dest_c) {
                    let rel: PathBuf = cur[dest_c.len()..].iter().collect();
                    let is_link = src_root
                        .join(&rel)
                        .symlink_metadata()
                        .map(|m| m.file_type().is_symlink())
                        .unwrap_or(false);
                    if is_link {
                        return false;
                    }
                }
            }
            Component::Prefix(_) => return false,
        }
    }
    cur.starts_with(&dest_c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_inside_dest_are_kept_and_others_refused() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("/", src.path().join("lib/up")).unwrap();
        let d = Path::new("/opt/app");
        let ok =
            |rel: &str, t: &str| link_stays_inside(src.path(), d, Path::new(rel), Path::new(t));
        assert!(ok("bin/x", "../lib/y"));
        assert!(ok("x", "lib/y"));
        assert!(ok("x", "/opt/app/lib/y"));
        assert!(ok("x", "."));
        assert!(!ok("x", "/etc/shadow"));
        assert!(!ok("x", "/"));
        assert!(!ok("a/b", "../../../../etc"));
        assert!(!ok("x", ".."));
        assert!(!ok("x", "../app2/y"));
        assert!(!ok("x", ""));
        // `..` after a symlink is not lexical: refused.
        assert!(!ok("x", "lib/up/../y"));
    }

    #[test]
    fn image_dir_refuses_symlinked_components() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("opt")).unwrap();
        let r = ImageDir::open_root(root.path()).unwrap();
        assert!(r.open_path(Path::new("/opt/app"), true).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let tmp = r.open_path(Path::new("/tmp/a"), true).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), root.path().join("tmp/a/f")).unwrap();
        let mut f = tmp.create_file(OsStr::new("f"), 0o644).unwrap();
        f.write_all(b"x").unwrap();
        assert!(!outside.path().join("f").exists());
        assert!(root.path().join("tmp/a/f").is_file());
        assert!(tmp.create_file(OsStr::new(".."), 0o644).is_err());
        std::os::unix::fs::symlink("/nonexistent", root.path().join("tmp/a/l")).unwrap();
        assert!(tmp.is_symlink(OsStr::new("l")).unwrap());
        assert!(!tmp.is_symlink(OsStr::new("f")).unwrap());
    }
}
