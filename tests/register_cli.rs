//! `mkimage register ec2` through the binary, against a real AWS emulator
//! (moto_server) on 127.0.0.1: the image is verified against its manifest first,
//! and what EC2 stored is appended to the manifest.

use e2e::*;
use emulators::Moto;
use mkimage::manifest::{Artefact, Manifest};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// moto from the workspace's emulator harness (its start is async: the harness serves
/// async tests too); `None` when `MKIMAGE_SKIP_EMULATORS=1` and moto is not installed.
fn start_moto() -> Option<Moto> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(Moto::start())
}

/// An 8 MiB image with data in two places, and the manifest a build would write.
fn image_with_manifest(dir: &Path) -> PathBuf {
    let img = dir.join("small.img");
    let mut bytes = vec![0u8; 8 << 20];
    bytes[..4096].fill(0x11);
    bytes[5 << 20..(5 << 20) + 1000].fill(0x22);
    std::fs::write(&img, &bytes).unwrap();
    let d = mkimage::verify::digest_file(&img, |_| {}).unwrap();
    let m = Manifest {
        tool_version: "test".into(),
        build_id: "regcli01".into(),
        created: "2026-01-01T00:00:00Z".into(),
        recipe_digest: "0".into(),
        recipe: serde_json::json!({"arch": "amd64"}),
        stages: vec![],
        packages: vec![],
        artefacts: vec![Artefact {
            file: "small.img".into(),
            format: "raw".into(),
            size: bytes.len() as u64,
            allocated: bytes.len() as u64,
            md5: d.md5,
            sha256: d.sha256,
        }],
        registrations: vec![],
        preinstall: vec![],
    };
    m.store(&Manifest::path_for(&img)).unwrap();
    img
}

fn register(moto: &Moto, img: &Path) -> std::process::Output {
    run(mkimage()
        .args(["register", "ec2"])
        .arg(img)
        .arg("--endpoint-url")
        .arg(&moto.url)
        .args(["--region", "us-east-1", "--parallelism", "4"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing"))
}

#[test]
fn register_ec2_records_the_ami_in_the_manifest_and_refuses_a_changed_image() {
    let Some(moto) = start_moto() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_manifest(dir.path());
    let out = register(&moto, &img);
    assert!(out.status.success(), "register failed");
    let m = Manifest::load(&Manifest::path_for(&img)).unwrap();
    assert_eq!(m.registrations.len(), 1);
    let r = &m.registrations[0];
    assert_eq!(r["cloud"], "ec2");
    assert!(
        r["result"]["ami_id"].as_str().unwrap().starts_with("ami-"),
        "{r}"
    );
    assert!(
        r["result"]["snapshot_id"]
            .as_str()
            .unwrap()
            .starts_with("snap-"),
        "{r}"
    );
    // A changed byte no longer matches the manifest: refused before any upload.
    let mut b = std::fs::read(&img).unwrap();
    b[100] ^= 1;
    std::fs::write(&img, b).unwrap();
    let out = register(&moto, &img);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mismatch"));
    assert_eq!(
        Manifest::load(&Manifest::path_for(&img))
            .unwrap()
            .registrations
            .len(),
        1
    );
}

/// Snapshot ids moto holds, read with a plain EC2 query call (not our code).
fn moto_snapshots(moto: &Moto) -> Vec<String> {
    let out = Command::new("curl")
        .args(["-s", "-H"])
        .arg("Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0")
        .arg(format!(
            "http://127.0.0.1:{}/?Action=DescribeSnapshots&Version=2016-11-15&Owner.1=self",
            moto.port
        ))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    body.split("<snapshotId>")
        .skip(1)
        .filter_map(|s| s.split("</snapshotId>").next())
        .map(str::to_owned)
        .collect()
}

/// `kill -9` in the middle of an upload leaves a half-made snapshot in the cloud;
/// the crash journal names it (by its build-id tag) and `mkimage gc` deletes it.
#[test]
fn a_killed_registration_leaves_a_snapshot_that_gc_deletes() {
    let Some(moto) = start_moto() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = image_with_manifest(dir.path());
    let before = moto_snapshots(&moto);
    let mut child = mkimage()
        .args(["register", "ec2"])
        .arg(&img)
        .arg("--endpoint-url")
        .arg(&moto.url)
        .args(["--region", "us-east-1"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("MKIMAGE_STATE_DIR", &state)
        .env("MKIMAGE_TEST_PAUSE_AFTER_START_SNAPSHOT", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let mut snap = String::new();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        eprintln!("{line}");
        if let Some(s) = line.strip_prefix("mkimage-test: paused after StartSnapshot ") {
            snap = s.trim().to_owned();
            break;
        }
    }
    assert!(
        snap.starts_with("snap-"),
        "never paused after StartSnapshot"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = moto_snapshots(&moto);
    assert!(
        after_kill.contains(&snap) && !before.contains(&snap),
        "moto should hold the orphan {snap}: {after_kill:?}"
    );
    let gc = run(mkimage()
        .arg("gc")
        .env("MKIMAGE_STATE_DIR", &state)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing"));
    assert!(gc.status.success());
    let said = String::from_utf8_lossy(&gc.stdout);
    assert!(said.contains(&format!("deleted {snap}")), "{said}");
    assert!(
        !moto_snapshots(&moto).contains(&snap),
        "the orphan snapshot survived gc"
    );
    let again = run(mkimage().arg("gc").env("MKIMAGE_STATE_DIR", &state));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to collect"));
}
