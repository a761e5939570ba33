//! Amazon EC2: raw image → EBS snapshot (EBS direct APIs, or S3 + ImportSnapshot) → AMI.

use crate::error::RegisterError;
use crate::image::ImageInfo;
use crate::progress::Progress;
use crate::{env_flag, BUILD_ID_TAG};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, ResourceType,
    SnapshotDiskContainer, SnapshotState, TagSpecification, UserBucket, VolumeType,
};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use futures::TryStreamExt;
use md5::Md5;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const GIB: u64 = 1 << 30;

/// Environment variable that makes [`register_ec2`] fail right after the snapshot is
/// complete (test hook for the cleanup path).
pub const FAIL_AFTER_SNAPSHOT_ENV: &str = "MKIMAGE_TEST_FAIL_AFTER_SNAPSHOT";

/// How the image gets into an EBS snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Via {
    /// EBS direct APIs: StartSnapshot / PutSnapshotBlock / CompleteSnapshot.
    #[default]
    EbsDirect,
    /// Upload to S3 (multipart), then ImportSnapshot.
    S3 { bucket: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    #[default]
    LegacyBios,
    Uefi,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::LegacyBios => "legacy-bios",
            BootMode::Uefi => "uefi",
        }
    }
}

impl std::str::FromStr for BootMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "legacy-bios" | "bios" => Ok(BootMode::LegacyBios),
            "uefi" => Ok(BootMode::Uefi),
            o => Err(format!("boot mode {o:?} is not legacy-bios or uefi")),
        }
    }
}

/// Explicit credentials; when absent the standard AWS chain is used
/// (environment, profile files, SSO cache, IMDS, ...).
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Ec2Options {
    /// Custom endpoint for every service (EC2, EBS, S3), e.g. a local emulator.
    /// S3 then uses path-style addressing.
    pub endpoint_url: Option<String>,
    /// Region; else from the AWS config chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    pub credentials: Option<StaticCredentials>,
    pub via: Via,
    /// Deregister an existing AMI of the same name (after the new snapshot is ready).
    pub replace: bool,
    pub boot_mode: BootMode,
    pub ena: bool,
    pub root_device: String,
    /// Concurrent PutSnapshotBlock / UploadPart requests.
    pub parallelism: usize,
    /// S3 multipart part size (raised when the image needs more than 10000 parts).
    pub s3_part_size: u64,
    /// S3 key prefix; the key is `<prefix><build id>/<name>.<format>`.
    pub s3_prefix: String,
    /// Keep the S3 object also when the import fails (default: delete it).
    pub keep_s3_object_on_failure: bool,
    /// EBS volume type of the AMI's root device.
    pub volume_type: String,
    /// Bound for waiting on the snapshot / import task.
    pub wait_timeout: Duration,
    pub poll_interval: Duration,
    /// Maximum attempts per API call (SDK standard retry); None = SDK default.
    pub max_attempts: Option<u32>,
    /// Test-only: fail right after CompleteSnapshot (also env
    /// `MKIMAGE_TEST_FAIL_AFTER_SNAPSHOT=1`).
    pub fail_after_complete_snapshot: bool,
}

impl Default for Ec2Options {
    fn default() -> Self {
        Ec2Options {
            endpoint_url: None,
            region: None,
            credentials: None,
            via: Via::EbsDirect,
            replace: false,
            boot_mode: BootMode::LegacyBios,
            ena: true,
            root_device: "/dev/xvda".into(),
            parallelism: 16,
            s3_part_size: 16 << 20,
            s3_prefix: "mkimage/".into(),
            keep_s3_object_on_failure: false,
            volume_type: "gp3".into(),
            wait_timeout: Duration::from_secs(3 * 3600),
            poll_interval: Duration::from_secs(5),
            max_attempts: None,
            fail_after_complete_snapshot: false,
        }
    }
}

/// What EC2 stored; goes into the manifest's `registrations`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ec2Registration {
    /// Always `"ec2"`.
    pub cloud: String,
    pub name: String,
    pub ami_id: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub snapshot_id: Option<String>,
    /// `ebs-direct`, `s3` or `existing` (an AMI of that name was already there).
    pub via: String,
    /// True when an existing AMI of the same name was reported instead of a new one.
    pub existing: bool,
    /// AMIs deregistered because of `replace`.
    pub replaced: Vec<String>,
    /// Base64 SHA-256 over the concatenated per-block SHA-256s (EBS LINEAR aggregate).
    pub snapshot_sha256_aggregate: Option<String>,
    pub block_size: Option<u64>,
    pub blocks_uploaded: u64,
    pub blocks_skipped: u64,
    pub bytes_uploaded: u64,
    pub image_size: u64,
    /// Hex SHA-256 of the image file, computed while uploading.
    pub image_sha256: Option<String>,
    pub volume_size_gib: u64,
    pub architecture: String,
    pub boot_mode: String,
    pub ena: bool,
    pub root_device: String,
    pub s3_bucket: Option<String>,
    pub s3_key: Option<String>,
    pub import_task_id: Option<String>,
    pub build_id: String,
}

/// The SDK clients configured from the AWS chain plus [`Ec2Options`]
/// (endpoint, region, credentials, retries; path-style S3 with a custom endpoint).
#[derive(Debug, Clone)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub s3: aws_sdk_s3::Client,
    pub region: String,
}

/// Builds the SDK clients the way [`register_ec2`] does.
pub async fn clients(opts: &Ec2Options) -> Result<Clients, RegisterError> {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(r) = &opts.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(u) = &opts.endpoint_url {
        loader = loader.endpoint_url(u.clone());
    }
    if let Some(c) = &opts.credentials {
        loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            c.session_token.clone(),
            None,
            "mkimage",
        ));
    }
    if let Some(n) = opts.max_attempts {
        loader =
            loader.retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(n));
    }
    let conf = loader.load().await;
    let region = conf.region().map(|r| r.to_string()).ok_or_else(|| {
        RegisterError::Config(
            "no AWS region: pass --region or set AWS_REGION / a profile region".into(),
        )
    })?;
    let s3conf = aws_sdk_s3::config::Builder::from(&conf)
        .force_path_style(opts.endpoint_url.is_some())
        .build();
    Ok(Clients {
        ec2: aws_sdk_ec2::Client::new(&conf),
        ebs: aws_sdk_ebs::Client::new(&conf),
        s3: aws_sdk_s3::Client::from_conf(s3conf),
        region,
    })
}

/// Formats an SDK error with its whole cause chain.
pub(crate) fn sdk<E: std::error::Error>(call: &str, e: E) -> RegisterError {
    RegisterError::api(call, aws_sdk_ec2::error::DisplayErrorContext(&e))
}

/// Resources created so far, deleted again on failure.
#[derive(Default)]
struct Created {
    snapshots: Vec<String>,
    multipart: Option<(String, String, String)>,
    s3_object: Option<(String, String)>,
    keep_s3_object: bool,
    /// Crash-journal tickets of the resources above (see [`crate::journal`]).
    tickets: Vec<Option<u64>>,
    endpoint: Option<String>,
    region: Option<String>,
    build_id: String,
}

impl Created {
    /// Journals a resource about to be created.
    fn journal(&mut self, kind: &str, bucket: Option<&str>, key: Option<&str>) {
        let t = crate::journal::acquire(crate::journal::CloudResource {
            kind: kind.into(),
            build_id: self.build_id.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: bucket.map(str::to_owned),
            key: key.map(str::to_owned),
        });
        self.tickets.push(t);
    }
}

/// Registers `image` as an AMI. See the crate docs for the steps.
pub async fn register_ec2(
    image: &ImageInfo,
    opts: &Ec2Options,
    progress: &dyn Progress,
) -> Result<Ec2Registration, RegisterError> {
    image.validate()?;
    if image.disk_format != "raw" && opts.via == Via::EbsDirect {
        return Err(RegisterError::Invalid(format!(
            "the EBS direct upload needs a raw image, not {} (convert it with qemu-img, or use --via s3 with vmdk)",
            image.disk_format
        )));
    }
    if opts.parallelism == 0 {
        return Err(RegisterError::Invalid(
            "parallelism must be at least 1".into(),
        ));
    }
    let c = clients(opts).await?;

    let existing = find_images_by_name(&c, &image.name).await?;
    if let Some(old) = existing.first() {
        if !opts.replace {
            tracing::info!(ami = %old.0, name = %image.name, "an AMI of this name exists; not registering again");
            return Ok(existing_record(image, opts, &c, old));
        }
    }

    let mut created = Created {
        endpoint: opts.endpoint_url.clone(),
        region: Some(c.region.clone()),
        build_id: image.build_id.clone(),
        ..Created::default()
    };
    match run(&c, image, opts, progress, &existing, &mut created).await {
        Ok(r) => {
            // Everything created now belongs to the AMI.
            crate::journal::release_all(&mut created.tickets);
            Ok(r)
        }
        Err(e) => Err(cleanup(&c, created, e).await),
    }
}

fn existing_record(
    image: &ImageInfo,
    opts: &Ec2Options,
    c: &Clients,
    old: &(String, Option<String>),
) -> Ec2Registration {
    Ec2Registration {
        cloud: "ec2".into(),
        name: image.name.clone(),
        ami_id: old.0.clone(),
        region: c.region.clone(),
        endpoint: opts.endpoint_url.clone(),
        snapshot_id: old.1.clone(),
        via: "existing".into(),
        existing: true,
        replaced: vec![],
        snapshot_sha256_aggregate: None,
        block_size: None,
        blocks_uploaded: 0,
        blocks_skipped: 0,
        bytes_uploaded: 0,
        image_size: 0,
        image_sha256: None,
        volume_size_gib: 0,
        architecture: image.arch.clone(),
        boot_mode: opts.boot_mode.as_str().into(),
        ena: opts.ena,
        root_device: opts.root_device.clone(),
        s3_bucket: None,
        s3_key: None,
        import_task_id: None,
        build_id: image.build_id.clone(),
    }
}

/// (AMI id, root snapshot id) of the images we own with this exact name.
async fn find_images_by_name(
    c: &Clients,
    name: &str,
) -> Result<Vec<(String, Option<String>)>, RegisterError> {
    let out = c
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .map_err(|e| sdk("DescribeImages", e))?;
    Ok(out
        .images()
        .iter()
        .filter(|i| i.name() == Some(name))
        .filter_map(|i| {
            let snap = i
                .block_device_mappings()
                .iter()
                .find(|m| m.device_name() == i.root_device_name())
                .and_then(|m| m.ebs())
                .and_then(|e| e.snapshot_id())
                .map(str::to_string);
            i.image_id().map(|id| (id.to_string(), snap))
        })
        .collect())
}

/// Statistics of one upload.
struct Uploaded {
    snapshot_id: String,
    aggregate: Option<String>,
    block_size: Option<u64>,
    blocks_uploaded: u64,
    blocks_skipped: u64,
    bytes_uploaded: u64,
    image_sha256: String,
    s3_key: Option<String>,
    import_task_id: Option<String>,
}

async fn run(
    c: &Clients,
    image: &ImageInfo,
    opts: &Ec2Options,
    progress: &dyn Progress,
    existing: &[(String, Option<String>)],
    created: &mut Created,
) -> Result<Ec2Registration, RegisterError> {
    let size = tokio::fs::metadata(&image.path)
        .await
        .map_err(|source| RegisterError::Io {
            path: image.path.clone(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(RegisterError::Invalid(format!(
            "{} is empty",
            image.path.display()
        )));
    }
    let volume_gib = size.div_ceil(GIB).max(1);

    let up = match &opts.via {
        Via::EbsDirect => ebs_upload(c, image, opts, progress, size, volume_gib, created).await?,
        Via::S3 { bucket } => s3_import(c, image, opts, progress, size, bucket, created).await?,
    };

    wait_snapshot(c, &up.snapshot_id, opts).await?;

    if opts.fail_after_complete_snapshot || env_flag(FAIL_AFTER_SNAPSHOT_ENV) {
        return Err(RegisterError::Injected(format!(
            "after CompleteSnapshot of {}",
            up.snapshot_id
        )));
    }

    let mut replaced = vec![];
    for (old_ami, old_snap) in existing {
        deregister(c, old_ami, old_snap.as_deref()).await?;
        replaced.push(old_ami.clone());
    }

    let tag = aws_sdk_ec2::types::Tag::builder()
        .key(BUILD_ID_TAG)
        .value(&image.build_id)
        .build();
    let mut req = c
        .ec2
        .register_image()
        .name(&image.name)
        .architecture(match image.arch.as_str() {
            "i386" => ArchitectureValues::I386,
            _ => ArchitectureValues::X8664,
        })
        .virtualization_type("hvm")
        .ena_support(opts.ena)
        .root_device_name(&opts.root_device)
        .boot_mode(match opts.boot_mode {
            BootMode::LegacyBios => BootModeValues::LegacyBios,
            BootMode::Uefi => BootModeValues::Uefi,
        })
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&opts.root_device)
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(&up.snapshot_id)
                        .volume_size(volume_gib as i32)
                        .delete_on_termination(true)
                        .volume_type(VolumeType::from(opts.volume_type.as_str()))
                        .build(),
                )
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .tags(tag)
                .build(),
        );
    if let Some(d) = &image.description {
        req = req.description(d);
    }
    let ami_id = req
        .send()
        .await
        .map_err(|e| sdk("RegisterImage", e))?
        .image_id()
        .map(str::to_string)
        .ok_or_else(|| RegisterError::api("RegisterImage", "the answer has no ImageId"))?;
    tracing::info!(ami = %ami_id, snapshot = %up.snapshot_id, "registered");

    Ok(Ec2Registration {
        cloud: "ec2".into(),
        name: image.name.clone(),
        ami_id,
        region: c.region.clone(),
        endpoint: opts.endpoint_url.clone(),
        snapshot_id: Some(up.snapshot_id),
        via: match opts.via {
            Via::EbsDirect => "ebs-direct".into(),
            Via::S3 { .. } => "s3".into(),
        },
        existing: false,
        replaced,
        snapshot_sha256_aggregate: up.aggregate,
        block_size: up.block_size,
        blocks_uploaded: up.blocks_uploaded,
        blocks_skipped: up.blocks_skipped,
        bytes_uploaded: up.bytes_uploaded,
        image_size: size,
        image_sha256: Some(up.image_sha256),
        volume_size_gib: volume_gib,
        architecture: image.arch.clone(),
        boot_mode: opts.boot_mode.as_str().into(),
        ena: opts.ena,
        root_device: opts.root_device.clone(),
        s3_bucket: match &opts.via {
            Via::S3 { bucket } => Some(bucket.clone()),
            Via::EbsDirect => None,
        },
        s3_key: up.s3_key,
        import_task_id: up.import_task_id,
        build_id: image.build_id.clone(),
    })
}

/// Deregisters an AMI and deletes its root snapshot if mkimage created it.
async fn deregister(c: &Clients, ami: &str, snapshot: Option<&str>) -> Result<(), RegisterError> {
    c.ec2
        .deregister_image()
        .image_id(ami)
        .send()
        .await
        .map_err(|e| sdk("DeregisterImage", e))?;
    tracing::info!(ami, "deregistered (replace)");
    if let Some(snap) = snapshot {
        let ours = c
            .ec2
            .describe_snapshots()
            .snapshot_ids(snap)
            .filters(
                Filter::builder()
                    .name("tag-key")
                    .values(BUILD_ID_TAG)
                    .build(),
            )
            .send()
            .await
            .map(|o| !o.snapshots().is_empty())
            .unwrap_or(false);
        if ours {
            if let Err(e) = c.ec2.delete_snapshot().snapshot_id(snap).send().await {
                tracing::warn!(snapshot = snap, error = %aws_sdk_ec2::error::DisplayErrorContext(&e), "could not delete the replaced AMI's snapshot");
            }
        }
    }
    Ok(())
}

async fn wait_snapshot(c: &Clients, id: &str, opts: &Ec2Options) -> Result<(), RegisterError> {
    let start = Instant::now();
    loop {
        let out = c
            .ec2
            .describe_snapshots()
            .snapshot_ids(id)
            .send()
            .await
            .map_err(|e| sdk("DescribeSnapshots", e))?;
        let snap = out.snapshots().first().ok_or_else(|| {
            RegisterError::api("DescribeSnapshots", format!("snapshot {id} not found"))
        })?;
        match snap.state() {
            Some(SnapshotState::Completed) => return Ok(()),
            Some(SnapshotState::Error) => {
                return Err(RegisterError::api(
                    "DescribeSnapshots",
                    format!(
                        "snapshot {id} is in state error: {}",
                        snap.state_message().unwrap_or("")
                    ),
                ))
            }
            _ => {}
        }
        if start.elapsed() > opts.wait_timeout {
            return Err(RegisterError::Timeout {
                what: format!("snapshot {id} to complete"),
                seconds: opts.wait_timeout.as_secs(),
            });
        }
        tokio::time::sleep(opts.poll_interval).await;
    }
}

/// Deletes what was created, and wraps the error with what happened.
async fn cleanup(c: &Clients, mut created: Created, err: RegisterError) -> RegisterError {
    let mut cleaned = vec![];
    let mut left = vec![];
    for s in &created.snapshots {
        match c.ec2.delete_snapshot().snapshot_id(s).send().await {
            Ok(_) => cleaned.push(format!("snapshot {s}")),
            Err(e) => left.push(format!(
                "snapshot {s} ({})",
                aws_sdk_ec2::error::DisplayErrorContext(&e)
            )),
        }
    }
    if let Some((b, k, id)) = &created.multipart {
        match c
            .s3
            .abort_multipart_upload()
            .bucket(b)
            .key(k)
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => cleaned.push(format!("multipart upload s3://{b}/{k}")),
            Err(e) => left.push(format!(
                "multipart upload {id} of s3://{b}/{k} ({})",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )),
        }
    }
    if let Some((b, k)) = &created.s3_object {
        if created.keep_s3_object {
            left.push(format!("s3://{b}/{k} (kept on request)"));
        } else {
            match c.s3.delete_object().bucket(b).key(k).send().await {
                Ok(_) => cleaned.push(format!("object s3://{b}/{k}")),
                Err(e) => left.push(format!(
                    "object s3://{b}/{k} ({})",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )),
            }
        }
    }
    tracing::warn!(error = %err, ?cleaned, ?left, "registration failed");
    if left.is_empty() {
        crate::journal::release_all(&mut created.tickets);
    }
    RegisterError::CleanedUp {
        source: Box::new(err),
        cleaned_up: cleaned,
        left_behind: left,
    }
}

/// Reads the image in blocks, hashing the whole file on the way.
struct BlockReader<'a> {
    file: tokio::fs::File,
    path: std::path::PathBuf,
    block_size: usize,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    next_index: u64,
    skipped: u64,
    sha256: Sha256,
    md5: Option<Md5>,
    progress: &'a dyn Progress,
    skip_zero: bool,
}

impl<'a> BlockReader<'a> {
    async fn open(
        path: &std::path::Path,
        block_size: usize,
        chunk: usize,
        want_md5: bool,
        skip_zero: bool,
        progress: &'a dyn Progress,
    ) -> Result<BlockReader<'a>, RegisterError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| RegisterError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let chunk = chunk.div_ceil(block_size).max(1) * block_size;
        Ok(BlockReader {
            file,
            path: path.to_path_buf(),
            block_size,
            buf: vec![0; chunk],
            pos: 0,
            len: 0,
            next_index: 0,
            skipped: 0,
            sha256: Sha256::new(),
            md5: want_md5.then(Md5::new),
            progress,
            skip_zero,
        })
    }

    /// Fills the buffer; the last partial block is padded with zeros.
    async fn refill(&mut self) -> Result<bool, RegisterError> {
        let mut n = 0;
        while n < self.buf.len() {
            let r =
                self.file
                    .read(&mut self.buf[n..])
                    .await
                    .map_err(|source| RegisterError::Io {
                        path: self.path.clone(),
                        source,
                    })?;
            if r == 0 {
                break;
            }
            n += r;
        }
        self.sha256.update(&self.buf[..n]);
        if let Some(m) = &mut self.md5 {
            m.update(&self.buf[..n]);
        }
        self.progress.advance(n as u64);
        let padded = n.div_ceil(self.block_size) * self.block_size;
        self.buf[n..padded].fill(0);
        self.pos = 0;
        self.len = padded;
        Ok(n > 0)
    }

    /// Hex SHA-256 and the MD5 state of everything read.
    fn digests(&mut self) -> (String, Option<Md5>) {
        let sha = std::mem::take(&mut self.sha256);
        (hex::encode(sha.finalize()), self.md5.take())
    }

    /// The next block to upload (index, data); all-zero blocks are skipped.
    async fn next_block(&mut self) -> Result<Option<(u64, Bytes)>, RegisterError> {
        loop {
            if self.pos >= self.len && !self.refill().await? {
                return Ok(None);
            }
            let block = &self.buf[self.pos..self.pos + self.block_size];
            let index = self.next_index;
            self.pos += self.block_size;
            self.next_index += 1;
            if self.skip_zero && is_zero(block) {
                self.skipped += 1;
                continue;
            }
            return Ok(Some((index, Bytes::copy_from_slice(block))));
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Checks the file's digests against the ones the build recorded.
fn check_digests(
    image: &ImageInfo,
    sha256_hex: &str,
    md5: Option<Md5>,
) -> Result<(), RegisterError> {
    if let Some(want) = &image.sha256 {
        if !want.eq_ignore_ascii_case(sha256_hex) {
            return Err(RegisterError::Integrity {
                what: format!("SHA-256 of {} vs the build manifest", image.path.display()),
                expected: want.clone(),
                actual: sha256_hex.to_string(),
            });
        }
    }
    if let (Some(want), Some(m)) = (&image.md5, md5) {
        let got = hex::encode(m.finalize());
        if !want.eq_ignore_ascii_case(&got) {
            return Err(RegisterError::Integrity {
                what: format!("MD5 of {} vs the build manifest", image.path.display()),
                expected: want.clone(),
                actual: got,
            });
        }
    }
    Ok(())
}

/// The EBS LINEAR aggregate: SHA-256 over the concatenated binary per-block
/// SHA-256s in block-index order, base64.
pub fn linear_aggregate<'a>(block_sha256s: impl IntoIterator<Item = &'a [u8; 32]>) -> String {
    let mut h = Sha256::new();
    for s in block_sha256s {
        h.update(s);
    }
    B64.encode(h.finalize())
}

async fn ebs_upload(
    c: &Clients,
    image: &ImageInfo,
    opts: &Ec2Options,
    progress: &dyn Progress,
    size: u64,
    volume_gib: u64,
    created: &mut Created,
) -> Result<Uploaded, RegisterError> {
    let mut start = c
        .ebs
        .start_snapshot()
        .volume_size(volume_gib as i64)
        .description(
            image
                .description
                .clone()
                .unwrap_or_else(|| format!("mkimage {} ({})", image.name, image.build_id)),
        )
        .timeout(240)
        .client_token(client_token(image))
        .tags(
            aws_sdk_ebs::types::Tag::builder()
                .key(BUILD_ID_TAG)
                .value(&image.build_id)
                .build(),
        )
        .tags(
            aws_sdk_ebs::types::Tag::builder()
                .key("Name")
                .value(&image.name)
                .build(),
        );
    if let Some(d) = &image.description {
        start = start.description(d);
    }
    created.journal("ec2-snapshot", None, None);
    let out = start.send().await.map_err(|e| sdk("StartSnapshot", e))?;
    let snapshot_id = out
        .snapshot_id()
        .ok_or_else(|| RegisterError::api("StartSnapshot", "the answer has no SnapshotId"))?
        .to_string();
    created.snapshots.push(snapshot_id.clone());
    if env_flag("MKIMAGE_TEST_PAUSE_AFTER_START_SNAPSHOT") {
        // Test hook: hold the half-made snapshot so a test can kill us here.
        eprintln!("mkimage-test: paused after StartSnapshot {snapshot_id}");
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    let block_size = out
        .block_size()
        .filter(|b| *b > 0)
        .ok_or_else(|| RegisterError::api("StartSnapshot", "the answer has no BlockSize"))?
        as usize;
    let blocks_total = size.div_ceil(block_size as u64);
    if blocks_total > i32::MAX as u64 {
        return Err(RegisterError::Invalid(format!(
            "{blocks_total} blocks of {block_size} bytes do not fit EBS block indexes"
        )));
    }
    tracing::info!(snapshot = %snapshot_id, block_size, blocks_total, "EBS snapshot started");

    progress.start(&format!("EBS snapshot {snapshot_id}"), size);
    let mut reader = BlockReader::open(
        &image.path,
        block_size,
        4 << 20,
        image.md5.is_some(),
        true,
        progress,
    )
    .await?;
    let mut hashes: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    {
        let blocks = futures::stream::try_unfold(&mut reader, |r| async move {
            Ok::<_, RegisterError>(r.next_block().await?.map(|b| (b, r)))
        });
        let ebs = &c.ebs;
        let sid = snapshot_id.as_str();
        let put = blocks
            .map_ok(|(index, data)| async move {
                let sha: [u8; 32] = Sha256::digest(&data).into();
                let len = data.len() as i32;
                ebs.put_snapshot_block()
                    .snapshot_id(sid)
                    .block_index(index as i32)
                    .data_length(len)
                    .block_data(aws_sdk_ebs::primitives::ByteStream::from(data))
                    .checksum(B64.encode(sha))
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .send()
                    .await
                    .map_err(|e| sdk(&format!("PutSnapshotBlock (block {index})"), e))?;
                Ok::<_, RegisterError>((index, sha))
            })
            .try_buffer_unordered(opts.parallelism);
        futures::pin_mut!(put);
        while let Some((index, sha)) = put.try_next().await? {
            hashes.insert(index, sha);
        }
    }
    progress.finish();

    let blocks_uploaded = hashes.len() as u64;
    let blocks_skipped = reader.skipped;
    debug_assert_eq!(blocks_uploaded + blocks_skipped, blocks_total);
    let (sha256_hex, md5) = reader.digests();
    check_digests(image, &sha256_hex, md5)?;

    let aggregate = linear_aggregate(hashes.values());
    c.ebs
        .complete_snapshot()
        .snapshot_id(&snapshot_id)
        .changed_blocks_count(blocks_uploaded as i32)
        .checksum(&aggregate)
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .map_err(|e| sdk("CompleteSnapshot", e))?;
    tracing::info!(snapshot = %snapshot_id, blocks_uploaded, blocks_skipped, "EBS snapshot completed");
    Ok(Uploaded {
        snapshot_id,
        aggregate: Some(aggregate),
        block_size: Some(block_size as u64),
        blocks_uploaded,
        blocks_skipped,
        bytes_uploaded: blocks_uploaded * block_size as u64,
        image_sha256: sha256_hex,
        s3_key: None,
        import_task_id: None,
    })
}

fn client_token(image: &ImageInfo) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut t = format!("mkimage-{}-{nanos}", image.build_id);
    t.truncate(64);
    t
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The ImportSnapshot disk format for our disk format.
fn import_format(disk_format: &str) -> Result<&'static str, RegisterError> {
    match disk_format {
        "raw" => Ok("RAW"),
        "vmdk" => Ok("VMDK"),
        o => Err(RegisterError::Invalid(format!(
            "ImportSnapshot takes RAW, VMDK or VHD images, not {o}; convert it with qemu-img"
        ))),
    }
}

async fn s3_import(
    c: &Clients,
    image: &ImageInfo,
    opts: &Ec2Options,
    progress: &dyn Progress,
    size: u64,
    bucket: &str,
    created: &mut Created,
) -> Result<Uploaded, RegisterError> {
    let format = import_format(&image.disk_format)?;
    let key = format!(
        "{}{}/{}.{}",
        opts.s3_prefix, image.build_id, image.name, image.disk_format
    );
    let part_size = opts.s3_part_size.max(5 << 20).max(size.div_ceil(10_000)) as usize;

    created.journal("s3-multipart", Some(bucket), Some(&key));
    let mpu =
        c.s3.create_multipart_upload()
            .bucket(bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .tagging(format!(
                "{}={}",
                percent_encode(BUILD_ID_TAG),
                percent_encode(&image.build_id)
            ))
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| sdk("CreateMultipartUpload", e))?;
    let upload_id = mpu
        .upload_id()
        .ok_or_else(|| RegisterError::api("CreateMultipartUpload", "the answer has no UploadId"))?
        .to_string();
    created.multipart = Some((bucket.to_string(), key.clone(), upload_id.clone()));

    progress.start(&format!("s3://{bucket}/{key}"), size);
    let mut reader = BlockReader::open(
        &image.path,
        part_size,
        part_size,
        image.md5.is_some(),
        false,
        progress,
    )
    .await?;
    let mut done = vec![];
    {
        let s3 = &c.s3;
        let (k, uid) = (key.as_str(), upload_id.as_str());
        let parts = futures::stream::try_unfold(&mut reader, |r| async move {
            Ok::<_, RegisterError>(r.next_block().await?.map(|b| (b, r)))
        })
        .map_ok(|(index, mut data)| async move {
            // The last part is not padded.
            let end = size - index * part_size as u64;
            if (data.len() as u64) > end {
                data.truncate(end as usize);
            }
            let part_number = index as i32 + 1;
            let out = s3
                .upload_part()
                .bucket(bucket)
                .key(k)
                .upload_id(uid)
                .part_number(part_number)
                .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
                .body(aws_sdk_s3::primitives::ByteStream::from(data))
                .send()
                .await
                .map_err(|e| sdk(&format!("UploadPart (part {part_number})"), e))?;
            Ok::<_, RegisterError>(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(part_number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .build(),
            )
        })
        .try_buffer_unordered(opts.parallelism);
        futures::pin_mut!(parts);
        while let Some(p) = parts.try_next().await? {
            done.push(p);
        }
    }
    progress.finish();
    done.sort_by_key(|p| p.part_number());

    let (sha256_hex, md5) = reader.digests();
    check_digests(image, &sha256_hex, md5)?;

    created.journal("s3-object", Some(bucket), Some(&key));
    c.s3.complete_multipart_upload()
        .bucket(bucket)
        .key(&key)
        .upload_id(&upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .map_err(|e| sdk("CompleteMultipartUpload", e))?;
    created.multipart = None;
    created.s3_object = Some((bucket.to_string(), key.clone()));
    created.keep_s3_object = opts.keep_s3_object_on_failure;
    tracing::info!(bucket, key = %key, "uploaded to S3");

    let tag = aws_sdk_ec2::types::Tag::builder()
        .key(BUILD_ID_TAG)
        .value(&image.build_id)
        .build();
    created.journal("ec2-snapshot", None, None);
    let import = c
        .ec2
        .import_snapshot()
        .description(format!("mkimage {} ({})", image.name, image.build_id))
        .disk_container(
            SnapshotDiskContainer::builder()
                .format(format)
                .description(&image.name)
                .user_bucket(UserBucket::builder().s3_bucket(bucket).s3_key(&key).build())
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::ImportSnapshotTask)
                .tags(tag.clone())
                .build(),
        )
        .send()
        .await;
    let import = match import {
        Ok(o) => o,
        Err(e) => {
            if let Some(resp) = e.raw_response() {
                let body = resp
                    .body()
                    .bytes()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let code = aws_sdk_ec2::error::ProvideErrorMetadata::code(&e)
                    .unwrap_or("")
                    .to_string();
                let status = resp.status().as_u16();
                // moto answers actions it lacks with a bare HTML 500 page; AWS
                // always answers with an XML error document that has a code.
                let not_aws_error = status == 500 && code.is_empty() && !body.contains("<Response");
                if body.contains("not been implemented")
                    || code == "NotImplemented"
                    || status == 501
                    || not_aws_error
                {
                    let body = if not_aws_error {
                        "HTTP 500 without an AWS error document (what moto answers for actions it does not implement)".to_string()
                    } else {
                        format!("HTTP {status}: {}", body.trim())
                    };
                    return Err(RegisterError::NotImplemented {
                        call: "ImportSnapshot".into(),
                        endpoint: opts
                            .endpoint_url
                            .clone()
                            .unwrap_or_else(|| format!("EC2 in {}", c.region)),
                        message: body,
                    });
                }
            }
            return Err(sdk("ImportSnapshot", e));
        }
    };
    let task = import
        .import_task_id()
        .ok_or_else(|| RegisterError::api("ImportSnapshot", "the answer has no ImportTaskId"))?
        .to_string();
    progress.start(&format!("import task {task}"), 0);
    let start = Instant::now();
    let snapshot_id = loop {
        let out = c
            .ec2
            .describe_import_snapshot_tasks()
            .import_task_ids(&task)
            .send()
            .await
            .map_err(|e| sdk("DescribeImportSnapshotTasks", e))?;
        let detail = out
            .import_snapshot_tasks()
            .first()
            .and_then(|t| t.snapshot_task_detail());
        if let Some(d) = detail {
            match d.status() {
                Some("completed") => {
                    break d.snapshot_id().map(str::to_string).ok_or_else(|| {
                        RegisterError::api(
                            "DescribeImportSnapshotTasks",
                            format!("task {task} completed without a snapshot id"),
                        )
                    })?;
                }
                Some("deleting") | Some("deleted") => {
                    return Err(RegisterError::api(
                        "ImportSnapshot",
                        format!(
                            "import task {task} failed: {}",
                            d.status_message().unwrap_or("no message")
                        ),
                    ))
                }
                _ => {}
            }
        }
        if start.elapsed() > opts.wait_timeout {
            return Err(RegisterError::Timeout {
                what: format!("import task {task}"),
                seconds: opts.wait_timeout.as_secs(),
            });
        }
        tokio::time::sleep(opts.poll_interval).await;
    };
    progress.finish();
    created.snapshots.push(snapshot_id.clone());
    c.ec2
        .create_tags()
        .resources(&snapshot_id)
        .tags(tag)
        .send()
        .await
        .map_err(|e| sdk("CreateTags", e))?;
    Ok(Uploaded {
        snapshot_id,
        aggregate: None,
        block_size: None,
        blocks_uploaded: 0,
        blocks_skipped: 0,
        bytes_uploaded: size,
        image_sha256: sha256_hex,
        s3_key: Some(key),
        import_task_id: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_aggregate_is_sha256_of_concatenated_block_hashes() {
        let a: [u8; 32] = Sha256::digest(b"a").into();
        let b: [u8; 32] = Sha256::digest(b"b").into();
        let mut cat = Vec::new();
        cat.extend_from_slice(&a);
        cat.extend_from_slice(&b);
        assert_eq!(linear_aggregate([&a, &b]), B64.encode(Sha256::digest(&cat)));
        assert_ne!(linear_aggregate([&b, &a]), linear_aggregate([&a, &b]));
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 524_288];
        assert!(is_zero(&v));
        v[524_287] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn import_formats_and_tag_encoding() {
        assert_eq!(import_format("raw").unwrap(), "RAW");
        assert_eq!(import_format("vmdk").unwrap(), "VMDK");
        assert!(import_format("qcow2").is_err());
        assert_eq!(percent_encode("mkimage:build-id"), "mkimage%3Abuild-id");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn boot_mode_parses() {
        assert_eq!("uefi".parse::<BootMode>().unwrap(), BootMode::Uefi);
        assert_eq!(
            "legacy-bios".parse::<BootMode>().unwrap(),
            BootMode::LegacyBios
        );
        assert!("efi2".parse::<BootMode>().is_err());
    }

    #[tokio::test]
    async fn block_reader_pads_the_last_block_and_skips_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut data = vec![0u8; 4096 + 10];
        data[600] = 7;
        data[4100] = 9;
        std::fs::write(&p, &data).unwrap();
        let mut r = BlockReader::open(&p, 512, 1024, true, true, &crate::NoProgress)
            .await
            .unwrap();
        let (i1, b1) = r.next_block().await.unwrap().unwrap();
        assert_eq!((i1, b1.len(), b1[600 - 512]), (1, 512, 7));
        let (i2, b2) = r.next_block().await.unwrap().unwrap();
        assert_eq!((i2, b2.len(), b2[4100 - 4096]), (8, 512, 9));
        assert!(b2[10..].iter().all(|&b| b == 0), "padding is zero");
        assert!(r.next_block().await.unwrap().is_none());
        assert_eq!(r.skipped, 7);
        let (sha, md5) = r.digests();
        assert_eq!(sha, hex::encode(Sha256::digest(&data)));
        assert_eq!(
            hex::encode(md5.unwrap().finalize()),
            hex::encode(Md5::digest(&data))
        );
    }
}
