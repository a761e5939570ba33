//! Reader for the original `create-img-script.cfg` (`--config FILE`).
//!
//! The INI dialect is that of Python 2's `RawConfigParser`: `[SECTION]` headers at the
//! start of a line (names case-sensitive), `key = value` or `key: value` (keys
//! case-insensitive, values stripped, a `;` preceded by whitespace starts a comment,
//! `#` inside a value does not), full-line comments starting with `#` or `;` (or
//! `rem`), continuation lines starting with whitespace. Items keep file order; a
//! repeated key keeps its first position and takes the last value.
//!
//! The mapping to the typed recipe is documented in `LEGACY.md`.

use super::values;
use super::{Cloud, Draft, Hypervisor, Layout, Nutshell, OutputFormat, RecipeError, RecipeSource};
use std::path::Path;

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IniItem {
    /// Lower-cased key.
    pub key: String,
    pub value: String,
    /// 1-based line of the key.
    pub line: usize,
}

/// One `[SECTION]` with its items in file order (repeated headers are merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IniSection {
    pub name: String,
    /// 1-based line of the first header.
    pub line: usize,
    pub items: Vec<IniItem>,
}

impl IniSection {
    pub fn get(&self, key: &str) -> Option<&IniItem> {
        self.items.iter().find(|i| i.key == key)
    }
}

/// Parses INI text the way Python 2's `RawConfigParser` does; errors carry the line.
pub fn parse_ini(text: &str, file: &str) -> Result<Vec<IniSection>, RecipeError> {
    let mut sections: Vec<IniSection> = Vec::new();
    let mut current: Option<usize> = None;
    let mut last_item: Option<(usize, usize)> = None;
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if line.len() >= 3
            && line[..3].eq_ignore_ascii_case("rem")
            && line.starts_with(['r', 'R'])
            && line.split_whitespace().next().map(str::to_ascii_lowercase) == Some("rem".into())
        {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // Continuation of the previous value.
            if let (Some(_), Some((s, i))) = (current, last_item) {
                let item = &mut sections[s].items[i];
                item.value.push('\n');
                item.value.push_str(line.trim());
                continue;
            }
        }
        if let Some(after) = line.strip_prefix('[') {
            if let Some(end) = after.find(']') {
                let name = &after[..end];
                if !name.is_empty() {
                    current = Some(match sections.iter().position(|s| s.name == name) {
                        Some(pos) => pos,
                        None => {
                            sections.push(IniSection {
                                name: name.to_string(),
                                line: line_no,
                                items: Vec::new(),
                            });
                            sections.len() - 1
                        }
                    });
                    last_item = None;
                    continue;
                }
            }
        }
        let Some(s) = current else {
            return Err(RecipeError::at(
                file,
                Some(line_no),
                None,
                "line before the first [SECTION] header",
            ));
        };
        let Some(sep) = line.find([':', '=']) else {
            return Err(RecipeError::at(
                file,
                Some(line_no),
                None,
                format!(
                    "cannot parse line `{}` (expected `key = value`)",
                    line.trim()
                ),
            ));
        };
        let key = line[..sep].trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(RecipeError::at(
                file,
                Some(line_no),
                None,
                format!("cannot parse line `{}` (empty key)", line.trim()),
            ));
        }
        let mut value = &line[sep + 1..];
        if let Some(pos) = value.find(';') {
            if pos > 0 && value[..pos].ends_with(char::is_whitespace) {
                value = &value[..pos];
            }
        }
        let mut value = value.trim().to_string();
        if value == "\"\"" {
            value.clear();
        }
        let items = &mut sections[s].items;
        let i = match items.iter().position(|it| it.key == key) {
            Some(pos) => {
                items[pos].value = value;
                items[pos].line = line_no;
                pos
            }
            None => {
                items.push(IniItem {
                    key,
                    value,
                    line: line_no,
                });
                items.len() - 1
            }
        };
        last_item = Some((s, i));
    }
    Ok(sections)
}

const SECTIONS: &[&str] = &[
    "RECOMMENDED",
    "CUSTOMIZABLE",
    "NUTSHELL",
    "SERVICES",
    "SCRIPT_FILE_NAMES",
];
const RECOMMENDED_KEYS: &[&str] = &["debian_dist", "debian_mirror", "arch"];
const CUSTOMIZABLE_KEYS: &[&str] = &["cloud", "hypervisor", "filename", "filesize", "optimize"];
const NUTSHELL_KEYS: &[&str] = &[
    "cloud",
    "nutshell",
    "container",
    "hostname",
    "filename",
    "filesize",
    "conpaas_tar_path",
    "ubuntu_dist",
    "ubuntu_mirror",
    "kvm_ubuntu_kernel_version",
    "xen_ubuntu_kernel_version",
];
/// Keys of the nutshell section that only drove the original's Ubuntu/devstack build.
const NUTSHELL_UBUNTU_KEYS: &[&str] = &[
    "conpaas_tar_path",
    "ubuntu_dist",
    "ubuntu_mirror",
    "kvm_ubuntu_kernel_version",
    "xen_ubuntu_kernel_version",
];
const SCRIPT_KEYS: &[&str] = &[
    "head_script",
    "image_script",
    "image_script_container",
    "image_script_nutshell",
    "nutshell_config_scripts",
    "conpaas_core_script",
    "rm_script",
    "user_script",
    "tail_script",
    "opennebula_script",
    "opennebula_script_nushell",
    "opennebula_script_nutshell",
    "ec2_script",
    "ec2_script_nushell",
    "ec2_script_nutshell",
    "vbox_script",
    "vbox_script_nushell",
    "vbox_script_nutshell",
    "openstack_script",
    "openstack_script_nushell",
    "openstack_script_nutshell",
    "resize_script",
    "resize_container_script",
];

fn script_key_known(key: &str) -> bool {
    SCRIPT_KEYS.contains(&key)
        || key
            .strip_suffix("_service_script")
            .is_some_and(|s| values::KNOWN_SERVICES.contains(&s))
}

struct Cfg<'a> {
    file: String,
    sections: &'a [IniSection],
}

impl Cfg<'_> {
    fn section(&self, name: &str) -> Result<&IniSection, RecipeError> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| RecipeError::new(self.file.clone(), format!("missing section [{name}]")))
    }

    fn get<'s>(&self, section: &'s IniSection, key: &str) -> Result<&'s IniItem, RecipeError> {
        section.get(key).ok_or_else(|| {
            RecipeError::at(
                self.file.clone(),
                Some(section.line),
                Some(key),
                format!("missing key in section [{}]", section.name),
            )
        })
    }

    fn err(&self, item: &IniItem, msg: impl Into<String>) -> RecipeError {
        RecipeError::at(self.file.clone(), Some(item.line), Some(&item.key), msg)
    }

    fn check<U>(&self, item: &IniItem, r: Result<U, String>) -> Result<U, RecipeError> {
        r.map_err(|m| self.err(item, m))
    }

    /// The original's boolean: true only for the exact string `true`.
    fn boolean(&self, item: &IniItem, warnings: &mut Vec<String>) -> bool {
        if item.value != "true" && item.value != "false" {
            warnings.push(format!(
                "{}:{}: key `{}`: `{}` is not exactly `true`, so it is read as false (as the original did)",
                self.file, item.line, item.key, item.value
            ));
        }
        item.value == "true"
    }
}

/// Reads a legacy cfg into a draft.
pub(crate) fn read(text: &str, path: &Path) -> Result<Draft, RecipeError> {
    let file = path.display().to_string();
    let sections = parse_ini(text, &file)?;
    let cfg = Cfg {
        file: file.clone(),
        sections: &sections,
    };

    // Unknown sections and keys.
    for s in &sections {
        let known: &dyn Fn(&str) -> bool = match s.name.as_str() {
            "RECOMMENDED" => &|k| RECOMMENDED_KEYS.contains(&k),
            "CUSTOMIZABLE" => &|k| CUSTOMIZABLE_KEYS.contains(&k),
            "NUTSHELL" => &|k| NUTSHELL_KEYS.contains(&k),
            "SERVICES" => &|_| true, // checked below with a better message
            "SCRIPT_FILE_NAMES" => &script_key_known,
            other => {
                return Err(RecipeError::at(
                    file.clone(),
                    Some(s.line),
                    None,
                    format!(
                        "unknown section [{other}] (known sections: {})",
                        SECTIONS.join(", ")
                    ),
                ))
            }
        };
        for item in &s.items {
            if !known(&item.key) {
                return Err(cfg.err(item, format!("unknown key in section [{}]", s.name)));
            }
        }
    }

    let rec = cfg.section("RECOMMENDED")?;
    let cust = cfg.section("CUSTOMIZABLE")?;
    let nut = cfg.section("NUTSHELL")?;
    let svc = cfg.section("SERVICES")?;

    let mut d = Draft::new(RecipeSource::Legacy(path.to_path_buf()), &file);
    let mut warnings = Vec::new();
    macro_rules! loc {
        ($field:expr, $item:expr) => {
            d.set_loc($field, &file, Some($item.line), &$item.key)
        };
    }

    // [RECOMMENDED]
    let it = cfg.get(rec, "debian_dist")?;
    d.dist = Some(cfg.check(it, values::dist(&it.value))?);
    loc!("dist", it);
    let it = cfg.get(rec, "debian_mirror")?;
    d.mirror = Some(cfg.check(it, values::mirror(&it.value))?);
    loc!("mirror", it);
    let it = cfg.get(rec, "arch")?;
    d.arch = cfg.check(it, values::arch(&it.value))?;
    loc!("arch", it);

    // [CUSTOMIZABLE]
    let hv = cfg.get(cust, "hypervisor")?;
    d.hypervisor = cfg.check(hv, values::hypervisor(&hv.value))?;
    d.hypervisor_explicit = true;
    loc!("hypervisor", hv);
    let cl = cfg.get(cust, "cloud")?;
    d.cloud = cfg.check(cl, values::cloud(&cl.value))?;
    loc!("cloud", cl);
    if d.cloud == Cloud::Ec2 && d.hypervisor != Hypervisor::Xen {
        warnings.push(format!(
            "{file}:{}: key `cloud`: cloud=ec2 forces hypervisor=xen (hypervisor=kvm was given)",
            cl.line
        ));
        d.hypervisor = Hypervisor::Xen;
    }
    let it = cfg.get(cust, "filename")?;
    d.filename = cfg.check(it, values::filename(&it.value))?;
    loc!("filename", it);
    let it = cfg.get(cust, "filesize")?;
    d.size_mib = cfg.check(it, values::legacy_size(&it.value))?;
    loc!("size", it);
    let it = cfg.get(cust, "optimize")?;
    d.optimize = cfg.boolean(it, &mut warnings);
    loc!("optimize", it);

    // [NUTSHELL]: the four flag cases.
    let it = cfg.get(nut, "nutshell")?;
    let nutshell = cfg.boolean(it, &mut warnings);
    let nutshell_item = it;
    let it = cfg.get(nut, "container")?;
    let container = cfg.boolean(it, &mut warnings);
    if nutshell {
        d.layout = Layout::Nutshell;
        loc!("layout", nutshell_item);
        let host = cfg.get(nut, "hostname")?;
        let name = cfg.get(nut, "filename")?;
        let size = cfg.get(nut, "filesize")?;
        d.nutshell = Some(Nutshell {
            embed: if container {
                Layout::Container
            } else {
                Layout::Disk
            },
            hostname: cfg.check(host, values::hostname(&host.value))?,
            filename: cfg.check(name, values::filename(&name.value))?,
            size_mib: cfg.check(size, values::legacy_size(&size.value))?,
        });
        loc!("nutshell.filename", name);
        loc!("nutshell.size", size);
        if d.cloud == Cloud::Vbox {
            d.formats = vec![OutputFormat::Raw, OutputFormat::Vdi];
        }
        let ignored: Vec<&str> = NUTSHELL_UBUNTU_KEYS
            .iter()
            .copied()
            .filter(|k| nut.get(k).is_some())
            .collect();
        warnings.push(format!(
            "{file}: nutshell mode: the original's Ubuntu/devstack parts are replaced by mkimage's own Nutshell build{}",
            if ignored.is_empty() {
                String::new()
            } else {
                format!("; ignored keys: {}", ignored.join(", "))
            }
        ));
    } else if container {
        d.layout = Layout::Container;
        loc!("layout", it);
        let c = cfg.get(nut, "cloud")?;
        d.cloud = cfg.check(c, values::cloud(&c.value))?;
        loc!("cloud", c);
    }

    // [SERVICES], in file order; php implies scalaris.
    let mut enabled: Vec<(String, bool)> = Vec::new();
    for item in &svc.items {
        let Some(name) = item.key.strip_suffix("_service") else {
            return Err(cfg.err(
                item,
                "unknown key in section [SERVICES] (keys are `<service>_service`)",
            ));
        };
        cfg.check(item, values::service(name))?;
        enabled.push((name.to_string(), cfg.boolean(item, &mut warnings)));
    }
    if enabled.iter().any(|(n, on)| n == "php" && *on) {
        match enabled.iter_mut().find(|(n, _)| n == "scalaris") {
            Some((_, on)) if *on => {}
            // Silently, as the original did (the shipped default relies on it).
            Some((_, on)) => *on = true,
            None => enabled.push(("scalaris".to_string(), true)),
        }
    }
    d.services = enabled
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect();
    d.set_loc("services", &file, Some(svc.line), "SERVICES");

    d.warnings = warnings;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_basics() {
        let text = "# comment\n; other\n[A]\nKey = v1 \nother: x = y\nc = 3072 #MB\nd = a ; note\ne = a;b\nf = \"\"\ng = one\n  two\n[B]\nk=1\n[A]\nkey = v2\n";
        let s = parse_ini(text, "t.cfg").unwrap();
        assert_eq!(s.len(), 2);
        let a = &s[0];
        let keys: Vec<&str> = a.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["key", "other", "c", "d", "e", "f", "g"]);
        assert_eq!(a.get("key").unwrap().value, "v2");
        assert_eq!(a.get("key").unwrap().line, 15);
        assert_eq!(a.get("other").unwrap().value, "x = y");
        assert_eq!(a.get("c").unwrap().value, "3072 #MB");
        assert_eq!(a.get("d").unwrap().value, "a");
        assert_eq!(a.get("e").unwrap().value, "a;b");
        assert_eq!(a.get("f").unwrap().value, "");
        assert_eq!(a.get("g").unwrap().value, "one\ntwo");
        assert_eq!(s[1].get("k").unwrap().line, 13);
    }

    #[test]
    fn ini_errors_have_lines() {
        let e = parse_ini("key = 1\n", "t.cfg").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = parse_ini("[A]\nx = 1\nnonsense\n", "t.cfg").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().starts_with("t.cfg:3: cannot parse line"));
    }
}
