//! Read-only ISO 9660 reader (Joliet names), enough to read a few small files from a config
//! drive or an OpenNebula context CD without mounting it.
//!
//! Why: mounting needs the `isofs` kernel module, which minimal or container kernels may lack;
//! reading the image directly works on any block device or file. Config drives (`genisoimage
//! … -J -r -V config-2`) and OpenNebula context CDs (`mkisofs -J -R -V CONTEXT`) both carry a
//! Joliet tree. Images without Joliet are reported as such so the caller can fall back to
//! mounting.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const SECTOR: u64 = 2048;
/// Largest file read (meta_data.json and user_data are small; Nova caps user_data at 64 KiB).
const MAX_FILE: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("not an ISO 9660 image")]
    NotIso,
    #[error("ISO 9660 image without a Joliet tree")]
    NoJoliet,
    #[error("corrupt ISO 9660 image: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    lba: u32,
    size: u32,
    dir: bool,
}

pub struct Iso {
    f: File,
    what: String,
    root: Entry,
}

fn read_at(f: &mut File, what: &str, off: u64, buf: &mut [u8]) -> Result<(), IsoError> {
    f.seek(SeekFrom::Start(off))
        .and_then(|_| f.read_exact(buf))
        .map_err(|e| IsoError::Io(what.to_string(), e))
}

/// The volume label of the primary volume descriptor, if `dev` is an ISO 9660 image.
pub fn volume_label(dev: &Path) -> Option<String> {
    let mut f = File::open(dev).ok()?;
    let mut pvd = [0u8; SECTOR as usize];
    read_at(&mut f, "", 16 * SECTOR, &mut pvd).ok()?;
    if pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    Some(String::from_utf8_lossy(&pvd[40..72]).trim_end().to_string())
}

fn dir_record(r: &[u8], joliet: bool) -> Result<Entry, IsoError> {
    if r.len() < 34 {
        return Err(IsoError::Corrupt("short directory record".into()));
    }
    let lba = u32::from_le_bytes(r[2..6].try_into().unwrap());
    let size = u32::from_le_bytes(r[10..14].try_into().unwrap());
    let dir = r[25] & 0x02 != 0;
    let nlen = r[32] as usize;
    let raw = r
        .get(33..33 + nlen)
        .ok_or_else(|| IsoError::Corrupt("name past record".into()))?;
    let mut name = if nlen == 1 && (raw[0] == 0 || raw[0] == 1) {
        String::from(if raw[0] == 0 { "." } else { ".." })
    } else if joliet {
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(raw).into_owned()
    };
    if let Some(p) = name.rfind(';') {
        name.truncate(p);
    }
    Ok(Entry {
        name,
        lba,
        size,
        dir,
    })
}

impl Iso {
    /// Opens an image (file or block device) and locates its Joliet root directory.
    pub fn open(path: &Path) -> Result<Iso, IsoError> {
        let what = path.display().to_string();
        let mut f = File::open(path).map_err(|e| IsoError::Io(what.clone(), e))?;
        let mut seen_pvd = false;
        for i in 16..64u64 {
            let mut vd = [0u8; SECTOR as usize];
            if read_at(&mut f, &what, i * SECTOR, &mut vd).is_err() {
                break;
            }
            if &vd[1..6] != b"CD001" {
                break;
            }
            match vd[0] {
                1 => seen_pvd = true,
                2 if vd[88] == 0x25 && vd[89] == 0x2f && matches!(vd[90], 0x40 | 0x43 | 0x45) => {
                    let root = dir_record(&vd[156..190], true)?;
                    return Ok(Iso { f, what, root });
                }
                255 => break,
                _ => {}
            }
        }
        Err(if seen_pvd {
            IsoError::NoJoliet
        } else {
            IsoError::NotIso
        })
    }

    fn list(&mut self, d: &Entry) -> Result<Vec<Entry>, IsoError> {
        if d.size > MAX_FILE {
            return Err(IsoError::Corrupt("directory too large".into()));
        }
        let mut buf = vec![0u8; d.size as usize];
        read_at(&mut self.f, &self.what, d.lba as u64 * SECTOR, &mut buf)?;
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < buf.len() {
            let len = buf[i] as usize;
            if len == 0 {
                // Records never cross sectors: skip the padding to the next one.
                i = (i / SECTOR as usize + 1) * SECTOR as usize;
                continue;
            }
            let r = buf
                .get(i..i + len)
                .ok_or_else(|| IsoError::Corrupt("record past directory end".into()))?;
            out.push(dir_record(r, true)?);
            i += len;
        }
        Ok(out)
    }

    /// Reads the file at `path` (components separated by `/`, case-sensitive); `None` if absent.
    pub fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, IsoError> {
        let mut cur = self.root.clone();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (k, c) in comps.iter().enumerate() {
            if !cur.dir {
                return Ok(None);
            }
            let Some(e) = self.list(&cur)?.into_iter().find(|e| e.name == *c) else {
                return Ok(None);
            };
            if k + 1 < comps.len() && !e.dir {
                return Ok(None);
            }
            cur = e;
        }
        if cur.dir {
            return Ok(None);
        }
        if cur.size > MAX_FILE {
            return Err(IsoError::Corrupt(format!("{path}: file too large")));
        }
        let mut buf = vec![0u8; cur.size as usize];
        read_at(&mut self.f, &self.what, cur.lba as u64 * SECTOR, &mut buf)?;
        Ok(Some(buf))
    }
}
