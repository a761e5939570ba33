//! `mkimage register ec2|openstack`: the image's manifest supplies what the clouds
//! need (name, architecture, format, digests, build id); the file is verified
//! against it before a byte is uploaded, and what the cloud stored (snapshot, AMI,
//! Glance image and their hashes) is appended to the manifest — one integrity
//! chain from the build to the cloud.

use crate::manifest::Manifest;
use std::path::Path;

#[derive(clap::Subcommand)]
pub enum RegisterCmd {
    /// Upload to an EBS snapshot (EBS direct APIs by default, or S3 + ImportSnapshot) and register an AMI.
    #[command(
        after_help = "Examples:\n  mkimage register ec2 out/conpaas.img --region eu-west-1\n  \
mkimage register ec2 out/conpaas.img --via s3 --bucket my-images --replace\n  \
mkimage register ec2 out/conpaas.img --endpoint-url http://127.0.0.1:5000   # an emulator"
    )]
    Ec2(register::cli::Ec2Args),
    /// Upload to Glance (Keystone v3 auth from OS_* variables or clouds.yaml) and compare Glance's hashes with ours.
    #[command(
        after_help = "Examples:\n  OS_CLOUD=mycloud mkimage register openstack out/conpaas.img\n  \
mkimage register openstack out/conpaas.qcow2 --name conpaas-hello --property os_version=12"
    )]
    Openstack(register::cli::OpenStackArgs),
}

/// What the manifest says about `image`, as the registration library wants it.
pub fn image_info(image: &Path) -> anyhow::Result<(register::ImageInfo, Manifest)> {
    let mpath = Manifest::path_for(image);
    let m = Manifest::load(&mpath).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}; registration needs the manifest written by `mkimage build` beside the image"
        )
    })?;
    let file = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let a = m
        .artefact(&file)
        .ok_or_else(|| anyhow::anyhow!("manifest {} does not describe {file}", mpath.display()))?
        .clone();
    let arch = match m.recipe.get("arch").and_then(|v| v.as_str()) {
        Some("i386") => "i386",
        _ => "x86_64",
    };
    let stem = file.rsplit_once('.').map(|(s, _)| s).unwrap_or(&file);
    let info = register::ImageInfo {
        path: image.to_owned(),
        name: format!("{stem}-{}", m.build_id),
        description: Some(format!(
            "built by mkimage {} (build {})",
            m.tool_version, m.build_id
        )),
        arch: arch.into(),
        disk_format: match a.format.as_str() {
            "ext4" => "raw".into(),
            f => f.into(),
        },
        md5: Some(a.md5.clone()),
        sha256: Some(a.sha256.clone()),
        build_id: m.build_id.clone(),
    };
    Ok((info, m))
}

/// Progress bars with bytes and rate for uploads.
struct Bars(std::sync::Mutex<Option<indicatif::ProgressBar>>);

impl register::Progress for Bars {
    fn start(&self, what: &str, total: u64) {
        let b = crate::progress::bytes(true, total, what.to_string());
        tracing::info!("{what}");
        if let Some(old) = self.0.lock().unwrap().replace(b) {
            old.finish_and_clear();
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = self.0.lock().unwrap().as_ref() {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = self.0.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}

/// Runs a registration; returns the record added to the manifest.
pub fn run(cmd: &RegisterCmd) -> anyhow::Result<serde_json::Value> {
    let image = match cmd {
        RegisterCmd::Ec2(a) => a.image.clone(),
        RegisterCmd::Openstack(a) => a.image.clone(),
    };
    let (mut info, mut manifest) = image_info(&image)?;
    // The bytes we upload must be the bytes the build recorded.
    let expected = crate::verify::Expected {
        md5: info.md5.clone(),
        sha256: info.sha256.clone(),
        source: Manifest::path_for(&image).display().to_string(),
    };
    crate::verify::verify(&image, &expected, |_| {})?;
    let bars = Bars(std::sync::Mutex::new(None));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let record = match cmd {
        RegisterCmd::Ec2(a) => {
            a.apply(&mut info);
            let opts = a.options().map_err(anyhow::Error::msg)?;
            let r = rt.block_on(register::register_ec2(&info, &opts, &bars))?;
            serde_json::json!({ "cloud": "ec2", "result": r })
        }
        RegisterCmd::Openstack(a) => {
            a.apply(&mut info);
            let r = rt.block_on(register::register_openstack(&info, &a.options(), &bars))?;
            serde_json::json!({ "cloud": "openstack", "result": r })
        }
    };
    manifest.registrations.push(record.clone());
    manifest.store(&Manifest::path_for(&image))?;
    Ok(record)
}
