//! clap argument structs for `mkimage register ec2|openstack`; the mkimage binary
//! embeds them and fills [`crate::ImageInfo`] from the manifest beside the image.

use crate::ec2::{BootMode, Ec2Options, Via};
use crate::image::ImageInfo;
use crate::openstack::OpenStackOptions;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ViaArg {
    /// EBS direct APIs (no S3 bucket needed; zero blocks are skipped).
    Ebs,
    /// S3 multipart upload + ImportSnapshot.
    S3,
}

/// `mkimage register ec2 IMAGE ...`
#[derive(Debug, Clone, Args)]
pub struct Ec2Args {
    /// The raw image (its manifest `<image>.manifest.json` must be beside it).
    pub image: PathBuf,
    /// AMI name (default: from the manifest).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Endpoint for EC2, EBS and S3 (e.g. a local emulator).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// Region (default: AWS config chain).
    #[arg(long)]
    pub region: Option<String>,
    /// How the image gets into a snapshot.
    #[arg(long, value_enum, default_value_t = ViaArg::Ebs)]
    pub via: ViaArg,
    /// S3 bucket for `--via s3`.
    #[arg(long, required_if_eq("via", "s3"))]
    pub bucket: Option<String>,
    /// Deregister an existing AMI of the same name (after the new snapshot is ready).
    #[arg(long)]
    pub replace: bool,
    /// legacy-bios or uefi.
    #[arg(long, default_value = "legacy-bios")]
    pub boot_mode: String,
    /// Do not set EnaSupport.
    #[arg(long)]
    pub no_ena: bool,
    #[arg(long, default_value = "/dev/xvda")]
    pub root_device: String,
    /// Concurrent block / part uploads.
    #[arg(long, default_value_t = 16)]
    pub parallelism: usize,
    /// Keep the S3 object when the import fails.
    #[arg(long)]
    pub keep_s3_object: bool,
}

impl Ec2Args {
    pub fn options(&self) -> Result<Ec2Options, String> {
        let via = match self.via {
            ViaArg::Ebs => Via::EbsDirect,
            ViaArg::S3 => Via::S3 {
                bucket: self.bucket.clone().ok_or("--via s3 needs --bucket")?,
            },
        };
        Ok(Ec2Options {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            via,
            replace: self.replace,
            boot_mode: self.boot_mode.parse::<BootMode>()?,
            ena: !self.no_ena,
            root_device: self.root_device.clone(),
            parallelism: self.parallelism.max(1),
            keep_s3_object_on_failure: self.keep_s3_object,
            ..Ec2Options::default()
        })
    }

    /// Applies `--name` / `--description` to what the manifest gave.
    pub fn apply(&self, info: &mut ImageInfo) {
        if let Some(n) = &self.name {
            info.name = n.clone();
        }
        if let Some(d) = &self.description {
            info.description = Some(d.clone());
        }
    }
}

/// `mkimage register openstack IMAGE ...`
#[derive(Debug, Clone, Args)]
pub struct OpenStackArgs {
    /// The image (its manifest `<image>.manifest.json` must be beside it).
    pub image: PathBuf,
    /// Image name (default: from the manifest).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Cloud in clouds.yaml (default: OS_CLOUD, else the OS_* variables).
    #[arg(long)]
    pub cloud: Option<String>,
    /// Region of the image endpoint.
    #[arg(long)]
    pub region: Option<String>,
    /// private, shared, community or public.
    #[arg(long)]
    pub visibility: Option<String>,
    /// Extra image property KEY=VALUE (repeatable).
    #[arg(long = "property", value_parser = parse_kv)]
    pub properties: Vec<(String, String)>,
    /// Delete an existing image of the same name once the new one is verified.
    #[arg(long)]
    pub replace: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl OpenStackArgs {
    pub fn options(&self) -> OpenStackOptions {
        OpenStackOptions {
            cloud: self.cloud.clone(),
            region: self.region.clone(),
            visibility: self.visibility.clone(),
            properties: self.properties.iter().cloned().collect(),
            replace: self.replace,
            ..OpenStackOptions::default()
        }
    }

    pub fn apply(&self, info: &mut ImageInfo) {
        if let Some(n) = &self.name {
            info.name = n.clone();
        }
        if let Some(d) = &self.description {
            info.description = Some(d.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(clap::Subcommand)]
    enum Cmd {
        Ec2(Ec2Args),
        Openstack(OpenStackArgs),
    }

    #[test]
    fn ec2_args() {
        let t = Top::try_parse_from([
            "mkimage",
            "ec2",
            "disk.img",
            "--via",
            "s3",
            "--bucket",
            "b",
            "--replace",
            "--name",
            "n",
            "--region",
            "eu-west-1",
            "--boot-mode",
            "uefi",
        ])
        .unwrap();
        let Cmd::Ec2(a) = t.cmd else { panic!() };
        let o = a.options().unwrap();
        assert_eq!(o.via, Via::S3 { bucket: "b".into() });
        assert!(o.replace && o.ena);
        assert_eq!(o.boot_mode, BootMode::Uefi);
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert!(Top::try_parse_from(["mkimage", "ec2", "disk.img", "--via", "s3"]).is_err());
    }

    #[test]
    fn openstack_args() {
        let t = Top::try_parse_from([
            "mkimage",
            "openstack",
            "disk.img",
            "--cloud",
            "c",
            "--property",
            "k=v",
        ])
        .unwrap();
        let Cmd::Openstack(a) = t.cmd else { panic!() };
        let o = a.options();
        assert_eq!(o.cloud.as_deref(), Some("c"));
        assert_eq!(o.properties.get("k").map(String::as_str), Some("v"));
    }
}
