//! Image integrity: one streaming read feeds MD5 (what the original published)
//! and SHA-256; `MD5SUMS`/`SHA256SUMS` in coreutils format; checks against a
//! manifest or given digests.

use crate::manifest::Manifest;
use md5::Md5;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub md5: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A piece of the file for the hashers: `len` bytes at the start of `buf`.
type Piece = (Arc<Vec<u8>>, usize);

/// SHA-256 of a file alone, hex: for cache keys and manifests inside artefacts, where
/// no MD5 is wanted (it would take longer than the SHA-256).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Reads `path` once, computing both digests. `progress` gets the bytes read so far.
///
/// The file is read in 4 MiB chunks by this thread while MD5 and SHA-256 run on one
/// thread each: the two hashes together cost more CPU than the read, so on a
/// multi-core host this is close to the speed of the slower hash alone. Chunk buffers
/// are reused once both hashers are done with them, and the holes of a sparse image
/// (most of a fresh disk image) are not read at all: the hashers get a shared buffer
/// of zeros instead. That leaves the second core to SHA-256 and the writeback.
pub fn digest_file(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<Digests> {
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc::sync_channel;
    const CHUNK: usize = 4 << 20;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let (md5_tx, md5_rx) = sync_channel::<Piece>(4);
    let (sha_tx, sha_rx) = sync_channel::<Piece>(4);
    let md5_thread = std::thread::spawn(move || {
        let mut h = Md5::new();
        for (buf, n) in md5_rx {
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    });
    let sha_thread = std::thread::spawn(move || {
        let mut h = Sha256::new();
        for (buf, n) in sha_rx {
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    });
    let zeros: Arc<Vec<u8>> = Arc::new(vec![0u8; CHUNK]);
    let mut pool: Vec<Arc<Vec<u8>>> = Vec::new();
    let mut total = 0u64;
    let mut send = |piece: Piece, total: &mut u64| -> std::io::Result<()> {
        *total += piece.1 as u64;
        // A send fails only if a hasher thread died; its join below reports it.
        let _ = md5_tx.send(piece.clone());
        let _ = sha_tx.send(piece);
        progress(*total);
        if crate::host::signals::interrupted() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted",
            ));
        }
        Ok(())
    };
    let read_result = (|| -> std::io::Result<()> {
        let mut pos = 0u64;
        while pos < len {
            let (data, hole) = data_extent(&f, pos, len);
            // Zeros up to the next data, without reading them.
            while pos < data {
                let n = (data - pos).min(CHUNK as u64) as usize;
                send((zeros.clone(), n), &mut total)?;
                pos += n as u64;
            }
            while pos < hole {
                // A buffer no hasher holds any more, or a new one.
                let mut buf = match pool.iter().position(|b| Arc::strong_count(b) == 1) {
                    Some(i) => pool.swap_remove(i),
                    None => Arc::new(vec![0u8; CHUNK]),
                };
                let want = (hole - pos).min(CHUNK as u64) as usize;
                let b = Arc::get_mut(&mut buf).expect("a pooled buffer is not shared");
                let mut filled = 0;
                while filled < want {
                    let n = f.read_at(&mut b[filled..want], pos + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    // The file shrank under us: hash what there was.
                    return Ok(());
                }
                pool.push(buf.clone());
                send((buf, filled), &mut total)?;
                pos += filled as u64;
            }
        }
        Ok(())
    })();
    drop(md5_tx);
    drop(sha_tx);
    let md5 = md5_thread
        .join()
        .map_err(|_| std::io::Error::other("MD5 thread panicked"))?;
    let sha256 = sha_thread
        .join()
        .map_err(|_| std::io::Error::other("SHA-256 thread panicked"))?;
    read_result?;
    Ok(Digests {
        md5,
        sha256,
        bytes: total,
    })
}

/// The next data extent at or after `pos`: `(start, end)`; `(len, len)` when only a
/// hole is left. Where the filesystem cannot tell, all of the rest is data.
fn data_extent(f: &std::fs::File, pos: u64, len: u64) -> (u64, u64) {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let data = match lseek(fd, pos as i64, Whence::SeekData) {
        Ok(d) => (d as u64).min(len),
        Err(nix::errno::Errno::ENXIO) => return (len, len),
        Err(_) => return (pos, len),
    };
    let hole = match lseek(fd, data as i64, Whence::SeekHole) {
        Ok(h) => (h as u64).min(len),
        Err(_) => len,
    };
    (data, hole.max(data))
}

/// Adds or replaces the line for `file` in a coreutils-format sums file (`HEX  NAME`).
pub fn update_sums_file(sums: &Path, file: &str, hex_digest: &str) -> std::io::Result<()> {
    let existing = std::fs::read_to_string(sums).unwrap_or_default();
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| parse_sums_line(l).map(|(_, n)| n != file).unwrap_or(true))
        .map(str::to_owned)
        .collect();
    lines.push(format!("{hex_digest}  {file}"));
    let tmp = sums.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n")?;
    std::fs::rename(tmp, sums)
}

/// Parses `HEX  NAME` or `HEX *NAME` (binary mode marker).
pub fn parse_sums_line(line: &str) -> Option<(&str, &str)> {
    let (hex, rest) = line.split_once(' ')?;
    let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((hex, name))
}

/// Looks `file` up in a sums file.
pub fn lookup_sums(sums: &Path, file: &str) -> Option<String> {
    let text = std::fs::read_to_string(sums).ok()?;
    text.lines()
        .filter_map(parse_sums_line)
        .find(|(_, n)| *n == file)
        .map(|(h, _)| h.to_ascii_lowercase())
}

/// What an image is expected to hash to, and where that expectation came from.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub md5: Option<String>,
    pub sha256: Option<String>,
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no expected digest for {0}: give --md5/--sha256, or keep the manifest or MD5SUMS/SHA256SUMS beside it")]
    NoExpectation(PathBuf),
    #[error("{kind} mismatch for {path}: expected {expected} ({source_}), got {actual}")]
    Mismatch {
        path: PathBuf,
        kind: &'static str,
        expected: String,
        actual: String,
        source_: String,
    },
}

impl Expected {
    /// Finds expectations beside the image: its manifest first, then MD5SUMS/SHA256SUMS.
    pub fn beside(image: &Path) -> Expected {
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let manifest = Manifest::path_for(image);
        if let Ok(m) = Manifest::load(&manifest) {
            if let Some(a) = m.artefact(&name) {
                return Expected {
                    md5: Some(a.md5.clone()),
                    sha256: Some(a.sha256.clone()),
                    source: manifest.display().to_string(),
                };
            }
        }
        let dir = image.parent().unwrap_or(Path::new("."));
        Expected {
            md5: lookup_sums(&dir.join("MD5SUMS"), &name),
            sha256: lookup_sums(&dir.join("SHA256SUMS"), &name),
            source: format!("{}/{{MD5,SHA256}}SUMS", dir.display()),
        }
    }

    pub fn from_manifest(manifest: &Path, image: &Path) -> anyhow::Result<Expected> {
        let m = Manifest::load(manifest)?;
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let a = m.artefact(&name).ok_or_else(|| {
            anyhow::anyhow!(
                "manifest {} has no artefact named {name}",
                manifest.display()
            )
        })?;
        Ok(Expected {
            md5: Some(a.md5.clone()),
            sha256: Some(a.sha256.clone()),
            source: manifest.display().to_string(),
        })
    }
}

/// Hashes `image` once and compares with every expected digest.
pub fn verify(
    image: &Path,
    expected: &Expected,
    progress: impl FnMut(u64),
) -> Result<Digests, VerifyError> {
    if expected.md5.is_none() && expected.sha256.is_none() {
        return Err(VerifyError::NoExpectation(image.to_owned()));
    }
    let got = digest_file(image, progress).map_err(|source| VerifyError::Io {
        path: image.to_owned(),
        source,
    })?;
    let checks = [
        ("MD5", &expected.md5, &got.md5),
        ("SHA-256", &expected.sha256, &got.sha256),
    ];
    for (kind, want, have) in checks {
        if let Some(want) = want {
            if !want.eq_ignore_ascii_case(have) {
                return Err(VerifyError::Mismatch {
                    path: image.to_owned(),
                    kind,
                    expected: want.to_ascii_lowercase(),
                    actual: have.clone(),
                    source_: expected.source.clone(),
                });
            }
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_known_values() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"abc").unwrap();
        let g = digest_file(&f, |_| {}).unwrap();
        assert_eq!(g.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            g.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(g.bytes, 3);
    }

    #[test]
    fn sums_file_update_replaces_only_that_entry() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("MD5SUMS");
        update_sums_file(&s, "a.img", "aa").unwrap();
        update_sums_file(&s, "b.img", "bb").unwrap();
        update_sums_file(&s, "a.img", "cc").unwrap();
        assert_eq!(
            std::fs::read_to_string(&s).unwrap(),
            "bb  b.img\ncc  a.img\n"
        );
        assert_eq!(lookup_sums(&s, "a.img").as_deref(), Some("cc"));
        assert_eq!(parse_sums_line("ab *x y"), Some(("ab", "x y")));
    }

    #[test]
    fn flipped_byte_is_a_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("img");
        std::fs::write(&f, vec![7u8; 4096]).unwrap();
        let good = digest_file(&f, |_| {}).unwrap();
        let exp = Expected {
            md5: Some(good.md5.clone()),
            sha256: Some(good.sha256.clone()),
            source: "t".into(),
        };
        assert!(verify(&f, &exp, |_| {}).is_ok());
        let mut b = std::fs::read(&f).unwrap();
        b[100] ^= 1;
        std::fs::write(&f, b).unwrap();
        assert!(matches!(
            verify(&f, &exp, |_| {}),
            Err(VerifyError::Mismatch { kind: "MD5", .. })
        ));
        let only_sha = Expected { md5: None, ..exp };
        assert!(matches!(
            verify(&f, &only_sha, |_| {}),
            Err(VerifyError::Mismatch {
                kind: "SHA-256",
                ..
            })
        ));
    }
}
