//! Parsing and checking of single recipe values, shared by the TOML reader, the
//! legacy cfg reader and the command-line overrides. Each function returns the
//! message only; the caller adds file, line and key.

use super::{Arch, Cloud, Hypervisor, Layout, OutputFormat};

/// Services mkimage knows how to install.
pub const KNOWN_SERVICES: &[&str] = &[
    "php",
    "mysql",
    "xtreemfs",
    "condor",
    "selenium",
    "hadoop",
    "scalaris",
    "cds",
    "helloworld",
    "generic",
];

/// Debian releases a recipe may name, oldest first.
pub const KNOWN_DISTS: &[&str] = &[
    "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie",
];

/// Releases that parse and plan but that current Debian mirrors no longer carry
/// (everything before bullseye).
pub const UNAVAILABLE_DISTS: &[&str] = &["squeeze", "wheezy", "jessie", "stretch", "buster"];

/// The dist used when the host's release is unknown.
pub const FALLBACK_DIST: &str = "bookworm";

/// Smallest size of a bootable disk image.
pub const MIN_DISK_MIB: u64 = 512;

fn allowed(list: &[&str]) -> String {
    list.join(", ")
}

pub fn cloud(v: &str) -> Result<Cloud, String> {
    match v {
        "ec2" => Ok(Cloud::Ec2),
        "openstack" => Ok(Cloud::Openstack),
        "opennebula" => Ok(Cloud::Opennebula),
        "vbox" => Ok(Cloud::Vbox),
        _ => Err(format!(
            "Unknown cloud `{v}` (allowed: ec2, openstack, opennebula, vbox)"
        )),
    }
}

pub fn hypervisor(v: &str) -> Result<Hypervisor, String> {
    match v {
        "kvm" => Ok(Hypervisor::Kvm),
        "xen" => Ok(Hypervisor::Xen),
        _ => Err(format!("Unknown hypervisor `{v}` (allowed: kvm, xen)")),
    }
}

pub fn arch(v: &str) -> Result<Arch, String> {
    match v {
        "amd64" => Ok(Arch::Amd64),
        "i386" => Ok(Arch::I386),
        _ => Err(format!("Unknown arch `{v}` (allowed: amd64, i386)")),
    }
}

pub fn layout(v: &str) -> Result<Layout, String> {
    match v {
        "disk" => Ok(Layout::Disk),
        "container" => Ok(Layout::Container),
        "nutshell" => Ok(Layout::Nutshell),
        _ => Err(format!(
            "Unknown layout `{v}` (allowed: disk, container, nutshell)"
        )),
    }
}

/// What a Nutshell embeds: `container` or `vm` (returned as the layout of the embedded image).
pub fn embed(v: &str) -> Result<Layout, String> {
    match v {
        "container" => Ok(Layout::Container),
        "vm" => Ok(Layout::Disk),
        _ => Err(format!(
            "Unknown nutshell embed `{v}` (allowed: container, vm)"
        )),
    }
}

pub fn format(v: &str) -> Result<OutputFormat, String> {
    match v {
        "raw" => Ok(OutputFormat::Raw),
        "qcow2" => Ok(OutputFormat::Qcow2),
        "vdi" => Ok(OutputFormat::Vdi),
        "vmdk" => Ok(OutputFormat::Vmdk),
        "tar" => Ok(OutputFormat::Tar),
        "ova" => Ok(OutputFormat::Ova),
        _ => Err(format!(
            "Unknown output format `{v}` (allowed: raw, qcow2, vdi, vmdk, ova, tar)"
        )),
    }
}

pub fn dist(v: &str) -> Result<String, String> {
    if KNOWN_DISTS.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "Unknown Debian distribution `{v}` (allowed: {})",
            allowed(KNOWN_DISTS)
        ))
    }
}

pub fn service(v: &str) -> Result<String, String> {
    if KNOWN_SERVICES.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "Unknown service `{v}` (known services: {})",
            allowed(KNOWN_SERVICES)
        ))
    }
}

/// A mirror URL: `http://`, `https://`, `ftp://` or `file:/` followed by something.
pub fn mirror(v: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = ["http://", "https://", "ftp://", "file:/"]
        .iter()
        .any(|p| v.len() > p.len() && v.starts_with(p))
        && !v.contains(char::is_whitespace);
    if ok {
        Ok(v.trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "invalid mirror URL `{v}` (expected http://, https://, ftp:// or file:/ URL)"
        ))
    }
}

/// A host name: one RFC 1123 label (1-63 letters, digits or hyphens, not starting or
/// ending with a hyphen).
pub fn hostname(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "invalid hostname `{v}` (one RFC 1123 label: 1-63 letters, digits or hyphens, not starting or ending with a hyphen)"
        ))
    }
}

/// An output file name: not empty, not a directory, no NUL or newline.
pub fn filename(v: &str) -> Result<String, String> {
    if v.trim().is_empty() || v.ends_with('/') || v.contains(['\0', '\n']) {
        Err(format!("invalid output file name `{v}`"))
    } else {
        Ok(v.to_string())
    }
}

/// A Debian package name, optionally with `=version` or `/release`.
pub fn package(v: &str) -> Result<String, String> {
    let name = v.split(['=', '/']).next().unwrap_or("");
    let ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && !v.contains(char::is_whitespace);
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("invalid Debian package name `{v}`"))
    }
}

/// A size with an optional unit, in MiB. Accepted: `3072`, `3072M`, `3072MiB`,
/// `3072MB`, `2G`, `2GiB`, `2GB`, `1.5G` (units are case-insensitive; `MB`/`GB` mean
/// MiB/GiB as in the original; a fraction must come out to whole MiB).
pub fn size(v: &str) -> Result<u64, String> {
    let err = || {
        format!("invalid size `{v}` (expected MiB as an integer, or a number with unit M or G, e.g. \"3072M\", \"2G\")")
    };
    let t = v.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(err()),
    };
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(err());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int.parse().map_err(|_| err())?;
    let mut mib = int.checked_mul(factor).ok_or_else(err)?;
    if !frac.is_empty() {
        // frac / 10^len * factor must be a whole number of MiB.
        let denom = 10u64.checked_pow(frac.len() as u32).ok_or_else(err)?;
        let f: u64 = frac.parse().map_err(|_| err())?;
        let scaled = f.checked_mul(factor).ok_or_else(err)?;
        let whole = scaled / denom;
        if whole * denom != scaled {
            return Err(format!("size `{v}` is not a whole number of MiB"));
        }
        mib = mib.checked_add(whole).ok_or_else(err)?;
    }
    if mib == 0 {
        return Err(format!("size `{v}` must be greater than 0"));
    }
    Ok(mib)
}

/// A size in a legacy cfg: an integer of MB, optionally followed by a `#` comment
/// (`3072 # MB`), which the original only tolerated because bash dropped it.
pub fn legacy_size(v: &str) -> Result<u64, String> {
    let number = v.split('#').next().unwrap_or("").trim();
    match number.parse::<u64>() {
        Ok(0) => Err(format!("size `{v}` must be greater than 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "non-numeric size `{v}` (expected MB as an integer)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("3072"), Ok(3072));
        assert_eq!(size("3072M"), Ok(3072));
        assert_eq!(size("3072 MiB"), Ok(3072));
        assert_eq!(size("3072mb"), Ok(3072));
        assert_eq!(size("2G"), Ok(2048));
        assert_eq!(size("2GiB"), Ok(2048));
        assert_eq!(size("1.5G"), Ok(1536));
        assert_eq!(size("0.25g"), Ok(256));
        assert!(size("1.0001G").unwrap_err().contains("whole number"));
        assert!(size("0").unwrap_err().contains("greater than 0"));
        for bad in [
            "",
            "big",
            "2T",
            "-5",
            "1..5G",
            ".5G",
            "5.G",
            "G",
            "3072 # MB",
        ] {
            assert!(size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn legacy_sizes_tolerate_comments() {
        assert_eq!(legacy_size("3072"), Ok(3072));
        assert_eq!(legacy_size("3072 # MB"), Ok(3072));
        assert_eq!(legacy_size("3072 #MB"), Ok(3072));
        assert_eq!(legacy_size("3072#MB"), Ok(3072));
        assert!(legacy_size("3G").unwrap_err().contains("non-numeric"));
        assert!(legacy_size("big").unwrap_err().contains("non-numeric"));
        assert!(legacy_size("# 3072").is_err());
    }

    #[test]
    fn enums_list_allowed_values() {
        assert_eq!(cloud("ec2"), Ok(Cloud::Ec2));
        let e = cloud("aws").unwrap_err();
        assert!(
            e.starts_with("Unknown cloud `aws`") && e.contains("ec2, openstack, opennebula, vbox")
        );
        assert!(hypervisor("vmware").unwrap_err().contains("kvm, xen"));
        assert!(arch("arm64").unwrap_err().contains("amd64, i386"));
        assert!(layout("iso")
            .unwrap_err()
            .contains("disk, container, nutshell"));
        assert!(format("img")
            .unwrap_err()
            .contains("raw, qcow2, vdi, vmdk, ova, tar"));
        assert!(dist("hamm")
            .unwrap_err()
            .starts_with("Unknown Debian distribution"));
        assert!(service("wordpress").unwrap_err().contains("helloworld"));
        assert_eq!(embed("vm"), Ok(Layout::Disk));
        assert_eq!(embed("container"), Ok(Layout::Container));
        assert!(embed("disk").is_err());
    }

    #[test]
    fn old_and_new_dists_parse() {
        for d in [
            "squeeze", "wheezy", "jessie", "bullseye", "bookworm", "trixie",
        ] {
            assert_eq!(dist(d).as_deref(), Ok(d));
        }
    }

    #[test]
    fn hostnames() {
        for ok in ["conpaas", "a", "node-1", "A1", &"x".repeat(63)] {
            assert!(hostname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a.b", "a_b", "ä", &"x".repeat(64)] {
            assert!(hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mirrors_filenames_packages() {
        assert_eq!(
            mirror("http://mirror.example/debian/").as_deref(),
            Ok("http://mirror.example/debian")
        );
        assert!(mirror("file:///srv/mirror").is_ok());
        assert!(mirror("mirror.example/debian").is_err());
        assert!(mirror("http://").is_err());
        assert!(filename("conpaas.img").is_ok());
        assert!(filename("").is_err());
        assert!(filename("out/").is_err());
        assert!(package("vim").is_ok());
        assert!(package("libc6=2.36-9").is_ok());
        assert!(package("linux-image-amd64/bookworm-backports").is_ok());
        assert!(package("Vim").is_err());
        assert!(package("two words").is_err());
    }
}
