//! Cloud resources in the caller's crash journal.
//!
//! Before this crate creates something in a cloud that a failed registration must
//! delete again (an EBS snapshot, an S3 multipart upload or object), it tells the
//! hook the caller installed ([`set_hook`]): `mkimage` writes it to the journal of
//! the running command, so that after a SIGKILL `mkimage gc` can find the resource
//! — by the build-id tag and key it carries, since its id is not known before it
//! exists — and delete it with [`release`].

use crate::ec2::{clients, sdk, Ec2Options};
use crate::{RegisterError, BUILD_ID_TAG};
use aws_sdk_ec2::types::Filter;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// A cloud resource a registration is about to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudResource {
    /// `ec2-snapshot`, `s3-multipart` or `s3-object`.
    pub kind: String,
    /// The build id the resource is tagged with.
    pub build_id: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    pub key: Option<String>,
}

impl CloudResource {
    pub fn describe(&self) -> String {
        match (self.bucket.as_deref(), self.key.as_deref()) {
            (Some(b), Some(k)) => format!("{} s3://{b}/{k}", self.kind),
            _ => format!("{} tagged {}={}", self.kind, BUILD_ID_TAG, self.build_id),
        }
    }
}

/// Receives journal events; returns a ticket for `release`.
pub trait ResourceHook: Send + Sync {
    fn acquire(&self, r: &CloudResource) -> Option<u64>;
    fn release(&self, ticket: Option<u64>);
}

static HOOK: OnceLock<Box<dyn ResourceHook>> = OnceLock::new();

/// Installs the process's hook (once; later calls are ignored).
pub fn set_hook(h: Box<dyn ResourceHook>) {
    let _ = HOOK.set(h);
}

pub(crate) fn acquire(r: CloudResource) -> Option<u64> {
    HOOK.get().and_then(|h| h.acquire(&r))
}

pub(crate) fn release_all(tickets: &mut Vec<Option<u64>>) {
    if let Some(h) = HOOK.get() {
        for t in tickets.drain(..) {
            h.release(t);
        }
    }
}

/// Deletes what a dead registration left of `r`, with credentials from the
/// environment (the AWS config chain). Snapshots an AMI uses are kept.
pub async fn release(r: &CloudResource, dry_run: bool) -> Result<String, RegisterError> {
    let opts = Ec2Options {
        endpoint_url: r.endpoint.clone(),
        region: r.region.clone(),
        max_attempts: Some(2),
        ..Ec2Options::default()
    };
    let c = clients(&opts).await?;
    match r.kind.as_str() {
        "ec2-snapshot" => {
            let snaps = c
                .ec2
                .describe_snapshots()
                .owner_ids("self")
                .filters(
                    Filter::builder()
                        .name(format!("tag:{BUILD_ID_TAG}"))
                        .values(&r.build_id)
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sdk("DescribeSnapshots", e))?;
            let mut done = Vec::new();
            for s in snaps.snapshots() {
                let Some(id) = s.snapshot_id() else { continue };
                let used = c
                    .ec2
                    .describe_images()
                    .owners("self")
                    .filters(
                        Filter::builder()
                            .name("block-device-mapping.snapshot-id")
                            .values(id)
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| sdk("DescribeImages", e))?;
                if !used.images().is_empty() {
                    done.push(format!("{id} kept (an AMI uses it)"));
                    continue;
                }
                if !dry_run {
                    c.ec2
                        .delete_snapshot()
                        .snapshot_id(id)
                        .send()
                        .await
                        .map_err(|e| sdk("DeleteSnapshot", e))?;
                }
                done.push(format!(
                    "{} {id}",
                    if dry_run { "would delete" } else { "deleted" }
                ));
            }
            Ok(if done.is_empty() {
                "no snapshot left".into()
            } else {
                done.join(", ")
            })
        }
        "s3-multipart" => {
            let (Some(b), Some(k)) = (&r.bucket, &r.key) else {
                return Ok("no bucket/key recorded".into());
            };
            let ups =
                c.s3.list_multipart_uploads()
                    .bucket(b)
                    .prefix(k)
                    .send()
                    .await
                    .map_err(|e| sdk("ListMultipartUploads", e))?;
            let mut n = 0;
            for u in ups.uploads() {
                if u.key() != Some(k.as_str()) {
                    continue;
                }
                if let (false, Some(id)) = (dry_run, u.upload_id()) {
                    c.s3.abort_multipart_upload()
                        .bucket(b)
                        .key(k)
                        .upload_id(id)
                        .send()
                        .await
                        .map_err(|e| sdk("AbortMultipartUpload", e))?;
                }
                n += 1;
            }
            Ok(format!(
                "{} {n} upload(s)",
                if dry_run { "would abort" } else { "aborted" }
            ))
        }
        "s3-object" => {
            let (Some(b), Some(k)) = (&r.bucket, &r.key) else {
                return Ok("no bucket/key recorded".into());
            };
            if dry_run {
                return Ok("would delete the object".into());
            }
            c.s3.delete_object()
                .bucket(b)
                .key(k)
                .send()
                .await
                .map_err(|e| sdk("DeleteObject", e))?;
            Ok("deleted the object".into())
        }
        other => Ok(format!("unknown kind {other}; left alone")),
    }
}
