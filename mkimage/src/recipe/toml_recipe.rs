//! The TOML recipe format (`--recipe FILE`).
//!
//! ```toml
//! dist = "bookworm"
//! cloud = "openstack"
//! size = "3G"
//! services = ["helloworld"]
//!
//! [outputs]
//! filename = "helloworld.img"
//! formats = ["raw", "qcow2"]
//! ```
//!
//! Every value is read as a spanned TOML value so that errors can name the line and
//! the key; [`RecipeFile`] doubles as the source of the JSON schema.

use super::values;
use super::{Arch, Cloud, Draft, Hypervisor, Layout, OutputFormat, RecipeError, RecipeSource};
use schemars::JsonSchema;
use serde::Deserialize;
use std::path::Path;
use toml::Spanned;

/// A ConPaaS services image recipe for mkimage. Every key is optional; unknown keys
/// are rejected.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "mkimage recipe")]
pub struct RecipeFile {
    /// Debian release code name (bullseye, bookworm, trixie; squeeze, wheezy, jessie,
    /// stretch and buster parse but cannot be built). Default: the host's release.
    #[serde(default)]
    #[schemars(with = "String")]
    pub dist: Option<Spanned<String>>,
    /// Debian architecture. Default: amd64.
    #[serde(default)]
    #[schemars(with = "Arch")]
    pub arch: Option<Spanned<String>>,
    /// Debian mirror URL. Default: the mirror the host's apt uses.
    #[serde(default)]
    #[schemars(with = "String")]
    pub mirror: Option<Spanned<String>>,
    /// Target cloud. Default: openstack.
    #[serde(default)]
    #[schemars(with = "Cloud")]
    pub cloud: Option<Spanned<String>>,
    /// Hypervisor. Default: kvm (xen for ec2; ec2 with kvm is forced to xen with a warning).
    #[serde(default)]
    #[schemars(with = "Hypervisor")]
    pub hypervisor: Option<Spanned<String>>,
    /// disk (bootable partitioned image), container (bare root filesystem) or nutshell.
    /// Default: disk, or nutshell when a [nutshell] table is present.
    #[serde(default)]
    #[schemars(with = "Layout")]
    pub layout: Option<Spanned<String>>,
    /// Image size: an integer of MiB, or a string with unit M or G ("3072M", "2G",
    /// "1.5G"). At least 512 MiB for disk images. Default: 2048. In the nutshell layout
    /// this is the embedded image.
    #[serde(default)]
    #[schemars(with = "SizeValue")]
    pub size: Option<Spanned<toml::Value>>,
    /// Prune unneeded packages, docs and locales, then shrink the filesystem. Default: false.
    #[serde(default)]
    #[schemars(with = "bool")]
    pub optimize: Option<Spanned<bool>>,
    /// ConPaaS services to install, in order. Default: none.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub services: Option<Spanned<Vec<Spanned<String>>>>,
    /// Host name of the image (one RFC 1123 label). Default: conpaas.
    #[serde(default)]
    #[schemars(with = "String")]
    pub hostname: Option<Spanned<String>>,
    /// Extra Debian packages for the base system.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub packages: Option<Spanned<Vec<Spanned<String>>>>,
    /// Kernel package. Default: linux-image-cloud-amd64 on amd64 ec2/openstack,
    /// linux-image-amd64 / linux-image-686 otherwise.
    #[serde(default)]
    #[schemars(with = "String")]
    pub kernel: Option<Spanned<String>>,
    /// Output files.
    #[serde(default)]
    #[schemars(with = "OutputsFile")]
    pub outputs: Option<OutputsFile>,
    /// Nutshell settings (the outer image); implies layout = "nutshell".
    #[serde(default)]
    #[schemars(with = "NutshellFile")]
    pub nutshell: Option<NutshellFile>,
}

/// The `[outputs]` table.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputsFile {
    /// File name of the raw image; other formats swap the extension. Default: conpaas.img.
    #[serde(default)]
    #[schemars(with = "String")]
    pub filename: Option<Spanned<String>>,
    /// Formats to write. tar only for the container layout. Default: ["raw"].
    #[serde(default)]
    #[schemars(with = "Vec<OutputFormat>")]
    pub formats: Option<Spanned<Vec<Spanned<String>>>>,
}

/// The `[nutshell]` table: the outer image that embeds the services image.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NutshellFile {
    /// What the Nutshell embeds. Default: container.
    #[serde(default)]
    #[schemars(with = "NutshellEmbed")]
    pub embed: Option<Spanned<String>>,
    /// Host name of the Nutshell. Default: nutshell.
    #[serde(default)]
    #[schemars(with = "String")]
    pub hostname: Option<Spanned<String>>,
    /// File name of the Nutshell image. Default: nutshell.img.
    #[serde(default)]
    #[schemars(with = "String")]
    pub filename: Option<Spanned<String>>,
    /// Size of the Nutshell image, as `size`. Default: 15360 (MiB).
    #[serde(default)]
    #[schemars(with = "SizeValue")]
    pub size: Option<Spanned<toml::Value>>,
}

/// A size: MiB as an integer, or a string with unit.
#[allow(dead_code)]
#[derive(JsonSchema)]
#[serde(untagged)]
enum SizeValue {
    Mib(u64),
    WithUnit(String),
}

/// What a Nutshell embeds.
#[allow(dead_code)]
#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
enum NutshellEmbed {
    Container,
    Vm,
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The dotted key of the assignment that covers `line` (1-based): the last
/// `key = ...` at or before it, prefixed with the enclosing `[table]`.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut table: Option<String> = None;
    let mut key: Option<String> = None;
    for l in text.lines().take(line) {
        let t = l.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            if let Some(end) = t.find(']') {
                table = Some(t[1..end].trim().to_string());
                key = None;
                continue;
            }
        }
        if let Some((k, _)) = t.split_once('=') {
            let k = k.trim().trim_matches('"');
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                key = Some(k.to_string());
            }
        }
    }
    let key = key?;
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

struct Ctx<'a> {
    text: &'a str,
    file: String,
}

impl Ctx<'_> {
    fn line<T>(&self, v: &Spanned<T>) -> usize {
        line_of(self.text, v.span().start)
    }

    fn err<T>(&self, v: &Spanned<T>, key: &str, msg: impl Into<String>) -> RecipeError {
        RecipeError::at(self.file.clone(), Some(self.line(v)), Some(key), msg)
    }

    fn check<T, U>(
        &self,
        v: &Spanned<T>,
        key: &str,
        r: Result<U, String>,
    ) -> Result<U, RecipeError> {
        r.map_err(|m| self.err(v, key, m))
    }

    fn size(&self, v: &Spanned<toml::Value>, key: &str) -> Result<u64, RecipeError> {
        match v.get_ref() {
            toml::Value::Integer(n) if *n > 0 => Ok(*n as u64),
            toml::Value::Integer(n) => {
                Err(self.err(v, key, format!("size {n} must be greater than 0")))
            }
            toml::Value::String(s) => self.check(v, key, values::size(s)),
            other => Err(self.err(
                v,
                key,
                format!(
                    "invalid type: {}, expected an integer of MiB or a string such as \"2G\"",
                    other.type_str()
                ),
            )),
        }
    }
}

/// Turns a deserialization error into a located [`RecipeError`].
fn de_error(text: &str, file: &str, e: toml::de::Error) -> RecipeError {
    let line = e.span().map(|s| line_of(text, s.start));
    let msg = e.message().trim().replace('\n', "; ");
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((name, expected)) = rest.split_once('`') {
            let table = line
                .and_then(|l| key_at_line(text, l))
                .and_then(|k| k.rsplit_once('.').map(|(t, _)| t.to_string()));
            let key = match table {
                Some(t) => format!("{t}.{name}"),
                None => name.to_string(),
            };
            let expected = expected.trim_start_matches(',').trim();
            return RecipeError::at(
                file,
                line,
                Some(&key),
                format!("unknown key `{name}` ({expected})"),
            );
        }
    }
    let key = line.and_then(|l| key_at_line(text, l));
    RecipeError::at(file, line, key.as_deref(), msg)
}

/// Reads a TOML recipe into a draft (values checked, cross-field checks left to
/// `Draft::finish`).
pub(crate) fn read(text: &str, path: &Path) -> Result<Draft, RecipeError> {
    let file = path.display().to_string();
    let f: RecipeFile = toml::from_str(text).map_err(|e| de_error(text, &file, e))?;
    let cx = Ctx {
        text,
        file: file.clone(),
    };
    let mut d = Draft::new(RecipeSource::Toml(path.to_path_buf()), &file);
    macro_rules! loc {
        ($field:expr, $v:expr, $key:expr) => {
            d.set_loc($field, &file, Some(cx.line($v)), $key)
        };
    }

    if let Some(v) = &f.dist {
        d.dist = Some(cx.check(v, "dist", values::dist(v.get_ref()))?);
        loc!("dist", v, "dist");
    }
    if let Some(v) = &f.arch {
        d.arch = cx.check(v, "arch", values::arch(v.get_ref()))?;
        loc!("arch", v, "arch");
    }
    if let Some(v) = &f.mirror {
        d.mirror = Some(cx.check(v, "mirror", values::mirror(v.get_ref()))?);
        loc!("mirror", v, "mirror");
    }
    if let Some(v) = &f.cloud {
        d.cloud = cx.check(v, "cloud", values::cloud(v.get_ref()))?;
        loc!("cloud", v, "cloud");
    }
    if let Some(v) = &f.hypervisor {
        d.hypervisor = cx.check(v, "hypervisor", values::hypervisor(v.get_ref()))?;
        d.hypervisor_explicit = true;
        loc!("hypervisor", v, "hypervisor");
    }
    if let Some(v) = &f.layout {
        d.layout = cx.check(v, "layout", values::layout(v.get_ref()))?;
        loc!("layout", v, "layout");
    }
    if let Some(v) = &f.size {
        d.size_mib = cx.size(v, "size")?;
        loc!("size", v, "size");
    }
    if let Some(v) = &f.optimize {
        d.optimize = *v.get_ref();
        loc!("optimize", v, "optimize");
    }
    if let Some(list) = &f.services {
        d.services = list
            .get_ref()
            .iter()
            .map(|s| cx.check(s, "services", values::service(s.get_ref())))
            .collect::<Result<_, _>>()?;
        loc!("services", list, "services");
    }
    if let Some(v) = &f.hostname {
        d.hostname = cx.check(v, "hostname", values::hostname(v.get_ref()))?;
        loc!("hostname", v, "hostname");
    }
    if let Some(list) = &f.packages {
        d.packages = list
            .get_ref()
            .iter()
            .map(|s| cx.check(s, "packages", values::package(s.get_ref())))
            .collect::<Result<_, _>>()?;
        loc!("packages", list, "packages");
    }
    if let Some(v) = &f.kernel {
        d.kernel = Some(cx.check(v, "kernel", values::package(v.get_ref()))?);
        loc!("kernel", v, "kernel");
    }
    if let Some(out) = &f.outputs {
        if let Some(v) = &out.filename {
            d.filename = cx.check(v, "outputs.filename", values::filename(v.get_ref()))?;
            loc!("filename", v, "outputs.filename");
        }
        if let Some(list) = &out.formats {
            d.formats = list
                .get_ref()
                .iter()
                .map(|s| cx.check(s, "outputs.formats", values::format(s.get_ref())))
                .collect::<Result<_, _>>()?;
            loc!("formats", list, "outputs.formats");
        }
    }
    if let Some(n) = &f.nutshell {
        match &f.layout {
            None => d.layout = Layout::Nutshell,
            Some(v) if d.layout != Layout::Nutshell => {
                return Err(cx.err(
                    v,
                    "layout",
                    format!(
                        "a [nutshell] table needs layout \"nutshell\", not \"{}\"",
                        v.get_ref()
                    ),
                ))
            }
            Some(_) => {}
        }
        let mut ns = super::default_nutshell();
        if let Some(v) = &n.embed {
            ns.embed = cx.check(v, "nutshell.embed", values::embed(v.get_ref()))?;
        }
        if let Some(v) = &n.hostname {
            ns.hostname = cx.check(v, "nutshell.hostname", values::hostname(v.get_ref()))?;
        }
        if let Some(v) = &n.filename {
            ns.filename = cx.check(v, "nutshell.filename", values::filename(v.get_ref()))?;
            loc!("nutshell.filename", v, "nutshell.filename");
        }
        if let Some(v) = &n.size {
            ns.size_mib = cx.size(v, "nutshell.size")?;
            loc!("nutshell.size", v, "nutshell.size");
        }
        d.nutshell = Some(ns);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_at_line_tracks_tables_and_multiline_arrays() {
        let text = "dist = \"x\"\nservices = [\n  \"php\",\n  3,\n]\n[outputs]\nformats = 1\n";
        assert_eq!(key_at_line(text, 1).as_deref(), Some("dist"));
        assert_eq!(key_at_line(text, 4).as_deref(), Some("services"));
        assert_eq!(key_at_line(text, 6), None);
        assert_eq!(key_at_line(text, 7).as_deref(), Some("outputs.formats"));
    }

    #[test]
    fn line_of_offsets() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
