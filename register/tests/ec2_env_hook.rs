//! The `MKIMAGE_TEST_FAIL_AFTER_SNAPSHOT=1` hook (own test binary: it sets a
//! process-wide environment variable).

mod common;

use aws_sdk_ec2::types::Filter;
use common::*;
use register::{ec2, NoProgress, RegisterError, BUILD_ID_TAG};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_hook_fails_after_complete_snapshot_and_cleans_up() {
    std::env::set_var(ec2::FAIL_AFTER_SNAPSHOT_ENV, "1");
    let Some(moto) = Moto::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("disk.img");
    make_image(&path, 2 << 20, &[(4096, 10_000)]);
    let build_id = uuid::Uuid::new_v4().to_string();
    let opts = moto.ec2_options();
    let err = register::register_ec2(
        &image_info(&path, "env-hook", &build_id),
        &opts,
        &NoProgress,
    )
    .await
    .expect_err("the hook must fail the registration");
    assert!(matches!(err.root(), RegisterError::Injected(_)), "{err}");
    let c = ec2::clients(&opts).await.unwrap();
    let snaps = c
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            Filter::builder()
                .name(format!("tag:{BUILD_ID_TAG}"))
                .values(&build_id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(snaps.snapshots().is_empty(), "no snapshot left behind");
    let rec = moto.recorded().await;
    assert!(rec
        .iter()
        .any(|r| r.path().starts_with("/snapshots/completion/")));
    assert!(!rec
        .iter()
        .any(|r| r.action().as_deref() == Some("RegisterImage")));
}
