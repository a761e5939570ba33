//! The stage cache: the image tree after a cacheable stage, stored under a key
//! chained from the parent stage's key and the stage's own inputs.
//!
//! Entries are written under a temporary name and renamed into place, so a
//! half-written entry is never served; a lock file serialises writers.

use crate::host::{fsutil, Cmd};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Bumped when the layout of cache entries changes.
const CACHE_FORMAT: &str = "mkimage-cache-v1";

pub struct Cache {
    dir: PathBuf,
}

/// One cache entry, as `mkimage cache ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryInfo {
    /// Directory name under the cache dir (`<stage>-<key prefix>`).
    pub name: String,
    pub stage: String,
    pub key: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub last_used: u64,
    /// Bytes on disk of all files of the entry.
    pub bytes: u64,
    /// Bytes only this entry holds (what removing it frees; layers share
    /// unchanged files with their parents through hard links).
    pub exclusive_bytes: u64,
}

/// Key of a stage: SHA-256 over the parent key, the stage name and its inputs.
pub fn chain_key(parent: Option<&str>, stage: &str, inputs: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    h.update([0]);
    h.update(parent.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(stage.as_bytes());
    h.update([0]);
    // serde_json maps are sorted (no preserve_order feature), so this is canonical.
    h.update(inputs.to_string().as_bytes());
    hex::encode(h.finalize())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Lock = nix::fcntl::Flock<std::fs::File>;

/// A cache layer mounted (or copied) as a build's tree; see [`Cache::mount_layer`].
/// Dropping it unmounts the overlay, then releases the entry.
pub struct LayerMount {
    _mount: Option<crate::host::MountGuard>,
    _in_use: Lock,
    /// For an overlay: the entry's tree (its lower layer) and the upper directory that
    /// holds every change made since; see [`Cache::store_overlay`].
    overlay: Option<(PathBuf, PathBuf)>,
}

impl LayerMount {
    /// The lower tree and the upper directory, when this layer is an overlay.
    pub fn overlay_dirs(&self) -> Option<(&Path, &Path)> {
        self.overlay
            .as_ref()
            .map(|(l, u)| (l.as_path(), u.as_path()))
    }
}

/// overlayfs takes its directories in a comma-separated option string: an absolute
/// path without the characters that would split or escape it.
fn overlay_path(p: &Path) -> anyhow::Result<String> {
    let s = fsutil::absolute(p).to_string_lossy().into_owned();
    if s.contains([',', ':', '\\']) {
        anyhow::bail!("{s}: overlayfs cannot take a path with ',', ':' or '\\'");
    }
    Ok(s)
}

/// (device, inode) of a file in the cache.
type Inode = (u64, u64);

/// What one walk over the cache found (see [`Cache::scan_inodes`]).
struct Scan {
    /// Least recently used first.
    infos: Vec<EntryInfo>,
    /// The inodes of each entry, in the order of `infos`.
    files_of: Vec<Vec<Inode>>,
    /// Bytes of each inode, and how many entries hold it.
    inodes: std::collections::HashMap<Inode, (u64, usize)>,
    total: u64,
}

impl Cache {
    pub fn new(dir: &Path) -> Cache {
        Cache {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of the entry for `stage` with `key`.
    pub fn entry(&self, stage: &str, key: &str) -> PathBuf {
        self.dir
            .join(format!("{stage}-{}", &key[..32.min(key.len())]))
    }

    /// Whether a complete entry exists.
    pub fn contains(&self, stage: &str, key: &str) -> bool {
        self.entry(stage, key).join("COMPLETE").exists()
    }

    /// Copies the cached tree to `dest` (replacing it). Holds a shared lock, so a
    /// concurrent `prune` cannot remove the entry while it is read.
    pub fn restore(&self, stage: &str, key: &str, dest: &Path) -> anyhow::Result<()> {
        let _lock = self.lock(false)?;
        let entry = self.entry(stage, key);
        if !entry.join("COMPLETE").exists() {
            anyhow::bail!(
                "cache entry {} disappeared (pruned by another command?); run the build again",
                entry.display()
            );
        }
        if dest.exists() {
            fsutil::remove_tree(dest)?;
        }
        copy_tree(&entry.join("rootfs"), dest)?;
        let _ = std::fs::write(entry.join("LAST_USED"), now_secs().to_string());
        Ok(())
    }

    /// Makes the cached tree appear at `dest` without copying it: an overlay whose
    /// lower layer is the entry (never written) and whose upper layer, under
    /// `scratch`, takes every change later stages make. Returns the mount and a shared
    /// lock on the entry that `prune` respects; both must live as long as the tree is
    /// used. Where overlayfs is unavailable, falls back to [`Cache::restore`]'s copy.
    ///
    /// Restoring a minimal image's tree by copy takes 6–8 s; mounting it takes
    /// milliseconds, which is most of what a rebuild after a service change costs.
    pub fn mount_layer(
        &self,
        stage: &str,
        key: &str,
        dest: &Path,
        scratch: &Path,
    ) -> anyhow::Result<LayerMount> {
        let entry = self.entry(stage, key);
        let in_use = {
            let _lock = self.lock(false)?;
            if !entry.join("COMPLETE").exists() {
                anyhow::bail!(
                    "cache entry {} disappeared (pruned by another command?); run the build again",
                    entry.display()
                );
            }
            let dir = std::fs::File::open(&entry)?;
            Lock::lock(dir, nix::fcntl::FlockArg::LockShared).map_err(|(_, e)| {
                anyhow::anyhow!("cannot lock the cache entry {}: {e}", entry.display())
            })?
        };
        let _ = std::fs::write(entry.join("LAST_USED"), now_secs().to_string());
        if std::env::var_os("MKIMAGE_CACHE_COPY").is_none() {
            let upper = scratch.join("upper");
            let work = scratch.join("overlay-work");
            for d in [&upper, &work] {
                if d.exists() {
                    fsutil::remove_tree(d)?;
                }
                std::fs::create_dir_all(d)?;
            }
            if dest.exists() {
                fsutil::remove_tree(dest)?;
            }
            std::fs::create_dir_all(dest)?;
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                overlay_path(&entry.join("rootfs"))?,
                overlay_path(&upper)?,
                overlay_path(&work)?
            );
            match crate::host::MountGuard::mount(
                Path::new("overlay"),
                dest,
                "overlay",
                Some(&options),
            ) {
                Ok(m) => {
                    return Ok(LayerMount {
                        _mount: Some(m),
                        _in_use: in_use,
                        overlay: Some((entry.join("rootfs"), upper)),
                    })
                }
                Err(e) => tracing::info!("{e}: restoring the layer by copy instead"),
            }
        }
        self.restore(stage, key, dest)?;
        Ok(LayerMount {
            _mount: None,
            _in_use: in_use,
            overlay: None,
        })
    }

    /// Stores `tree` as the entry for `key` by moving it into the cache instead of
    /// copying it, then mounts the entry back at `tree` (see [`Cache::mount_layer`]).
    /// This is how a first layer (one with no parent to share files with) is stored:
    /// it costs a rename instead of a walk over the whole tree. Returns `None`, leaving
    /// the tree in place, where it cannot be moved (another filesystem) or restoring by
    /// copy is asked for; the caller then stores a copy.
    pub fn adopt(
        &self,
        stage: &str,
        key: &str,
        tree: &Path,
        scratch: &Path,
    ) -> anyhow::Result<Option<LayerMount>> {
        if std::env::var_os("MKIMAGE_CACHE_COPY").is_some() {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.dir)?;
        let entry = self.entry(stage, key);
        if !entry.join("COMPLETE").exists() {
            let (tmp, _tmp_guard) = self.temp_entry(stage)?;
            match std::fs::rename(tree, tmp.join("rootfs")) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32) => {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
            // Another build may have stored the same layer meanwhile: then ours goes
            // with the temporary directory and theirs is mounted.
            self.publish(&tmp, stage, key)?;
        }
        self.mount_layer(stage, key, tree, scratch).map(Some)
    }

    /// Stores a copy of `tree` as the entry for `key`. Files identical to those of
    /// `parent` (the previous layer's entry) are hard-linked to it rather than
    /// copied, so a layer costs only what its stage changed.
    ///
    /// The copy is made under a temporary name (journaled, so a killed build's
    /// half-written copy is removed by `gc`) and renamed into place under the
    /// exclusive lock: a half-written entry is never served.
    pub fn store(
        &self,
        stage: &str,
        key: &str,
        tree: &Path,
        parent: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let entry = self.entry(stage, key);
        if entry.join("COMPLETE").exists() {
            return Ok(());
        }
        let (tmp, _tmp_guard) = self.temp_entry(stage)?;
        let link_dest = parent
            .map(|(s, k)| self.entry(s, k).join("rootfs"))
            .filter(|p| p.is_dir());
        copy_layer(tree, &tmp.join("rootfs"), link_dest.as_deref())?;
        // Another build may have stored the same layer meanwhile; then ours goes with
        // the guard (which otherwise finds the directory renamed away: a no-op).
        self.publish(&tmp, stage, key)
    }

    /// Stores the tree of an overlay (see [`Cache::mount_layer`]) as the entry for
    /// `key`: the lower layer's tree hard-linked file by file (`cp -al`, which reads
    /// no file), then the upper directory's changes applied on top of it. That costs a
    /// walk over the directories plus what the stages since the lower layer changed,
    /// where [`Cache::store`] compares every file of the tree with its parent's
    /// (0.4 s instead of 1.7 s for the kernel layer).
    ///
    /// Fails, storing nothing, when the upper directory uses overlayfs features this
    /// cannot express (redirected directories, metadata-only copies); the caller then
    /// uses [`Cache::store`].
    pub fn store_overlay(
        &self,
        stage: &str,
        key: &str,
        lower: &Path,
        upper: &Path,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if self.entry(stage, key).join("COMPLETE").exists() {
            return Ok(());
        }
        let (tmp, _tmp_guard) = self.temp_entry(stage)?;
        let dest = tmp.join("rootfs");
        Cmd::new("cp").arg("-al").arg(lower).arg(&dest).run()?;
        overlay_upper::apply(upper, &dest)?;
        self.publish(&tmp, stage, key)
    }

    /// A journaled temporary directory for a new entry of `stage`: a killed build's
    /// half-written entry is removed by `gc`, or by the guard on any other exit.
    fn temp_entry(&self, stage: &str) -> anyhow::Result<(PathBuf, crate::build::WorkDir)> {
        let tmp = self.dir.join(format!(
            ".tmp-{stage}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let guard = crate::build::WorkDir::create(&tmp)?;
        Ok((tmp, guard))
    }

    /// Writes the metadata of the temporary entry `tmp` (its `rootfs` filled) and
    /// renames it into place under the exclusive lock, unless a complete entry for
    /// `key` appeared meanwhile: a half-written entry is never served.
    fn publish(&self, tmp: &Path, stage: &str, key: &str) -> anyhow::Result<()> {
        std::fs::write(tmp.join("KEY"), key)?;
        std::fs::write(tmp.join("STAGE"), stage)?;
        let now = now_secs().to_string();
        std::fs::write(tmp.join("CREATED"), &now)?;
        std::fs::write(tmp.join("LAST_USED"), &now)?;
        std::fs::write(tmp.join("COMPLETE"), b"")?;
        let entry = self.entry(stage, key);
        let _lock = self.lock(true)?;
        if entry.join("COMPLETE").exists() {
            return Ok(());
        }
        if entry.exists() {
            fsutil::remove_tree(&entry)?;
        }
        std::fs::rename(tmp, &entry)?;
        Ok(())
    }

    /// Takes the cache lock: shared for readers, exclusive for writers.
    fn lock(&self, exclusive: bool) -> anyhow::Result<Lock> {
        std::fs::create_dir_all(&self.dir)?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        Lock::lock(f, arg).map_err(|(_, e)| {
            anyhow::anyhow!("cannot lock the cache at {}: {e}", self.dir.display())
        })
    }

    /// Every complete entry, with its own and its exclusive size, least recently
    /// used first; and the bytes the whole cache holds.
    pub fn entries(&self) -> anyhow::Result<(Vec<EntryInfo>, u64)> {
        let _lock = self.lock(false)?;
        self.scan()
    }

    fn scan(&self) -> anyhow::Result<(Vec<EntryInfo>, u64)> {
        let s = self.scan_inodes()?;
        Ok((s.infos, s.total))
    }

    /// One walk over every complete entry: its info, and the inodes it holds (layers
    /// share files through hard links, so sizes are counted per inode).
    fn scan_inodes(&self) -> anyhow::Result<Scan> {
        use std::collections::HashMap;
        use std::os::unix::fs::MetadataExt;
        let mut infos = Vec::new();
        let mut files_of: Vec<Vec<Inode>> = Vec::new();
        // inode -> (bytes, how many entries hold it)
        let mut inodes: HashMap<Inode, (u64, usize)> = HashMap::new();
        let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("COMPLETE").exists())
                .collect(),
            Err(_) => Vec::new(),
        };
        dirs.sort();
        for dir in dirs {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let stage = match read("STAGE") {
                s if !s.is_empty() => s,
                // Entries of the first cache version have no STAGE file.
                _ => name.rsplit_once('-').map(|(s, _)| s).unwrap_or("").into(),
            };
            let mtime = std::fs::metadata(dir.join("COMPLETE"))
                .map(|m| m.mtime().max(0) as u64)
                .unwrap_or(0);
            let created = read("CREATED").trim().parse().unwrap_or(mtime);
            let last_used = read("LAST_USED").trim().parse().unwrap_or(created);
            let mut bytes = 0;
            let mut own = std::collections::HashSet::new();
            for item in walk(&dir) {
                let Ok(m) = std::fs::symlink_metadata(&item) else {
                    continue;
                };
                let b = m.blocks() * 512;
                bytes += b;
                let id = (m.dev(), m.ino());
                if own.insert(id) {
                    inodes.entry(id).or_insert((b, 0)).1 += 1;
                }
            }
            files_of.push(own.into_iter().collect());
            infos.push(EntryInfo {
                name,
                stage,
                key: read("KEY").trim().to_owned(),
                created,
                last_used,
                bytes,
                exclusive_bytes: 0,
            });
        }
        for (info, files) in infos.iter_mut().zip(&files_of) {
            info.exclusive_bytes = files
                .iter()
                .filter_map(|id| inodes.get(id))
                .filter(|(_, holders)| *holders == 1)
                .map(|(b, _)| b)
                .sum();
        }
        let total = inodes.values().map(|(b, _)| b).sum();
        // Least recently used first.
        let mut entries: Vec<(EntryInfo, Vec<Inode>)> = infos.into_iter().zip(files_of).collect();
        entries.sort_by_key(|(i, _)| (i.last_used, i.created));
        let (infos, files_of) = entries.into_iter().unzip();
        Ok(Scan {
            infos,
            files_of,
            inodes,
            total,
        })
    }

    /// Removes least recently used entries until the cache holds at most
    /// `max_bytes`, and leftovers of dead writers. Returns the removed entries and
    /// the bytes the cache holds afterwards. With `dry_run`, removes nothing.
    pub fn prune(&self, max_bytes: u64, dry_run: bool) -> anyhow::Result<(Vec<EntryInfo>, u64)> {
        let _lock = self.lock(true)?;
        if !dry_run {
            self.remove_dead_temps();
        }
        let Scan {
            infos,
            files_of,
            mut inodes,
            mut total,
        } = self.scan_inodes()?;
        let mut removed = Vec::new();
        for (info, files) in infos.into_iter().zip(files_of) {
            if total <= max_bytes {
                break;
            }
            let dir = self.dir.join(&info.name);
            // A build has the entry mounted as its tree: leave it alone.
            // (Builds take the entry's lock under the cache lock, which prune holds.)
            let held = std::fs::File::open(&dir)
                .map(|f| Lock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock));
            if matches!(held, Ok(Err(_))) {
                tracing::info!("{}: in use by a running build, kept", info.name);
                continue;
            }
            // An inode is freed when the last entry holding it goes.
            for id in files {
                if let Some(e) = inodes.get_mut(&id) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        total = total.saturating_sub(e.0);
                    }
                }
            }
            if !dry_run {
                // Make the entry incomplete first: never served half-removed.
                std::fs::remove_file(dir.join("COMPLETE"))?;
                fsutil::remove_tree(&dir)?;
            }
            removed.push(info);
        }
        Ok((removed, total))
    }

    /// `.tmp-*` directories of writers that are no longer running.
    fn remove_dead_temps(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(".tmp-") else {
                continue;
            };
            // .tmp-<stage>-<pid>-<rand>; the stage name may contain '-'.
            let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| crate::journal::process_start_time(p).is_none()) {
                let _ = fsutil::remove_tree(&e.path());
            }
        }
    }
}

/// Every path below `dir` (not following symlinks), `dir` included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        let is_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            if let Ok(rd) = std::fs::read_dir(&p) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

/// Copies a tree preserving owners, modes, links, xattrs; reflinks where the
/// filesystem can.
pub fn copy_tree(src: &Path, dest: &Path) -> anyhow::Result<()> {
    Cmd::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(src)
        .arg(dest)
        .run()?;
    Ok(())
}

/// Copies `src` to `dest` as a cache layer: with rsync, files unchanged since
/// `link_dest` (same size, nanosecond mtime, mode, owner, xattrs) become hard links
/// to it. Without rsync, a full copy.
fn copy_layer(src: &Path, dest: &Path, link_dest: Option<&Path>) -> anyhow::Result<()> {
    if crate::host::fsutil::which("rsync").is_none() {
        tracing::info!("rsync not found: cache layers are stored as full copies");
        return copy_tree(src, dest);
    }
    let mut c = Cmd::new("rsync").args([
        "-aHAX",
        "--numeric-ids",
        // Compare nanoseconds too: a file rewritten within the same second with the
        // same size must not be taken for the parent's.
        "--modify-window=-1",
    ]);
    if let Some(l) = link_dest {
        c = c.arg(format!(
            "--link-dest={}",
            crate::host::fsutil::absolute(l).display()
        ));
    }
    let mut s = src.as_os_str().to_owned();
    s.push("/");
    c.arg(s).arg(dest).run()?;
    Ok(())
}

/// Applying an overlayfs upper directory to a copy of its lower tree, the way the
/// overlay shows it: whiteouts (character devices 0/0) delete, an opaque directory
/// (`trusted.overlay.opaque=y`) replaces the lower one, anything else replaces or adds.
mod overlay_upper {
    use crate::host::{fsutil, Cmd};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};

    const PREFIX: &str = "trusted.overlay.";

    fn c_path(p: &Path) -> std::io::Result<CString> {
        CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
    }

    /// Names of the extended attributes of `p` (not following a symlink).
    fn xattr_names(p: &Path) -> std::io::Result<Vec<String>> {
        let c = c_path(p)?;
        // SAFETY: a valid C string; a null buffer of size 0 asks for the size.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: the buffer is as long as we say.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    fn xattr_value(p: &Path, name: &str) -> Option<Vec<u8>> {
        let (c, n) = (c_path(p).ok()?, CString::new(name).ok()?);
        let mut buf = vec![0u8; 256];
        // SAFETY: valid C strings and a buffer as long as we say.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (r >= 0).then(|| {
            buf.truncate(r as usize);
            buf
        })
    }

    fn remove_xattr(p: &Path, name: &str) -> std::io::Result<()> {
        let (c, n) = (
            c_path(p)?,
            CString::new(name).map_err(std::io::Error::other)?,
        );
        // SAFETY: valid C strings.
        if unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn remove_any(p: &Path) -> std::io::Result<()> {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fsutil::remove_tree(p).map_err(std::io::Error::other),
            Ok(_) => std::fs::remove_file(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    #[cfg(test)]
    pub fn xattr_names_for_tests(p: &Path) -> Vec<String> {
        xattr_names(p).unwrap()
    }

    #[cfg(test)]
    pub fn set_xattr_for_tests(p: &Path, name: &str, value: &[u8]) {
        let (c, n) = (c_path(p).unwrap(), CString::new(name).unwrap());
        // SAFETY: valid C strings and a value buffer as long as we say.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr {}", std::io::Error::last_os_error());
    }

    fn is_whiteout(m: &std::fs::Metadata) -> bool {
        m.file_type().is_char_device() && m.rdev() == 0
    }

    /// Makes `dest` (a hard-linked copy of the lower tree) what the overlay of it and
    /// `upper` shows.
    pub fn apply(upper: &Path, dest: &Path) -> anyhow::Result<()> {
        // 1. Delete in `dest` what the upper layer deletes or replaces. Every file the
        //    upper layer has is unlinked first, even one with the same content: the
        //    copy below then makes a new file and never writes through a hard link
        //    into the lower layer's entry.
        // The root too: its attributes are the upper directory's in the overlay.
        let mut entries = vec![(PathBuf::new(), false)];
        prepare(upper, dest, Path::new(""), &mut entries)?;
        // 2. Copy the upper layer over it (owners, modes, times, xattrs, hard links).
        let mut src = upper.as_os_str().to_owned();
        src.push("/.");
        Cmd::new("cp").arg("-a").arg(src).arg(dest).run()?;
        // 3. The whiteouts came along as device nodes, and overlayfs' own attributes as
        //    xattrs: remove both.
        for (rel, whiteout) in entries {
            let p = dest.join(&rel);
            if whiteout {
                remove_any(&p)?;
                continue;
            }
            for name in xattr_names(&p)? {
                if name.starts_with(PREFIX) {
                    remove_xattr(&p, &name)?;
                }
            }
        }
        Ok(())
    }

    fn prepare(
        upper: &Path,
        dest: &Path,
        rel: &Path,
        entries: &mut Vec<(PathBuf, bool)>,
    ) -> anyhow::Result<()> {
        for e in std::fs::read_dir(upper.join(rel))? {
            let r = rel.join(e?.file_name());
            let (u, d) = (upper.join(&r), dest.join(&r));
            let m = std::fs::symlink_metadata(&u)?;
            if is_whiteout(&m) {
                remove_any(&d)?;
                entries.push((r, true));
                continue;
            }
            let names = xattr_names(&u)?;
            if let Some(n) = names
                .iter()
                .find(|n| *n == "trusted.overlay.redirect" || *n == "trusted.overlay.metacopy")
            {
                anyhow::bail!("{} has {n}: not applied file by file", u.display());
            }
            if m.is_dir() {
                let opaque = xattr_value(&u, "trusted.overlay.opaque").as_deref() == Some(b"y");
                let dest_is_dir = std::fs::symlink_metadata(&d).is_ok_and(|dm| dm.is_dir());
                if opaque || !dest_is_dir {
                    remove_any(&d)?;
                }
                entries.push((r.clone(), false));
                prepare(upper, dest, &r, entries)?;
            } else {
                remove_any(&d)?;
                entries.push((r, false));
            }
        }
        Ok(())
    }
}

/// Parses sizes like `5G`, `500M`, `1024` (MiB when no unit), `0`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in `{s}` (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        None => (t, 1 << 20),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 5G, 500M)"))?;
    if n < 0.0 {
        return Err(format!("`{s}`: a size cannot be negative"));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_is_stable_and_depends_on_every_input() {
        let a = chain_key(
            None,
            "debootstrap",
            &json!({"suite": "bookworm", "arch": "amd64"}),
        );
        // Same inputs, different insertion order: same key.
        let b = chain_key(
            None,
            "debootstrap",
            &json!({"arch": "amd64", "suite": "bookworm"}),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        assert_ne!(
            a,
            chain_key(
                None,
                "debootstrap",
                &json!({"suite": "trixie", "arch": "amd64"})
            )
        );
        assert_ne!(
            a,
            chain_key(
                Some("x"),
                "debootstrap",
                &json!({"suite": "bookworm", "arch": "amd64"})
            )
        );
        assert_ne!(
            a,
            chain_key(
                None,
                "kernel",
                &json!({"suite": "bookworm", "arch": "amd64"})
            )
        );
        // A fixed value guards against accidental changes of the key scheme, which
        // would silently invalidate every user's cache.
        assert_eq!(
            chain_key(None, "t", &json!({})),
            chain_key(None, "t", &serde_json::from_str("{}").unwrap())
        );
    }

    #[test]
    fn store_then_restore_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "x\n").unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        assert!(!cache.contains("s", "k1"));
        cache.store("s", "k1", &tree, None).unwrap();
        assert!(cache.contains("s", "k1"));
        let out = d.path().join("out");
        cache.restore("s", "k1", &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("etc/hostname")).unwrap(),
            "x\n"
        );
    }

    fn tree_with(dir: &Path, files: &[(&str, usize)]) {
        for (name, size) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![b'x'; *size]).unwrap();
        }
    }

    #[test]
    fn a_layer_shares_unchanged_files_with_its_parent() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        tree_with(&tree, &[("usr/big", 1 << 20), ("etc/conf", 10)]);
        let cache = Cache::new(&d.path().join("cache"));
        cache.store("base", "k1", &tree, None).unwrap();
        // The next stage changes one small file and adds one.
        std::thread::sleep(std::time::Duration::from_millis(5));
        tree_with(&tree, &[("etc/conf", 11), ("etc/new", 100)]);
        cache
            .store("svc", "k2", &tree, Some(("base", "k1")))
            .unwrap();
        let a = cache.entry("base", "k1").join("rootfs");
        let b = cache.entry("svc", "k2").join("rootfs");
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        if crate::host::fsutil::which("rsync").is_some() {
            assert_eq!(ino(a.join("usr/big")), ino(b.join("usr/big")));
        }
        assert_ne!(ino(a.join("etc/conf")), ino(b.join("etc/conf")));
        assert_eq!(std::fs::read(b.join("etc/conf")).unwrap().len(), 11);
        assert_eq!(std::fs::read(a.join("etc/conf")).unwrap().len(), 10);

        let (entries, total) = cache.entries().unwrap();
        assert_eq!(entries.len(), 2);
        let svc = entries.iter().find(|e| e.stage == "svc").unwrap();
        assert_eq!(svc.key, "k2");
        assert!(svc.bytes >= 1 << 20);
        if crate::host::fsutil::which("rsync").is_some() {
            // The shared 1 MiB counts once in the total and for neither entry alone.
            assert!(svc.exclusive_bytes < 64 << 10, "{svc:?}");
            assert!(total < (1 << 20) + (256 << 10), "{total}");
        }

        // Restoring the layer gives an independent copy.
        let out = d.path().join("out");
        cache.restore("svc", "k2", &out).unwrap();
        std::fs::write(out.join("usr/big"), b"changed").unwrap();
        assert_eq!(std::fs::read(b.join("usr/big")).unwrap().len(), 1 << 20);
    }

    #[test]
    fn prune_removes_least_recently_used_until_under_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        for (i, k) in ["old", "mid", "new"].iter().enumerate() {
            let t = d.path().join(k);
            tree_with(&t, &[("f", 256 << 10)]);
            cache.store("s", k, &t, None).unwrap();
            std::fs::write(
                cache.entry("s", k).join("LAST_USED"),
                (1000 + i).to_string(),
            )
            .unwrap();
        }
        let (_, total) = cache.entries().unwrap();
        // A dry run removes nothing.
        let (would, _) = cache.prune(total - 1, true).unwrap();
        assert_eq!(would.len(), 1);
        assert!(cache.contains("s", "old"));
        let (removed, left) = cache.prune(total - 1, false).unwrap();
        assert_eq!(
            removed.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["old"]
        );
        assert!(left < total);
        assert!(!cache.contains("s", "old"));
        assert!(cache.contains("s", "mid") && cache.contains("s", "new"));
        let (removed, left) = cache.prune(0, false).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(left < 64 << 10, "{left}");
        assert!(cache.entries().unwrap().0.is_empty());
    }

    #[test]
    fn a_mounted_layer_takes_changes_without_touching_the_entry_and_is_kept_by_prune() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "cached\n").unwrap();
        std::fs::write(tree.join("etc/gone"), "x").unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        cache.store("s", "k1", &tree, None).unwrap();
        let dest = d.path().join("work/rootfs");
        let layer = cache
            .mount_layer("s", "k1", &dest, &d.path().join("work/layer"))
            .unwrap();
        let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            mounted.contains(&format!("{} ", dest.display())),
            "not mounted as an overlay (not root, or no overlayfs?)"
        );
        // Changes in place, by rename and by removal all reach the tree only.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(dest.join("etc/hostname"))
            .unwrap()
            .write_all(b"appended\n")
            .unwrap();
        std::fs::remove_file(dest.join("etc/gone")).unwrap();
        std::fs::write(dest.join("etc/new"), "n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("etc/hostname")).unwrap(),
            "cached\nappended\n"
        );
        let entry = cache.entry("s", "k1").join("rootfs");
        assert_eq!(
            std::fs::read_to_string(entry.join("etc/hostname")).unwrap(),
            "cached\n"
        );
        assert!(entry.join("etc/gone").exists() && !entry.join("etc/new").exists());
        // In use: prune keeps it, whatever the limit.
        let (removed, _) = cache.prune(0, false).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(cache.contains("s", "k1"));
        drop(layer);
        let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounted.contains(dest.to_str().unwrap()),
            "still mounted after drop"
        );
        let (removed, _) = cache.prune(0, false).unwrap();
        assert_eq!(removed.len(), 1);
    }

    /// What a tree holds, path by path: kind, mode, owner, times, content or link
    /// target, and xattrs (not inode numbers or link counts).
    fn describe_tree(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let body = if m.is_dir() {
                    stack.push(p.clone());
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_file() {
                    format!("{:?}", std::fs::read(&p).unwrap())
                } else {
                    format!("special {:o} {}", m.mode(), m.rdev())
                };
                let mut xattrs = super::overlay_upper::xattr_names_for_tests(&p);
                xattrs.sort();
                let times = if m.is_dir() {
                    String::new()
                } else {
                    format!("{}.{}", m.mtime(), m.mtime_nsec())
                };
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    format!(
                        "{:o} {}:{} {times} {body} {xattrs:?}",
                        m.mode(),
                        m.uid(),
                        m.gid()
                    ),
                );
            }
        }
        out
    }

    #[test]
    fn an_overlay_is_stored_as_it_shows_and_its_lower_entry_is_untouched() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        tree_with(
            &tree,
            &[
                ("etc/keep", 10),
                ("etc/edit", 10),
                ("etc/mode", 10),
                ("etc/gone", 10),
                ("gone-dir/a/b", 10),
                ("opaque/old", 10),
                ("dir-to-file/f", 10),
                ("file-to-dir", 10),
                ("usr/untouched", 10),
            ],
        );
        std::os::unix::fs::symlink("/etc/keep", tree.join("etc/link")).unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        cache.store("base", "k1", &tree, None).unwrap();
        let base = cache.entry("base", "k1").join("rootfs");
        let base_before = describe_tree(&base);
        let dest = d.path().join("work/rootfs");
        let layer = cache
            .mount_layer("base", "k1", &dest, &d.path().join("work/layer"))
            .unwrap();
        let (lower, upper) = layer.overlay_dirs().expect("not an overlay (not root?)");
        let (lower, upper) = (lower.to_path_buf(), upper.to_path_buf());

        // Every kind of change a stage makes, through the overlay.
        use std::io::Write;
        let append = |p: &str| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(dest.join(p))
                .unwrap()
                .write_all(b"more")
                .unwrap()
        };
        append("etc/edit");
        std::fs::set_permissions(
            dest.join("etc/mode"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_file(dest.join("etc/gone")).unwrap();
        std::fs::remove_dir_all(dest.join("gone-dir")).unwrap();
        std::fs::remove_dir_all(dest.join("opaque")).unwrap();
        tree_with(&dest, &[("opaque/new", 3)]);
        std::fs::remove_dir_all(dest.join("dir-to-file")).unwrap();
        std::fs::write(dest.join("dir-to-file"), "f").unwrap();
        std::fs::remove_file(dest.join("file-to-dir")).unwrap();
        tree_with(&dest, &[("file-to-dir/inner", 4), ("new/deep/file", 5)]);
        std::fs::write(dest.join("etc/hl1"), "linked").unwrap();
        std::fs::hard_link(dest.join("etc/hl1"), dest.join("etc/hl2")).unwrap();
        std::os::unix::fs::symlink("/etc/edit", dest.join("etc/link2")).unwrap();
        std::fs::remove_file(dest.join("etc/link")).unwrap();
        std::os::unix::fs::symlink("/etc/new-target", dest.join("etc/link")).unwrap();
        super::overlay_upper::set_xattr_for_tests(&dest.join("etc/keep"), "user.mkimage", b"1");

        cache.store_overlay("svc", "k2", &lower, &upper).unwrap();
        // The reference: a plain copy of what the overlay shows.
        cache.store("ref", "k3", &dest, None).unwrap();
        let svc = cache.entry("svc", "k2").join("rootfs");
        let reference = cache.entry("ref", "k3").join("rootfs");
        assert_eq!(describe_tree(&svc), describe_tree(&reference));
        assert_eq!(describe_tree(&base), base_before, "the lower entry changed");
        // Unchanged files are shared with the lower entry; changed ones are not.
        let ino = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
        assert_eq!(
            ino(&base.join("usr/untouched")),
            ino(&svc.join("usr/untouched"))
        );
        assert_ne!(ino(&base.join("etc/edit")), ino(&svc.join("etc/edit")));
        assert_ne!(ino(&base.join("etc/mode")), ino(&svc.join("etc/mode")));
        assert_eq!(ino(&svc.join("etc/hl1")), ino(&svc.join("etc/hl2")));
        drop(layer);
    }

    #[test]
    fn an_adopted_tree_becomes_the_entry_and_stays_usable_in_place() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("work/rootfs");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "base\n").unwrap();
        let cache = Cache::new(&d.path().join("cache"));
        let layer = cache
            .adopt("s", "k1", &tree, &d.path().join("work/layer"))
            .unwrap()
            .expect("same filesystem: the tree is moved");
        assert!(cache.contains("s", "k1"));
        // The next stage writes to the tree; the entry keeps what the stage left.
        std::fs::write(tree.join("etc/hostname"), "changed\n").unwrap();
        let entry = cache.entry("s", "k1").join("rootfs");
        assert_eq!(
            std::fs::read_to_string(entry.join("etc/hostname")).unwrap(),
            "base\n"
        );
        drop(layer);
        assert!(!std::fs::read_dir(cache.dir())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")));
    }

    #[test]
    fn concurrent_stores_of_one_layer_leave_one_complete_entry() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        tree_with(&tree, &[("a", 4096), ("b/c", 4096)]);
        let dir = d.path().join("cache");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (dir, tree) = (dir.clone(), tree.clone());
                std::thread::spawn(move || Cache::new(&dir).store("s", "k", &tree, None))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        let cache = Cache::new(&dir);
        assert!(cache.contains("s", "k"));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5G").unwrap(), 5 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("12").unwrap(), 12 << 20);
        assert!(parse_size("5X").is_err());
        assert!(parse_size("lots").is_err());
    }
}
