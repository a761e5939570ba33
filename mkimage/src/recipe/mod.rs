//! The typed build recipe.
//!
//! A `Recipe` comes from a TOML file (`--recipe`), from the original
//! `create-img-script.cfg` INI file (`--config`, see `legacy`), or from the
//! defaults alone; command-line overrides are applied last. Everything after
//! this module sees only the typed `Recipe`.

use serde::{Deserialize, Serialize};
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
