//! The build manifest written beside every image (`<image>.manifest.json`).
//!
//! It is the one integrity record of an artefact: what was built from what (recipe
//! and stage digests, package list), the file digests at build time, and later what
//! the clouds stored (registrations).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_SUFFIX: &str = ".manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Version of the mkimage that wrote it.
    pub tool_version: String,
    /// Unique id of the build (also used to tag cloud resources).
    pub build_id: String,
    /// RFC 3339 time the build finished.
    pub created: String,
    /// SHA-256 of the canonical JSON of the recipe.
    pub recipe_digest: String,
    /// The recipe itself, as JSON.
    pub recipe: serde_json::Value,
    /// Stage name and cache key, in run order.
    pub stages: Vec<StageRecord>,
    /// `name=version` of every installed Debian package (from dpkg).
    pub packages: Vec<String>,
    /// The files this build wrote.
    pub artefacts: Vec<Artefact>,
    /// What clouds stored when the image was registered.
    #[serde(default)]
    pub registrations: Vec<serde_json::Value>,
    /// Customisations applied after the build (`mkimage preinstall`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preinstall: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub name: String,
    pub key: String,
    pub cached: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Artefact {
    /// File name relative to the manifest's directory.
    pub file: String,
    /// raw, qcow2, vdi, vmdk, ova, ext4, tar.zst
    pub format: String,
    /// Apparent size in bytes.
    pub size: u64,
    /// Allocated bytes on the build host (sparse files are smaller).
    pub allocated: u64,
    pub md5: String,
    pub sha256: String,
}

impl Manifest {
    /// Path of the manifest that belongs to `image`.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut s = image.as_os_str().to_owned();
        s.push(MANIFEST_SUFFIX);
        PathBuf::from(s)
    }

    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read manifest {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("manifest {} is not valid: {e}", path.display()))
    }

    /// Writes the manifest atomically (temp file + rename).
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// The artefact record for a file name.
    pub fn artefact(&self, file: &str) -> Option<&Artefact> {
        self.artefacts.iter().find(|a| a.file == file)
    }
}
