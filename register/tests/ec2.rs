//! EC2 registration against a real `moto_server` on 127.0.0.1.
//!
//! moto stores RegisterImage shallowly, so besides moto's state these tests check the
//! requests our client sent, from moto's request recorder.

mod common;

use aws_sdk_ec2::types::Filter;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use register::{ec2, Ec2Options, NoProgress, RegisterError, Via, BUILD_ID_TAG};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// 8 MiB + 100 bytes (the last block is partial), data in three places.
fn test_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("disk.img");
    let data = make_image(
        &p,
        8 * MIB + 100,
        &[(0, 200 * 1024), (5 * MIB + 3, 20_000), (8 * MIB + 40, 60)],
    );
    (p, data)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn snapshots_tagged(c: &ec2::Clients, build_id: &str) -> Vec<String> {
    c.ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            Filter::builder()
                .name(format!("tag:{BUILD_ID_TAG}"))
                .values(build_id)
                .build(),
        )
        .send()
        .await
        .expect("DescribeSnapshots")
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_string))
        .collect()
}

async fn images_named(c: &ec2::Clients, name: &str) -> Vec<String> {
    c.ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .expect("DescribeImages")
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect()
}

fn calls<'a>(rec: &'a [Recorded], action: &str) -> Vec<&'a Recorded> {
    rec.iter()
        .filter(|r| r.action().as_deref() == Some(action))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebs_direct_skips_zero_blocks_checksums_and_registers_hvm_ami() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (path, data) = test_image(tmp.path());
    let build_id = uuid();
    let mut info = image_info(&path, "mkimage-ebs-test", &build_id);
    info.sha256 = Some(hex::encode(Sha256::digest(&data)));
    info.md5 = Some(hex::encode(md5::Md5::digest(&data)));
    let opts = Ec2Options {
        parallelism: 8,
        ..moto.ec2_options()
    };

    let progress = CountingProgress::default();
    let reg = register::register_ec2(&info, &opts, &progress)
        .await
        .expect("register_ec2");
    assert_eq!(
        progress.advanced.load(std::sync::atomic::Ordering::SeqCst),
        data.len() as u64,
        "progress saw every byte"
    );
    assert_eq!(progress.started.lock().unwrap()[0].1, data.len() as u64);
    assert_eq!(
        progress.finished.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Block size comes from StartSnapshot (moto: 512), not a constant.
    let block = reg.block_size.expect("block size") as usize;
    assert_eq!(block, 512);
    let nonzero = nonzero_blocks(&data, block);
    let total = data.len().div_ceil(block);
    assert_eq!(reg.blocks_uploaded as usize, nonzero.len());
    assert_eq!(reg.blocks_skipped as usize, total - nonzero.len());
    assert!(
        reg.blocks_skipped > reg.blocks_uploaded,
        "most blocks are zero"
    );
    assert_eq!(reg.volume_size_gib, 1);
    assert_eq!(reg.image_size, data.len() as u64);
    assert_eq!(
        reg.image_sha256.as_deref(),
        Some(hex::encode(Sha256::digest(&data)).as_str())
    );
    let snapshot_id = reg.snapshot_id.clone().unwrap();

    // Expected LINEAR aggregate, computed independently.
    let mut agg = Sha256::new();
    for (_, b) in &nonzero {
        agg.update(Sha256::digest(b));
    }
    let expected_agg = B64.encode(agg.finalize());
    assert_eq!(
        reg.snapshot_sha256_aggregate.as_deref(),
        Some(expected_agg.as_str())
    );

    let rec = moto.recorded().await;

    // PutSnapshotBlock: exactly the non-zero blocks, each with its SHA-256.
    let puts: Vec<&Recorded> = rec
        .iter()
        .filter(|r| {
            r.method == "PUT"
                && r.path()
                    .starts_with(&format!("/snapshots/{snapshot_id}/blocks/"))
        })
        .collect();
    assert_eq!(
        puts.len(),
        nonzero.len(),
        "one PutSnapshotBlock per non-zero block"
    );
    let expected: std::collections::BTreeMap<usize, &Vec<u8>> =
        nonzero.iter().map(|(i, b)| (*i, b)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for p in &puts {
        let idx: usize = p.path().rsplit('/').next().unwrap().parse().unwrap();
        assert!(seen.insert(idx), "block {idx} uploaded twice");
        let want = expected
            .get(&idx)
            .unwrap_or_else(|| panic!("block {idx} is all zeros but was uploaded"));
        assert_eq!(&p.body, *want, "data of block {idx}");
        assert_eq!(
            p.header("x-amz-Checksum"),
            Some(B64.encode(Sha256::digest(&p.body)).as_str())
        );
        assert_eq!(p.header("x-amz-Checksum-Algorithm"), Some("SHA256"));
        assert_eq!(p.header("x-amz-Data-Length"), Some("512"));
    }

    // CompleteSnapshot with the aggregate.
    let complete: Vec<&Recorded> = rec
        .iter()
        .filter(|r| {
            r.method == "POST" && r.path() == format!("/snapshots/completion/{snapshot_id}")
        })
        .collect();
    assert_eq!(complete.len(), 1);
    let c = complete[0];
    assert_eq!(c.header("x-amz-Checksum"), Some(expected_agg.as_str()));
    assert_eq!(
        c.header("x-amz-Checksum-Aggregation-Method"),
        Some("LINEAR")
    );
    assert_eq!(c.header("x-amz-Checksum-Algorithm"), Some("SHA256"));
    assert_eq!(
        c.header("x-amz-ChangedBlocksCount"),
        Some(nonzero.len().to_string().as_str())
    );

    // StartSnapshot tags the snapshot with the build id.
    let start = rec
        .iter()
        .find(|r| r.method == "POST" && r.path() == "/snapshots")
        .expect("StartSnapshot recorded");
    let body: serde_json::Value = serde_json::from_slice(&start.body).unwrap();
    assert_eq!(body["VolumeSize"], 1);
    assert!(body["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["Key"] == BUILD_ID_TAG && t["Value"] == build_id.as_str()));

    // RegisterImage parameters as sent.
    let regs = calls(&rec, "RegisterImage");
    assert_eq!(regs.len(), 1);
    let f = regs[0].form();
    let want = [
        ("Name", "mkimage-ebs-test"),
        ("Architecture", "x86_64"),
        ("VirtualizationType", "hvm"),
        ("EnaSupport", "true"),
        ("BootMode", "legacy-bios"),
        ("RootDeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot_id.as_str()),
        ("BlockDeviceMapping.1.Ebs.VolumeSize", "1"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
        ("TagSpecification.1.ResourceType", "image"),
        ("TagSpecification.1.Tag.1.Key", BUILD_ID_TAG),
        ("TagSpecification.1.Tag.1.Value", build_id.as_str()),
    ];
    for (k, v) in want {
        assert_eq!(
            f.get(k).map(String::as_str),
            Some(v),
            "RegisterImage {k}; form: {f:?}"
        );
    }

    // moto's state: the AMI and the tagged, completed snapshot exist.
    let clients = ec2::clients(&opts).await.unwrap();
    assert_eq!(
        images_named(&clients, "mkimage-ebs-test").await,
        vec![reg.ami_id.clone()]
    );
    assert_eq!(
        snapshots_tagged(&clients, &build_id).await,
        vec![snapshot_id.clone()]
    );
    let blocks = clients
        .ebs
        .list_snapshot_blocks()
        .snapshot_id(&snapshot_id)
        .max_results(10000)
        .send()
        .await
        .unwrap();
    assert_eq!(blocks.blocks().len(), nonzero.len());

    // The record serialises for the manifest's `registrations`.
    let v = serde_json::to_value(&reg).unwrap();
    assert_eq!(v["cloud"], "ec2");
    assert_eq!(v["ami_id"], reg.ami_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_is_not_duplicated_and_replace_replaces() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = test_image(tmp.path());
    let opts = moto.ec2_options();
    let clients = ec2::clients(&opts).await.unwrap();
    let name = "mkimage-idempotent";

    let first = register::register_ec2(&image_info(&path, name, &uuid()), &opts, &NoProgress)
        .await
        .expect("first registration");
    assert!(!first.existing);

    moto.reset_recording().await;
    let second = register::register_ec2(&image_info(&path, name, &uuid()), &opts, &NoProgress)
        .await
        .expect("second registration");
    assert!(second.existing, "reported as existing");
    assert_eq!(second.ami_id, first.ami_id);
    assert_eq!(
        images_named(&clients, name).await,
        vec![first.ami_id.clone()]
    );
    let rec = moto.recorded().await;
    assert!(
        calls(&rec, "RegisterImage").is_empty(),
        "no second RegisterImage"
    );
    assert!(
        !rec.iter()
            .any(|r| r.path() == "/snapshots" && r.method == "POST"),
        "no second upload"
    );

    let third_build = uuid();
    let third = register::register_ec2(
        &image_info(&path, name, &third_build),
        &Ec2Options {
            replace: true,
            ..opts.clone()
        },
        &NoProgress,
    )
    .await
    .expect("replace");
    assert!(!third.existing);
    assert_ne!(third.ami_id, first.ami_id);
    assert_eq!(third.replaced, vec![first.ami_id.clone()]);
    assert_eq!(
        images_named(&clients, name).await,
        vec![third.ami_id.clone()]
    );
    let rec = moto.recorded().await;
    let dereg = calls(&rec, "DeregisterImage");
    assert_eq!(dereg.len(), 1);
    assert_eq!(dereg[0].form().get("ImageId"), Some(&first.ami_id));
    // Deregistered only after the new snapshot was complete.
    let pos = |pred: &dyn Fn(&Recorded) -> bool| rec.iter().position(pred).unwrap();
    let complete_at = pos(&|r| r.path().starts_with("/snapshots/completion/"));
    let dereg_at = pos(&|r| r.action().as_deref() == Some("DeregisterImage"));
    let register_at = pos(&|r| r.action().as_deref() == Some("RegisterImage"));
    assert!(complete_at < dereg_at && dereg_at < register_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_complete_snapshot_leaves_no_snapshot() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = test_image(tmp.path());
    let build_id = uuid();
    let opts = Ec2Options {
        fail_after_complete_snapshot: true,
        ..moto.ec2_options()
    };
    let err = register::register_ec2(
        &image_info(&path, "mkimage-fails", &build_id),
        &opts,
        &NoProgress,
    )
    .await
    .expect_err("the injected failure must fail the registration");
    assert!(matches!(err.root(), RegisterError::Injected(_)), "{err}");
    match &err {
        RegisterError::CleanedUp {
            cleaned_up,
            left_behind,
            ..
        } => {
            assert_eq!(cleaned_up.len(), 1, "{err}");
            assert!(cleaned_up[0].starts_with("snapshot snap-"), "{err}");
            assert!(left_behind.is_empty(), "{err}");
        }
        e => panic!("expected a CleanedUp error, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("after CompleteSnapshot") && msg.contains("deleted"),
        "{msg}"
    );

    let clients = ec2::clients(&opts).await.unwrap();
    let rec = moto.recorded().await;
    assert_eq!(calls(&rec, "DeleteSnapshot").len(), 1);
    assert!(
        snapshots_tagged(&clients, &build_id).await.is_empty(),
        "no snapshot left behind"
    );
    assert!(images_named(&clients, "mkimage-fails").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_not_matching_its_manifest_is_rejected_and_cleaned_up() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = test_image(tmp.path());
    let build_id = uuid();
    let mut info = image_info(&path, "mkimage-changed", &build_id);
    info.sha256 = Some("00".repeat(32));
    let opts = moto.ec2_options();
    let err = register::register_ec2(&info, &opts, &NoProgress)
        .await
        .expect_err("digest mismatch");
    assert!(
        matches!(err.root(), RegisterError::Integrity { .. }),
        "{err}"
    );
    let clients = ec2::clients(&opts).await.unwrap();
    assert!(snapshots_tagged(&clients, &build_id).await.is_empty());
    let rec = moto.recorded().await;
    assert!(
        !rec.iter()
            .any(|r| r.path().starts_with("/snapshots/completion/")),
        "a mismatching image is never completed"
    );
    assert!(calls(&rec, "RegisterImage").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_path_uploads_object_and_sends_import_snapshot() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (path, data) = test_image(tmp.path());
    let bucket = "mkimage-images";
    let base = moto.ec2_options();
    let clients = ec2::clients(&base).await.unwrap();
    clients
        .s3
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("CreateBucket");

    // 1. Object kept on failure on request: check that it is really there.
    let build_id = uuid();
    let opts = Ec2Options {
        via: Via::S3 {
            bucket: bucket.into(),
        },
        s3_part_size: 5 * MIB,
        // moto's recorder appends big bodies in several writes: concurrent 5 MiB
        // parts would interleave their lines in the recording.
        parallelism: 1,
        keep_s3_object_on_failure: true,
        ..base.clone()
    };
    let err = register::register_ec2(
        &image_info(&path, "mkimage-s3", &build_id),
        &opts,
        &NoProgress,
    )
    .await
    .expect_err("moto does not implement ImportSnapshot");
    match err.root() {
        RegisterError::NotImplemented { call, .. } => assert_eq!(call, "ImportSnapshot"),
        e => panic!("expected NotImplemented, got {e}"),
    }
    assert!(
        err.to_string()
            .contains("ImportSnapshot is not implemented"),
        "{err}"
    );
    let key = format!("mkimage/{build_id}/mkimage-s3.raw");
    let obj = clients
        .s3
        .get_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .expect("the uploaded object is there");
    let got = obj.body.collect().await.unwrap().into_bytes();
    assert_eq!(got.len(), data.len());
    assert!(
        got.as_ref() == data.as_slice(),
        "S3 object bytes equal the image"
    );
    let tags = clients
        .s3
        .get_object_tagging()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert!(tags
        .tag_set()
        .iter()
        .any(|t| t.key() == BUILD_ID_TAG && t.value() == build_id));

    let rec = moto.recorded().await;
    let parts = rec
        .iter()
        .filter(|r| r.method == "PUT" && r.url.contains("partNumber="))
        .count();
    assert_eq!(parts, 2, "8 MiB in 5 MiB parts");
    let imports = calls(&rec, "ImportSnapshot");
    assert!(!imports.is_empty());
    let f = imports[0].form();
    assert_eq!(
        f.get("DiskContainer.Format").map(String::as_str),
        Some("RAW"),
        "{f:?}"
    );
    assert_eq!(
        f.get("DiskContainer.UserBucket.S3Bucket")
            .map(String::as_str),
        Some(bucket)
    );
    assert_eq!(f.get("DiskContainer.UserBucket.S3Key"), Some(&key));
    assert_eq!(
        f.get("TagSpecification.1.ResourceType").map(String::as_str),
        Some("import-snapshot-task")
    );
    assert_eq!(f.get("TagSpecification.1.Tag.1.Value"), Some(&build_id));
    assert!(calls(&rec, "RegisterImage").is_empty());

    // 2. Default: the object is deleted when the import fails.
    let build_id2 = uuid();
    let opts2 = Ec2Options {
        keep_s3_object_on_failure: false,
        ..opts.clone()
    };
    let err = register::register_ec2(
        &image_info(&path, "mkimage-s3", &build_id2),
        &opts2,
        &NoProgress,
    )
    .await
    .expect_err("moto does not implement ImportSnapshot");
    let key2 = format!("mkimage/{build_id2}/mkimage-s3.raw");
    match &err {
        RegisterError::CleanedUp { cleaned_up, .. } => {
            assert!(cleaned_up.iter().any(|c| c.contains(&key2)), "{err}")
        }
        e => panic!("expected CleanedUp, got {e}"),
    }
    let head = clients
        .s3
        .head_object()
        .bucket(bucket)
        .key(&key2)
        .send()
        .await;
    assert!(head.is_err(), "object deleted after the failed import");
    let rec = moto.recorded().await;
    assert!(rec
        .iter()
        .any(|r| r.method == "DELETE" && r.path().ends_with(&key2)));
}
