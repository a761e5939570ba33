//! The typed build recipe.
//!
//! A `Recipe` comes from a TOML file (`--recipe`), from the original
//! `create-img-script.cfg` INI file (`--config`, see `legacy`), or from the
//! defaults alone; command-line overrides are applied last. Everything after
//! this module sees only the typed `Recipe`.
//!
//! Entry point: [`load`]. The TOML format is described by [`json_schema`] and
//! `fixtures/recipes/good/`; the mapping of the legacy cfg keys is in `LEGACY.md`
//! next to this file.

mod error;
mod host;
mod legacy;
mod toml_recipe;
mod values;

pub use error::{RecipeError, COMMAND_LINE};
pub use host::{
    parse_deb822_sources, parse_os_release, parse_sources_list, pick_mirror, read_apt_sources,
    AptSource, HostFacts, APT_SOURCES_DESCRIPTION,
};
pub use legacy::{parse_ini, IniItem, IniSection};
pub use toml_recipe::RecipeFile;
pub use values::{FALLBACK_DIST, KNOWN_DISTS, KNOWN_SERVICES, MIN_DISK_MIB, UNAVAILABLE_DISTS};

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// Target cloud: decides network configuration, contextualization and root device naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Ec2,
    Openstack,
    Opennebula,
    Vbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    Kvm,
    Xen,
}

/// What the build produces: a partitioned bootable disk, a bare root filesystem for
/// containers, or a Nutshell (a bootable disk that embeds another image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Disk,
    Container,
    Nutshell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    I386,
}

impl Arch {
    /// Debian architecture name.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::I386 => "i386",
        }
    }
    /// Kernel flavour suffix used in kernel package names (the original maps i386 to 686).
    pub fn kernel_flavour(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::I386 => "686",
        }
    }
}

/// Output file formats written next to each other in the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Raw,
    Qcow2,
    Vdi,
    Vmdk,
    Tar,
    /// An OVF appliance: descriptor + streamOptimized VMDK + SHA-256 manifest.
    Ova,
}

/// Where the recipe came from, for messages and the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "lowercase")]
pub enum RecipeSource {
    Defaults,
    Toml(PathBuf),
    Legacy(PathBuf),
}

/// The Nutshell settings (`[NUTSHELL]` section of a legacy cfg, `[nutshell]` table in TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nutshell {
    /// What the Nutshell embeds: a container rootfs or a VM disk image.
    pub embed: Layout,
    pub hostname: String,
    pub filename: String,
    pub size_mib: u64,
}

/// A fully validated build recipe. Field meanings are documented in the JSON schema
/// (`mkimage schema`) and in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recipe {
    pub source: RecipeSource,
    /// Debian release code name (bookworm, trixie, ...).
    pub dist: String,
    pub arch: Arch,
    /// Debian mirror URL; defaults to the one the host's apt uses.
    pub mirror: String,
    pub cloud: Cloud,
    pub hypervisor: Hypervisor,
    pub layout: Layout,
    /// Disk image size in MiB (apparent size of the raw file).
    pub size_mib: u64,
    /// Prune unneeded packages, docs and locales, then shrink the filesystem.
    pub optimize: bool,
    /// Enabled ConPaaS services, in the order their stages run.
    pub services: Vec<String>,
    pub hostname: String,
    /// Extra Debian packages for the base system.
    pub packages: Vec<String>,
    /// Kernel package; `None` means the default for the cloud (linux-image-cloud-amd64 on amd64).
    pub kernel: Option<String>,
    /// Output file name of the raw image (other formats swap the extension).
    pub filename: String,
    pub formats: Vec<OutputFormat>,
    pub nutshell: Option<Nutshell>,
    /// Warnings produced while reading (e.g. "cloud=ec2 forces hypervisor=xen").
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// Which recipe to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipeInput {
    /// No file: defaults plus host facts plus overrides.
    Defaults,
    /// A TOML recipe (`--recipe FILE`).
    Toml(PathBuf),
    /// The original `create-img-script.cfg` (`--config FILE`).
    Legacy(PathBuf),
}

/// Command-line overrides, applied after the recipe file and validated the same way.
/// Errors name the file `command line` and the flag (`--cloud`, `--hypervisor`,
/// `--size`, `--dist`, `--output`, `--services`, `--layout`, `--format`, `--mirror`,
/// `--optimize`).
///
/// `output` and `size` name the final artefact: for the nutshell layout they set the
/// Nutshell's file name and size, otherwise `filename` and `size_mib`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub cloud: Option<String>,
    pub hypervisor: Option<String>,
    /// Size with optional unit, as in the TOML `size` string (`3072`, `3072M`, `2G`).
    pub size: Option<String>,
    pub dist: Option<String>,
    pub output: Option<String>,
    pub services: Option<Vec<String>>,
    pub layout: Option<String>,
    pub formats: Option<Vec<String>>,
    pub mirror: Option<String>,
    pub optimize: Option<bool>,
}

/// Default Nutshell settings (those of the original cfg).
pub fn default_nutshell() -> Nutshell {
    Nutshell {
        embed: Layout::Container,
        hostname: "nutshell".to_string(),
        filename: "nutshell.img".to_string(),
        size_mib: 15360,
    }
}

/// Reads and validates a recipe, applies `overrides` last, and fills what is still
/// unset from `host` (dist, mirror) and the defaults.
pub fn load(
    input: &RecipeInput,
    overrides: &Overrides,
    host: &HostFacts,
) -> Result<Recipe, RecipeError> {
    let mut draft = match input {
        RecipeInput::Defaults => Draft::new(RecipeSource::Defaults, "defaults"),
        RecipeInput::Toml(path) => {
            let text = read_file(path)?;
            toml_recipe::read(&text, path)?
        }
        RecipeInput::Legacy(path) => {
            let text = read_file(path)?;
            legacy::read(&text, path)?
        }
    };
    draft.apply_overrides(overrides)?;
    draft.finish(host)
}

fn read_file(path: &std::path::Path) -> Result<String, RecipeError> {
    std::fs::read_to_string(path)
        .map_err(|e| RecipeError::new(path.display().to_string(), format!("cannot read file: {e}")))
}

/// The JSON Schema of the TOML recipe format (printed by `mkimage schema`).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(RecipeFile);
    let mut value = serde_json::to_value(&schema).expect("schema serializes");
    strip_null_defaults(&mut value);
    serde_json::to_string_pretty(&value).expect("schema serializes")
}

/// Optional keys are simply absent in TOML (which has no null): drop the
/// `"default": null` that schemars adds for them.
fn strip_null_defaults(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map.get("default").is_some_and(|d| d.is_null()) {
                map.remove("default");
            }
            map.values_mut().for_each(strip_null_defaults);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_null_defaults),
        _ => {}
    }
}

/// True for releases that parse and plan but that current Debian mirrors no longer
/// carry: squeeze, wheezy, jessie, stretch and buster (everything before bullseye).
pub fn is_dist_known_unavailable(dist: &str) -> bool {
    UNAVAILABLE_DISTS.contains(&dist)
}

/// The message the builder's preflight fails with for an unavailable release, or
/// `None` if the release can be built.
pub fn preflight_dist_message(recipe: &Recipe) -> Option<String> {
    if !is_dist_known_unavailable(&recipe.dist) {
        return None;
    }
    let buildable: Vec<&str> = KNOWN_DISTS
        .iter()
        .copied()
        .filter(|d| !is_dist_known_unavailable(d))
        .collect();
    Some(format!(
        "Debian {dist} is no longer carried by current Debian mirrors, so it cannot be \
         bootstrapped from mirror {mirror}. The recipe is valid and can be planned, but \
         building needs a current release ({list}); set `dist` (or --dist) to one of them.",
        dist = recipe.dist,
        mirror = recipe.mirror,
        list = buildable.join(", "),
    ))
}

/// The kernel package installed when the recipe names none.
///
/// bullseye and newer (and buster): `linux-image-cloud-amd64` for amd64 on ec2 and
/// openstack (KVM or Xen HVM guests), otherwise `linux-image-<flavour>` (`amd64`, or
/// `686` for i386). squeeze follows the original rule: `linux-image-xen-<flavour>` on
/// xen, `linux-image-<flavour>` on kvm; wheezy, jessie and stretch use
/// `linux-image-<flavour>`.
pub fn default_kernel_package(recipe: &Recipe) -> String {
    let flavour = recipe.arch.kernel_flavour();
    match recipe.dist.as_str() {
        "squeeze" if recipe.hypervisor == Hypervisor::Xen => format!("linux-image-xen-{flavour}"),
        "squeeze" | "wheezy" | "jessie" | "stretch" => format!("linux-image-{flavour}"),
        _ if recipe.arch == Arch::Amd64
            && matches!(recipe.cloud, Cloud::Ec2 | Cloud::Openstack) =>
        {
            "linux-image-cloud-amd64".to_string()
        }
        _ => format!("linux-image-{flavour}"),
    }
}

/// The kernel package to install: the recipe's `kernel`, or [`default_kernel_package`].
pub fn kernel_package(recipe: &Recipe) -> String {
    recipe
        .kernel
        .clone()
        .unwrap_or_else(|| default_kernel_package(recipe))
}

/// Where a value came from, for errors about it found after reading.
#[derive(Debug, Clone)]
struct Loc {
    file: String,
    line: Option<usize>,
    key: Option<String>,
}

/// A recipe being assembled: values read so far, and where each came from.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    source: RecipeSource,
    file: String,
    dist: Option<String>,
    arch: Arch,
    mirror: Option<String>,
    cloud: Cloud,
    hypervisor: Hypervisor,
    /// The hypervisor was given explicitly (not the default, not forced).
    hypervisor_explicit: bool,
    layout: Layout,
    size_mib: u64,
    optimize: bool,
    services: Vec<String>,
    hostname: String,
    packages: Vec<String>,
    kernel: Option<String>,
    filename: String,
    formats: Vec<OutputFormat>,
    nutshell: Option<Nutshell>,
    warnings: Vec<String>,
    locs: HashMap<&'static str, Loc>,
}

impl Draft {
    pub(crate) fn new(source: RecipeSource, file: &str) -> Draft {
        Draft {
            source,
            file: file.to_string(),
            dist: None,
            arch: Arch::Amd64,
            mirror: None,
            cloud: Cloud::Openstack,
            hypervisor: Hypervisor::Kvm,
            hypervisor_explicit: false,
            layout: Layout::Disk,
            size_mib: 2048,
            optimize: false,
            services: Vec::new(),
            hostname: "conpaas".to_string(),
            packages: Vec::new(),
            kernel: None,
            filename: "conpaas.img".to_string(),
            formats: vec![OutputFormat::Raw],
            nutshell: None,
            warnings: Vec::new(),
            locs: HashMap::new(),
        }
    }

    /// Records where `field` was set.
    fn set_loc(&mut self, field: &'static str, file: &str, line: Option<usize>, key: &str) {
        self.locs.insert(
            field,
            Loc {
                file: file.to_string(),
                line,
                key: Some(key.to_string()),
            },
        );
    }

    /// An error about `field`, located where it was set (or in the recipe file).
    fn err(&self, field: &'static str, message: impl Into<String>) -> RecipeError {
        match self.locs.get(field) {
            Some(loc) => RecipeError {
                file: loc.file.clone(),
                line: loc.line,
                key: loc.key.clone(),
                message: message.into(),
            },
            None => RecipeError::at(self.file.clone(), None, Some(field), message),
        }
    }

    fn nutshell_mut(&mut self) -> &mut Nutshell {
        self.nutshell.get_or_insert_with(default_nutshell)
    }

    fn apply_overrides(&mut self, o: &Overrides) -> Result<(), RecipeError> {
        fn cl<T>(flag: &str, r: Result<T, String>) -> Result<T, RecipeError> {
            r.map_err(|m| RecipeError::command_line(flag, m))
        }
        let set = |d: &mut Draft, field: &'static str, flag: &str| {
            d.set_loc(field, COMMAND_LINE, None, flag)
        };
        if let Some(v) = &o.layout {
            self.layout = cl("--layout", values::layout(v))?;
            set(self, "layout", "--layout");
            if self.layout != Layout::Nutshell {
                self.nutshell = None;
            }
        }
        if let Some(v) = &o.cloud {
            self.cloud = cl("--cloud", values::cloud(v))?;
            set(self, "cloud", "--cloud");
        }
        if let Some(v) = &o.hypervisor {
            self.hypervisor = cl("--hypervisor", values::hypervisor(v))?;
            self.hypervisor_explicit = true;
            set(self, "hypervisor", "--hypervisor");
        }
        if let Some(v) = &o.dist {
            self.dist = Some(cl("--dist", values::dist(v))?);
            set(self, "dist", "--dist");
        }
        if let Some(v) = &o.mirror {
            self.mirror = Some(cl("--mirror", values::mirror(v))?);
            set(self, "mirror", "--mirror");
        }
        if let Some(v) = &o.size {
            let mib = cl("--size", values::size(v))?;
            if self.layout == Layout::Nutshell {
                self.nutshell_mut().size_mib = mib;
                set(self, "nutshell.size", "--size");
            } else {
                self.size_mib = mib;
                set(self, "size", "--size");
            }
        }
        if let Some(v) = &o.output {
            let name = cl("--output", values::filename(v))?;
            if self.layout == Layout::Nutshell {
                self.nutshell_mut().filename = name;
                set(self, "nutshell.filename", "--output");
            } else {
                self.filename = name;
                set(self, "filename", "--output");
            }
        }
        if let Some(list) = &o.services {
            let mut services = Vec::new();
            // Empty entries are skipped, so `--services ""` means no services.
            for s in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
                services.push(cl("--services", values::service(s))?);
            }
            self.services = services;
            set(self, "services", "--services");
        }
        if let Some(list) = &o.formats {
            let mut formats = Vec::new();
            for f in list {
                formats.push(cl("--format", values::format(f.trim()))?);
            }
            self.formats = formats;
            set(self, "formats", "--format");
        }
        if let Some(v) = o.optimize {
            self.optimize = v;
            set(self, "optimize", "--optimize");
        }
        Ok(())
    }

    /// Cross-field checks and host defaults; produces the final recipe.
    fn finish(mut self, host: &HostFacts) -> Result<Recipe, RecipeError> {
        let dist = match self.dist.take() {
            Some(d) => d,
            None => match host.dist.as_deref() {
                Some(d) if KNOWN_DISTS.contains(&d) => d.to_string(),
                Some(d) => {
                    self.warnings.push(format!(
                        "the host's Debian release `{d}` is not one mkimage knows; using {FALLBACK_DIST}"
                    ));
                    FALLBACK_DIST.to_string()
                }
                None => FALLBACK_DIST.to_string(),
            },
        };
        let mirror = match self.mirror.take().or_else(|| host.mirror.clone()) {
            Some(m) => m,
            None => {
                return Err(self.err(
                    "mirror",
                    format!(
                        "no Debian mirror given and none found in the host's apt sources \
                         (read {APT_SOURCES_DESCRIPTION}: no `deb` entry for {dist} or \
                         {dist}-updates); set `mirror` in the recipe or pass --mirror"
                    ),
                ))
            }
        };

        if self.cloud == Cloud::Ec2 && self.hypervisor != Hypervisor::Xen {
            if self.hypervisor_explicit {
                let w = self.err(
                    "hypervisor",
                    "cloud=ec2 forces hypervisor=xen (hypervisor=kvm was given)",
                );
                self.warnings.push(w.to_string());
            }
            self.hypervisor = Hypervisor::Xen;
        }

        match self.layout {
            Layout::Nutshell => {
                self.nutshell_mut();
            }
            _ => self.nutshell = None,
        }

        // Sizes.
        let inner_is_disk = match (&self.layout, &self.nutshell) {
            (Layout::Disk, _) => true,
            (Layout::Nutshell, Some(n)) => n.embed == Layout::Disk,
            _ => false,
        };
        if inner_is_disk && self.size_mib < MIN_DISK_MIB {
            return Err(self.err(
                "size",
                format!(
                    "size {} MiB is too small for a bootable disk image (at least {MIN_DISK_MIB} MiB)",
                    self.size_mib
                ),
            ));
        }
        if let Some(n) = &self.nutshell {
            if n.size_mib < MIN_DISK_MIB {
                return Err(self.err(
                    "nutshell.size",
                    format!(
                        "nutshell size {} MiB is too small for a bootable disk image (at least {MIN_DISK_MIB} MiB)",
                        n.size_mib
                    ),
                ));
            }
        }

        // Services: no duplicates.
        for (i, s) in self.services.iter().enumerate() {
            if self.services[..i].contains(s) {
                return Err(self.err("services", format!("service `{s}` is listed twice")));
            }
        }

        // Formats: not empty, no duplicates, consistent with the layout.
        if self.formats.is_empty() {
            return Err(self.err("formats", "at least one output format is needed"));
        }
        for (i, f) in self.formats.iter().enumerate() {
            if self.formats[..i].contains(f) {
                return Err(self.err(
                    "formats",
                    format!("format `{}` is listed twice", fmt_name(*f)),
                ));
            }
            let ok = match self.layout {
                Layout::Container => matches!(f, OutputFormat::Raw | OutputFormat::Tar),
                Layout::Disk | Layout::Nutshell => *f != OutputFormat::Tar,
            };
            if !ok {
                let allowed = match self.layout {
                    Layout::Container => "raw, tar",
                    _ => "raw, qcow2, vdi, vmdk, ova",
                };
                return Err(self.err(
                    "formats",
                    format!(
                        "format `{}` does not fit layout `{}` (allowed for this layout: {allowed}; tar is only for container)",
                        fmt_name(*f),
                        layout_name(self.layout)
                    ),
                ));
            }
        }

        // trixie dropped the i386 kernel.
        if self.arch == Arch::I386
            && self.kernel.is_none()
            && self.layout != Layout::Container
            && !matches!(
                dist.as_str(),
                "squeeze" | "wheezy" | "jessie" | "stretch" | "buster" | "bullseye" | "bookworm"
            )
        {
            return Err(self.err(
                "arch",
                format!(
                    "Debian {dist} has no i386 kernel; use arch amd64, layout container, or name a `kernel`"
                ),
            ));
        }

        Ok(Recipe {
            source: self.source,
            dist,
            arch: self.arch,
            mirror,
            cloud: self.cloud,
            hypervisor: self.hypervisor,
            layout: self.layout,
            size_mib: self.size_mib,
            optimize: self.optimize,
            services: self.services,
            hostname: self.hostname,
            packages: self.packages,
            kernel: self.kernel,
            filename: self.filename,
            formats: self.formats,
            nutshell: self.nutshell,
            warnings: self.warnings,
        })
    }
}

fn fmt_name(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Raw => "raw",
        OutputFormat::Qcow2 => "qcow2",
        OutputFormat::Vdi => "vdi",
        OutputFormat::Vmdk => "vmdk",
        OutputFormat::Tar => "tar",
        OutputFormat::Ova => "ova",
    }
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::Disk => "disk",
        Layout::Container => "container",
        Layout::Nutshell => "nutshell",
    }
}
