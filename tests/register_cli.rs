//! `mkimage register ec2` through the binary, against a real AWS emulator
//! (moto_server) on 127.0.0.1: the image is verified against its manifest first,
//! and what EC2 stored is appended to the manifest.

use e2e::*;
use mkimage::manifest::{Artefact, Manifest};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let venv =
            std::env::var("MKIMAGE_EMULATORS").unwrap_or_else(|_| "/opt/mkimage-emulators".into());
        let bin = PathBuf::from(venv).join("venv-moto/bin/moto_server");
        assert!(
            bin.exists(),
            "{} missing: run tests/harness/setup-emulators.sh",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "moto did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Moto { child, port }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .arg(format!("http://127.0.0.1:{}", moto.port))
        .args(["--region", "us-east-1", "--parallelism", "4"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing"))
}

#[test]
fn register_ec2_records_the_ami_in_the_manifest_and_refuses_a_changed_image() {
    let moto = Moto::start();
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
