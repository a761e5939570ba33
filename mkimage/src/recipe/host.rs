//! Facts about the build host that provide recipe defaults: the Debian release it runs
//! and the Debian mirror its apt uses.
//!
//! All parsing functions take text so they can be tested without touching `/etc`.

use std::path::{Path, PathBuf};

/// Defaults taken from the build host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Debian release code name of the host (`VERSION_CODENAME`), `None` if the host is
    /// not Debian or the file could not be read.
    pub dist: Option<String>,
    /// The Debian mirror the host's apt uses, `None` if none was found.
    pub mirror: Option<String>,
}

/// The apt files `detect` reads, for messages.
pub const APT_SOURCES_DESCRIPTION: &str =
    "/etc/apt/sources.list, /etc/apt/sources.list.d/*.list and /etc/apt/sources.list.d/*.sources";

/// One `deb` entry of an apt source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
}

impl HostFacts {
    /// Reads `/etc/os-release` and the host's apt sources.
    pub fn detect() -> HostFacts {
        HostFacts::detect_in(Path::new("/"))
    }

    /// Same as [`HostFacts::detect`], with every path taken below `root` (for tests).
    pub fn detect_in(root: &Path) -> HostFacts {
        let os_release = std::fs::read_to_string(root.join("etc/os-release"))
            .or_else(|_| std::fs::read_to_string(root.join("usr/lib/os-release")))
            .unwrap_or_default();
        let dist = parse_os_release(&os_release);
        let mirror = dist.as_deref().and_then(|dist| {
            let sources = read_apt_sources(root);
            pick_mirror(&sources, dist)
        });
        HostFacts { dist, mirror }
    }
}

/// The Debian code name from os-release text; `None` unless `ID=debian` (or
/// `ID_LIKE` contains debian) and `VERSION_CODENAME` is set.
pub fn parse_os_release(text: &str) -> Option<String> {
    let mut id = None;
    let mut id_like = String::new();
    let mut codename = None;
    for line in text.lines() {
        let line = line.trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key.trim() {
            "ID" => id = Some(value),
            "ID_LIKE" => id_like = value,
            "VERSION_CODENAME" if !value.is_empty() => codename = Some(value),
            _ => {}
        }
    }
    let debian = id.as_deref() == Some("debian")
        || (id.as_deref() != Some("ubuntu") && id_like.split_whitespace().any(|w| w == "debian"));
    if debian {
        codename
    } else {
        None
    }
}

fn unquote(value: &str) -> String {
    let v = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value);
    v.to_string()
}

/// `deb` entries of a one-line-format `sources.list` text. Comments, `deb-src` and
/// `cdrom:` entries are skipped; `[options]` are ignored.
pub fn parse_sources_list(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut rest = match line.strip_prefix("deb") {
            Some(r) if r.starts_with([' ', '\t']) => r.trim_start(),
            _ => continue,
        };
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        if uri.starts_with("cdrom:") {
            continue;
        }
        out.push(AptSource {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
        });
    }
    out
}

/// `deb` entries of a deb822 `.sources` text. Stanzas with `Enabled: no`, without
/// `deb` in `Types`, or with `cdrom:` URIs are skipped.
pub fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in deb822_stanzas(text) {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if let Some(enabled) = field("Enabled") {
            if matches!(
                enabled.trim().to_ascii_lowercase().as_str(),
                "no" | "false" | "0"
            ) {
                continue;
            }
        }
        if !field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let suites: Vec<String> = field("Suites")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for uri in field("URIs").unwrap_or("").split_whitespace() {
            if uri.starts_with("cdrom:") {
                continue;
            }
            out.push(AptSource {
                uri: uri.to_string(),
                suites: suites.clone(),
            });
        }
    }
    out
}

/// Splits deb822 text into stanzas of (field, value); continuation lines are joined.
fn deb822_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stanzas = Vec::new();
    let mut current: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            current.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    if !current.is_empty() {
        stanzas.push(current);
    }
    stanzas
}

/// The first entry whose suite is `dist` or `dist-updates`, as a URI without a
/// trailing slash. Security suites never match.
pub fn pick_mirror(sources: &[AptSource], dist: &str) -> Option<String> {
    let updates = format!("{dist}-updates");
    sources
        .iter()
        .find(|s| {
            s.suites
                .iter()
                .any(|suite| !suite.ends_with("-security") && (suite == dist || *suite == updates))
        })
        .map(|s| s.uri.trim_end_matches('/').to_string())
}

/// Every `deb` entry of the apt sources below `root`, in the order apt reads them:
/// `sources.list`, then `sources.list.d/` files in name order. Files whose name
/// contains `.disabled` are skipped.
pub fn read_apt_sources(root: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(root.join("etc/apt/sources.list")) {
        out.extend(parse_sources_list(&text));
    }
    let dir = root.join("etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.contains(".disabled") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if name.ends_with(".list") {
            out.extend(parse_sources_list(&text));
        } else if name.ends_with(".sources") {
            out.extend(parse_deb822_sources(&text));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";

    #[test]
    fn os_release_debian() {
        assert_eq!(parse_os_release(OS_RELEASE).as_deref(), Some("bookworm"));
        assert_eq!(
            parse_os_release("ID=\"debian\"\nVERSION_CODENAME=\"trixie\"\n").as_deref(),
            Some("trixie")
        );
    }

    #[test]
    fn os_release_not_debian_or_no_codename() {
        assert_eq!(
            parse_os_release("ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n"),
            None
        );
        assert_eq!(parse_os_release("ID=fedora\nVERSION_CODENAME=\n"), None);
        assert_eq!(parse_os_release("ID=debian\n"), None);
        assert_eq!(parse_os_release(""), None);
    }

    #[test]
    fn sources_list_one_line_format() {
        let text = "\
# deb http://old.example/debian bookworm main
deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main contrib # note
deb http://other.example/debian bookworm-updates main
";
        let s = parse_sources_list(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].uri, "http://security.example/debian-security");
        assert_eq!(s[1].uri, "http://mirror.example/debian/");
        assert_eq!(s[1].suites, vec!["bookworm"]);
        assert_eq!(
            pick_mirror(&s, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn security_only_and_wrong_suite_give_nothing() {
        let s = parse_sources_list(
            "deb http://security.example/debian-security bookworm-security main\n\
             deb http://mirror.example/debian trixie main\n",
        );
        assert_eq!(pick_mirror(&s, "bookworm"), None);
        assert_eq!(
            pick_mirror(&s, "trixie").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn updates_suite_counts() {
        let s = parse_sources_list("deb http://upd.example/debian bookworm-updates main\n");
        assert_eq!(
            pick_mirror(&s, "bookworm").as_deref(),
            Some("http://upd.example/debian")
        );
    }

    #[test]
    fn deb822_stanzas_security_disabled_and_src() {
        let text = "\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
# a comment inside the stanza
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 -----END PGP PUBLIC KEY BLOCK-----
";
        let s = parse_deb822_sources(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].suites, vec!["bookworm-security"]);
        assert_eq!(s[1].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(
            pick_mirror(&s, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn detect_in_reads_files_and_skips_disabled() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(etc.join("apt/sources.list.d")).unwrap();
        std::fs::write(etc.join("os-release"), OS_RELEASE).unwrap();
        // A disabled file sorts first and would otherwise win.
        std::fs::write(
            etc.join("apt/sources.list.d/a.sources.disabled-by-admin"),
            "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("apt/sources.list.d/b.list.disabled"),
            "deb http://disabled2.example/debian bookworm main\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("apt/sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
             Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n",
        )
        .unwrap();
        let facts = HostFacts::detect_in(root.path());
        assert_eq!(facts.dist.as_deref(), Some("bookworm"));
        assert_eq!(
            facts.mirror.as_deref(),
            Some("http://mirror.example/debian")
        );

        // sources.list is read before sources.list.d.
        std::fs::write(
            etc.join("apt/sources.list"),
            "deb http://first.example/debian bookworm main\n",
        )
        .unwrap();
        let facts = HostFacts::detect_in(root.path());
        assert_eq!(facts.mirror.as_deref(), Some("http://first.example/debian"));
    }

    #[test]
    fn detect_in_empty_root() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(HostFacts::detect_in(root.path()), HostFacts::default());
    }
}
