//! Safe extraction of application archives (`.tar`, `.tar.gz`/`.tgz`, `.zip`; the format is
//! recognised by its first bytes).
//!
//! Nothing is ever written outside the destination directory:
//! * entry names must be relative, without `..` (absolute paths, `..` components and, for zip,
//!   backslashes or drive letters are refused);
//! * an entry may not pass through a symbolic link (the links of the archive included), so the
//!   path written is the path checked;
//! * symbolic links must point inside the tree (relative, resolved lexically from the link's
//!   directory), hard links must name an earlier regular file of the archive;
//! * device nodes, FIFOs and other special entries are refused;
//! * existing files are never replaced (duplicate entries are refused), files are created with
//!   `O_EXCL` and modes are reduced to `0o755`/`0o644` (no set-id bits);
//! * total size and entry count are bounded.
//!
//! [`extract`] unpacks into a fresh temporary directory beside `dest` and renames it to `dest`
//! only when every entry was accepted; on any error the partial tree is removed.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Largest total of extracted file bytes.
pub const MAX_TOTAL: u64 = 512 * 1024 * 1024;
/// Most entries.
pub const MAX_ENTRIES: usize = 100_000;

/// What the archive holds, in order, as seen by the extractor.
enum Kind<'a> {
    Dir,
    File(&'a mut dyn Read, bool),
    Symlink(String),
    Hardlink(String),
}

/// Archive formats recognised by [`detect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    TarGz,
    Tar,
    Zip,
}

pub fn detect(bytes: &[u8]) -> Result<Format> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::TarGz)
    } else if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        Ok(Format::Zip)
    } else if bytes.len() >= 262 && &bytes[257..262] == b"ustar" {
        Ok(Format::Tar)
    } else {
        bail!("not a .tar.gz, .tar or .zip archive")
    }
}

/// The checked relative path of an entry name.
fn entry_path(name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        bail!("empty entry name");
    }
    if name.contains('\0') {
        bail!("entry '{name}': NUL in name");
    }
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => bail!("entry '{name}': '..' in path"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("entry '{name}': absolute path")
            }
        }
    }
    if out.as_os_str().is_empty() {
        // "./" itself: the destination directory.
        return Ok(out);
    }
    Ok(out)
}

/// Where a symbolic link at `link` (relative to the root) pointing to `target` lands,
/// lexically; an error when it leaves the tree or is absolute.
fn check_link_target(link: &Path, target: &str) -> Result<()> {
    let t = Path::new(target);
    if target.is_empty() {
        bail!("link '{}': empty target", link.display());
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for c in t.components() {
        match c {
            Component::Normal(s) => depth.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    bail!(
                        "link '{}' -> '{target}' points outside the archive",
                        link.display()
                    );
                }
            }
            Component::RootDir | Component::Prefix(_) => bail!(
                "link '{}' -> '{target}': absolute link target",
                link.display()
            ),
        }
    }
    Ok(())
}

struct Sink {
    root: PathBuf,
    total: u64,
    entries: usize,
}

impl Sink {
    /// Refuses a path whose existing ancestors (below the root) include a symbolic link
    /// or a non-directory.
    fn check_parents(&self, rel: &Path) -> Result<()> {
        let mut cur = self.root.clone();
        let comps: Vec<_> = rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "entry '{}' passes through the symbolic link '{}'",
                    rel.display(),
                    cur.strip_prefix(&self.root).unwrap_or(&cur).display()
                ),
                Ok(m) if !m.is_dir() => bail!(
                    "entry '{}': '{}' is not a directory",
                    rel.display(),
                    cur.strip_prefix(&self.root).unwrap_or(&cur).display()
                ),
                Ok(_) => {}
                Err(_) => {
                    fs::create_dir(&cur).with_context(|| format!("creating {}", cur.display()))?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))?;
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, name: &str, kind: Kind<'_>) -> Result<()> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            bail!("more than {MAX_ENTRIES} entries");
        }
        let rel = entry_path(name)?;
        if rel.as_os_str().is_empty() {
            return match kind {
                Kind::Dir => Ok(()),
                _ => bail!("entry '{name}': not a directory"),
            };
        }
        self.check_parents(&rel)?;
        let path = self.root.join(&rel);
        match kind {
            Kind::Dir => match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => bail!("entry '{name}': exists and is not a directory"),
                Err(_) => {
                    fs::create_dir(&path).with_context(|| format!("creating {name}"))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                    Ok(())
                }
            },
            Kind::File(r, exec) => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .mode(if exec { 0o755 } else { 0o644 })
                    .open(&path)
                    .with_context(|| format!("entry '{name}': cannot create (duplicate entry?)"))?;
                let budget = MAX_TOTAL - self.total;
                let n = std::io::copy(&mut r.take(budget + 1), &mut f)
                    .with_context(|| format!("writing {name}"))?;
                if n > budget {
                    bail!("archive expands to more than {MAX_TOTAL} bytes");
                }
                self.total += n;
                f.flush()?;
                Ok(())
            }
            Kind::Symlink(target) => {
                check_link_target(&rel, &target)?;
                std::os::unix::fs::symlink(&target, &path)
                    .with_context(|| format!("entry '{name}': cannot create link"))
            }
            Kind::Hardlink(target) => {
                let trel = entry_path(&target)
                    .with_context(|| format!("hard link '{name}' -> '{target}'"))?;
                self.check_parents(&trel)
                    .with_context(|| format!("hard link '{name}' -> '{target}'"))?;
                let tpath = self.root.join(&trel);
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_file() => {}
                    _ => bail!(
                        "hard link '{name}' -> '{target}': the target is not a regular file of the archive"
                    ),
                }
                fs::hard_link(&tpath, &path)
                    .with_context(|| format!("entry '{name}': cannot create hard link"))
            }
        }
    }
}

fn unpack_tar<R: Read>(r: R, sink: &mut Sink) -> Result<()> {
    let mut a = tar::Archive::new(r);
    for e in a.entries().context("reading the tar archive")? {
        let mut e = e.context("reading the tar archive")?;
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let ty = e.header().entry_type();
        let link = || -> Result<String> {
            Ok(e.link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        use tar::EntryType as T;
        match ty {
            T::Directory => sink.add(&name, Kind::Dir)?,
            T::Regular | T::Continuous | T::GNUSparse => {
                let exec = e.header().mode().map(|m| m & 0o111 != 0).unwrap_or(false);
                sink.add(&name, Kind::File(&mut e, exec))?
            }
            T::Symlink => {
                let t = link()?;
                sink.add(&name, Kind::Symlink(t))?
            }
            T::Link => {
                let t = link()?;
                sink.add(&name, Kind::Hardlink(t))?
            }
            // Metadata entries (long names, pax headers) are consumed by the tar reader.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            T::Char | T::Block => bail!("entry '{name}': device nodes are not allowed"),
            T::Fifo => bail!("entry '{name}': FIFOs are not allowed"),
            other => bail!("entry '{name}': unsupported entry type {other:?}"),
        }
    }
    Ok(())
}

fn unpack_zip(bytes: &[u8], sink: &mut Sink) -> Result<()> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("reading the zip")?;
    for i in 0..z.len() {
        let mut f = z.by_index(i).context("reading the zip")?;
        let name = f.name().to_string();
        if name.contains('\\') || name.get(1..2) == Some(":") {
            bail!("entry '{name}': backslash or drive letter in a zip name");
        }
        let mode = f.unix_mode();
        let ftype = mode.map(|m| m & 0o170000);
        match ftype {
            Some(0o120000) => {
                let mut t = String::new();
                f.read_to_string(&mut t)
                    .with_context(|| format!("reading link {name}"))?;
                sink.add(&name, Kind::Symlink(t))?
            }
            Some(0o020000) | Some(0o060000) => {
                bail!("entry '{name}': device nodes are not allowed")
            }
            Some(0o010000) => bail!("entry '{name}': FIFOs are not allowed"),
            Some(0o140000) => bail!("entry '{name}': sockets are not allowed"),
            _ if f.is_dir() => sink.add(&name, Kind::Dir)?,
            _ => {
                let exec = mode.map(|m| m & 0o111 != 0).unwrap_or(false);
                sink.add(&name, Kind::File(&mut f, exec))?
            }
        }
    }
    Ok(())
}

/// Unpacks `bytes` into `dest`, which must not exist yet; all or nothing.
pub fn extract(bytes: &[u8], dest: &Path) -> Result<()> {
    let format = detect(bytes)?;
    if fs::symlink_metadata(dest).is_ok() {
        bail!("{} exists already", dest.display());
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempdir_in(parent)?;
    let mut sink = Sink {
        root: tmp.clone(),
        total: 0,
        entries: 0,
    };
    let r = match format {
        Format::TarGz => unpack_tar(flate2::read::GzDecoder::new(bytes), &mut sink),
        Format::Tar => unpack_tar(bytes, &mut sink),
        Format::Zip => unpack_zip(bytes, &mut sink),
    };
    let r = r.and_then(|()| {
        fs::rename(&tmp, dest).with_context(|| format!("renaming into {}", dest.display()))
    });
    if r.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    r
}

/// Checks an archive without keeping anything: unpacked into a fresh private directory
/// under `scratch` (e.g. the system's temporary directory) and removed.
pub fn check(bytes: &[u8], scratch: &Path) -> Result<()> {
    let dir = tempdir_in(scratch)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let r = extract(bytes, &dir.join("x"));
    let _ = fs::remove_dir_all(&dir);
    r
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    for _ in 0..16 {
        let p = parent.join(format!(".unpack-{}", crate::pki::random_hex(6)));
        match fs::create_dir(&p) {
            Ok(()) => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    bail!(
        "cannot create a temporary directory in {}",
        parent.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar.gz built entry by entry: (name, type, data or link target).
    fn targz(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, ty, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*ty);
            h.set_mode(0o755);
            // set_path refuses '..'; write the raw name like a hostile archiver would.
            {
                let raw = &mut h.as_old_mut().name;
                raw.fill(0);
                raw[..name.len()].copy_from_slice(name.as_bytes());
            }
            match ty {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_link_name(data).unwrap();
                    h.set_size(0);
                    h.set_cksum();
                    b.append(&h, std::io::empty()).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    b.append(&h, data.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn zip_of(entries: &[(&str, Option<u32>, &str)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, mode, data) in entries {
            let mut o = zip::write::SimpleFileOptions::default();
            if let Some(m) = mode {
                o = o.unix_permissions(*m);
            }
            if *mode == Some(0o120777) {
                w.add_symlink(*name, *data, o).unwrap();
            } else {
                w.start_file(*name, o).unwrap();
                w.write_all(data.as_bytes()).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    use tar::EntryType as T;

    #[test]
    fn good_archives_unpack() {
        let d = tempfile::tempdir().unwrap();
        let a = targz(&[
            ("app/", T::Directory, ""),
            ("app/init.sh", T::Regular, "echo hi\n"),
            ("app/lib/x.txt", T::Regular, "x"),
            ("app/link", T::Symlink, "lib/x.txt"),
            ("app/lib/up", T::Symlink, "../init.sh"),
            ("app/hard", T::Link, "app/init.sh"),
        ]);
        let dest = d.path().join("v1");
        extract(&a, &dest).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join("app/link")).unwrap(),
            "x",
            "inner link"
        );
        assert_eq!(
            fs::read_to_string(dest.join("app/hard")).unwrap(),
            "echo hi\n"
        );
        let z = zip_of(&[("init.sh", Some(0o755), "echo z\n"), ("d/", None, "")]);
        extract(&z, &d.path().join("v2")).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("v2/init.sh")).unwrap(),
            "echo z\n"
        );
        assert!(extract(&z, &d.path().join("v2")).is_err(), "dest exists");
    }

    fn refused(bytes: &[u8], what: &str) {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("a/b");
        fs::create_dir_all(&inner).unwrap();
        let e = extract(bytes, &inner.join("code")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(what), "{msg}");
        // nothing left anywhere: only the (empty) parent directories exist
        let mut all = Vec::new();
        for e in walk(d.path()) {
            all.push(e);
        }
        assert_eq!(
            all,
            vec![d.path().join("a"), inner.clone()],
            "left behind: {all:?}"
        );
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap().path();
            v.push(e.clone());
            if fs::symlink_metadata(&e).unwrap().is_dir() {
                v.extend(walk(&e));
            }
        }
        v.sort();
        v
    }

    #[test]
    fn hostile_tar_entries_are_refused() {
        let ok = ("init.sh", T::Regular, "echo\n");
        refused(&targz(&[ok, ("../evil", T::Regular, "x")]), "'..' in path");
        refused(
            &targz(&[ok, ("a/../../evil", T::Regular, "x")]),
            "'..' in path",
        );
        refused(
            &targz(&[ok, ("/tmp/evil", T::Regular, "x")]),
            "absolute path",
        );
        refused(
            &targz(&[ok, ("l", T::Symlink, "/etc")]),
            "absolute link target",
        );
        refused(
            &targz(&[ok, ("d/l", T::Symlink, "../..")]),
            "points outside",
        );
        // a link inside the tree, then a write through it
        refused(
            &targz(&[
                ("d/", T::Directory, ""),
                ("l", T::Symlink, "d"),
                ("l/x", T::Regular, "x"),
            ]),
            "passes through the symbolic link 'l'",
        );
        refused(
            &targz(&[ok, ("h", T::Link, "../../etc/passwd")]),
            "'..' in path",
        );
        refused(
            &targz(&[ok, ("h", T::Link, "/etc/passwd")]),
            "absolute path",
        );
        refused(&targz(&[ok, ("dev", T::Char, "")]), "device nodes");
        refused(&targz(&[ok, ("dev", T::Block, "")]), "device nodes");
        refused(&targz(&[ok, ("p", T::Fifo, "")]), "FIFOs");
        refused(&targz(&[ok, ok]), "duplicate entry");
        refused(b"garbage", "not a .tar.gz");
    }

    #[test]
    fn hostile_zip_entries_are_refused() {
        refused(&zip_of(&[("../evil", None, "x")]), "'..' in path");
        refused(&zip_of(&[("/abs", None, "x")]), "absolute path");
        refused(&zip_of(&[("a\\..\\b", None, "x")]), "backslash");
        refused(
            &zip_of(&[("l", Some(0o120777), "/etc/passwd")]),
            "absolute link target",
        );
        refused(&zip_of(&[("l", Some(0o120777), "../x")]), "points outside");
    }
}
