//! End-to-end: real mmdebstrap/apt against the host's mirror, real GRUB, real
//! qemu. Run as root (CI does).

use e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const STAGES: [&str; 8] = [
    "debootstrap",
    "system",
    "kernel",
    "core",
    "cloud",
    "finalize",
    "bootloader",
    "assemble",
];

fn minimal(sb: &Sandbox, name: &str) -> Command {
    let mut c = sb.build();
    c.arg("--recipe")
        .arg(fixture("recipes/good/minimal.toml"))
        .args(["--size", "1536M", "--output", name]);
    c
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(format!("{}?offset=1048576", image.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn no_qemu_for(image: &Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-a", "-f", "qemu-system"])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).contains(&*image.to_string_lossy())
}

#[test]
fn minimal_image_builds_is_cached_verifies_and_boots() {
    let _g = heavy();
    let sb = Sandbox::new();
    let out = run(&mut minimal(&sb, "minimal.img"));
    assert!(out.status.success(), "build failed");
    let img = sb.out().join("minimal.img");
    assert_eq!(
        files_in(&sb.out()),
        [
            "MD5SUMS",
            "SHA256SUMS",
            "minimal.img",
            "minimal.img.build.log",
            "minimal.img.manifest.json"
        ]
    );
    assert_clean(sb.path());
    assert_eq!(
        files_in(&sb.state().join("work")),
        Vec::<String>::new(),
        "work dir not removed"
    );

    // Size as asked, sparse on disk.
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 1536 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < meta.len() / 2, "image is not sparse");

    // The manifest agrees with an independent md5sum and with the sums files.
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sb.out().join("minimal.img.manifest.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, STAGES);
    let md5 = m["artefacts"][0]["md5"].as_str().unwrap().to_owned();
    let coreutils = Command::new("md5sum").arg(&img).output().unwrap();
    assert!(String::from_utf8_lossy(&coreutils.stdout).starts_with(&md5));
    assert!(std::fs::read_to_string(sb.out().join("MD5SUMS"))
        .unwrap()
        .contains(&format!("{md5}  minimal.img")));
    let pkgs: Vec<&str> = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        pkgs.iter().any(|p| p.starts_with("linux-image-")),
        "no kernel in package list"
    );
    assert!(pkgs.iter().any(|p| p.starts_with("systemd-sysv=")));

    // Disk layout: MBR signature, one bootable partition at 1 MiB, root fs by UUID.
    let bytes = std::fs::read(&img).map(|b| b[..512].to_vec()).unwrap();
    assert_eq!(&bytes[510..], &[0x55, 0xAA]);
    let sf = Command::new("sfdisk")
        .arg("--json")
        .arg(&img)
        .output()
        .unwrap();
    let sf: serde_json::Value = serde_json::from_slice(&sf.stdout).unwrap();
    let part = &sf["partitiontable"]["partitions"][0];
    assert_eq!(part["start"], 2048);
    assert_eq!(part["bootable"], true);
    let blkid = Command::new("blkid")
        .args(["-p", "-s", "UUID", "-o", "value", "-O", "1048576"])
        .arg(&img)
        .output()
        .unwrap();
    let uuid = String::from_utf8_lossy(&blkid.stdout).trim().to_owned();
    assert_eq!(uuid.len(), 36, "no filesystem UUID found");
    assert!(debugfs_cat(&img, "/etc/fstab").contains(&format!("UUID={uuid} / ext4")));
    assert!(debugfs_cat(&img, "/boot/grub/grub.cfg").contains(&format!("root=UUID={uuid}")));
    assert_eq!(debugfs_cat(&img, "/etc/machine-id"), "");

    // The second plan shows the cached base.
    let plan = run(mkimage()
        .arg("plan")
        .arg("--recipe")
        .arg(fixture("recipes/good/minimal.toml")));
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    let deb_line = plan_text
        .lines()
        .find(|l| l.contains("debootstrap"))
        .unwrap();
    assert!(deb_line.contains("cache hit"), "{deb_line}");

    // It boots to the readiness marker (under KVM where possible, else TCG), from a
    // 3 GiB disk, as a cloud gives an instance more disk than the image has: the root
    // partition and filesystem grow to the end of it at boot.
    let disk = sb.out().join("instance-disk.qcow2");
    let made = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&img)
        .arg(&disk)
        .arg("3G"));
    assert!(made.status.success());
    let t = Instant::now();
    let boot = run(mkimage()
        .arg("boot-test")
        .arg(&disk)
        .args(["--timeout", "240"]));
    assert!(boot.status.success(), "boot-test failed");
    let said = String::from_utf8_lossy(&boot.stdout);
    assert!(said.contains("ready after"), "{said}");
    eprintln!("boot-test took {:.1} s in all", t.elapsed().as_secs_f64());
    assert!(no_qemu_for(&disk), "qemu still running");
    let serial = std::fs::read_to_string(sb.out().join("instance-disk.qcow2.serial.log")).unwrap();
    let ready = serial
        .lines()
        // Other console output (a login prompt) may come first on the same line.
        .find_map(|l| l.find("mkimage-ready uptime=").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no readiness line on the console:\n{serial}"));
    let root_mib: u64 = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root_mib="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no root size in {ready:?}"));
    // The image's filesystem is 1535 MiB; grown to a 3 GiB disk it is about 3000 MiB.
    assert!(root_mib > 2800, "root not grown at boot: {ready}");
    assert!(serial.contains("mkimage-growroot: growing /dev/vda partition 1"));
    std::fs::remove_file(&disk).unwrap();

    // The boot ran in snapshot mode, so the image still verifies...
    let v = run(mkimage().arg("verify").arg(&img));
    assert!(v.status.success());
    // ...and one flipped byte fails with exit code 1; flipping it back passes again.
    flip_byte(&img, 5 << 20);
    let v = run(mkimage().arg("verify").arg(&img));
    assert_eq!(v.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&v.stderr).contains("mismatch"));
    flip_byte(&img, 5 << 20);
    assert!(run(mkimage().arg("verify").arg(&img)).status.success());
    let v = run(mkimage()
        .arg("verify")
        .arg(&img)
        .args(["--md5", &"0".repeat(32)]));
    assert_eq!(v.status.code(), Some(1));
}

fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
}

/// After a failed build: exit code 1, the stage named, nothing mounted or attached,
/// no image (whole or partial) in the output dir, the work dir removed.
fn assert_failed_cleanly(sb: &Sandbox, out: &std::process::Output, stage: &str) {
    assert_eq!(out.status.code(), Some(1), "expected exit code 1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("stage `{stage}` failed")),
        "stage not named: {err}"
    );
    assert!(err.contains("full log:"), "log path not named");
    assert_clean(sb.path());
    let left: Vec<String> = files_in(&sb.out())
        .into_iter()
        .filter(|f| !f.ends_with(".build.log"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "files left in the output dir");
    assert_eq!(
        files_in(&sb.state().join("work")),
        Vec::<String>::new(),
        "work dir left"
    );
}

#[test]
fn a_package_that_does_not_exist_fails_in_debootstrap_cleanly() {
    let _g = heavy();
    let sb = Sandbox::new();
    let mut c = sb.build();
    c.arg("--recipe")
        .arg(fixture("recipes/fail/no-such-package.toml"));
    let out = run(&mut c);
    assert_failed_cleanly(&sb, &out, "debootstrap");
    assert!(String::from_utf8_lossy(&out.stderr).contains("mkimage-no-such-package"));
}

// Injected failures and signals in every stage: see fault_sweep.rs.

/// qcow2, VDI, VMDK and OVA are converted from the finished raw image: each passes
/// `qemu-img check`, compares identical to the raw one, and has its own sums.
#[test]
fn other_formats_are_identical_to_the_raw_image() {
    let _g = heavy();
    let sb = Sandbox::new();
    let out = run(minimal(&sb, "fmt.img").args(["--format", "raw,qcow2,vdi,vmdk,ova"]));
    assert!(out.status.success());
    let raw = sb.out().join("fmt.img");
    let md5sums = std::fs::read_to_string(sb.out().join("MD5SUMS")).unwrap();
    for ext in ["qcow2", "vdi", "vmdk"] {
        let f = sb.out().join(format!("fmt.{ext}"));
        assert!(f.exists(), "no {ext}");
        let fmt = if ext == "vmdk" { "vmdk" } else { ext };
        let check = run(Command::new("qemu-img").args(["check", "-f", fmt]).arg(&f));
        assert!(check.status.success(), "qemu-img check {ext}");
        let cmp = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", fmt])
            .arg(&raw)
            .arg(&f));
        assert!(cmp.status.success(), "{ext} differs from the raw image");
        assert!(
            md5sums.contains(&format!("  fmt.{ext}")),
            "no MD5SUMS line for {ext}"
        );
        assert!(
            run(mkimage().arg("verify").arg(&f)).status.success(),
            "verify {ext}"
        );
    }
    check_ova(&sb, &raw);
    assert_clean(sb.path());
}

/// The .ova: descriptor first, then the VMDK and the manifest; the descriptor is XML
/// naming the VMDK with its real size and the disk's capacity; the manifest's digests
/// are those of the files; the VMDK holds the same disk as the raw image.
fn check_ova(sb: &Sandbox, raw: &Path) {
    let ova = sb.out().join("fmt.ova");
    assert!(run(mkimage().arg("verify").arg(&ova)).status.success());
    let list = run(Command::new("tar").arg("-tf").arg(&ova));
    assert_eq!(
        String::from_utf8_lossy(&list.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["fmt.ovf", "fmt-disk1.vmdk", "fmt.mf"]
    );
    let dir = sb.path().join("ova");
    std::fs::create_dir_all(&dir).unwrap();
    assert!(
        run(Command::new("tar").arg("-xf").arg(&ova).arg("-C").arg(&dir))
            .status
            .success()
    );
    let vmdk = dir.join("fmt-disk1.vmdk");
    let ovf = std::fs::read_to_string(dir.join("fmt.ovf")).unwrap();
    // Well-formed XML, checked by a parser that is not ours.
    let parsed = run(Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom as m; m.parse(sys.argv[1])",
        ])
        .arg(dir.join("fmt.ovf")));
    assert!(parsed.status.success(), "the OVF descriptor is not XML");
    let vmdk_size = std::fs::metadata(&vmdk).unwrap().len();
    assert!(ovf.contains(&format!(
        "ovf:href=\"fmt-disk1.vmdk\" ovf:size=\"{vmdk_size}\""
    )));
    let capacity = std::fs::metadata(raw).unwrap().len();
    assert!(ovf.contains(&format!("ovf:capacity=\"{capacity}\"")));
    let mf = std::fs::read_to_string(dir.join("fmt.mf")).unwrap();
    for f in ["fmt.ovf", "fmt-disk1.vmdk"] {
        let sum = run(Command::new("sha256sum").arg(dir.join(f)));
        let hex = String::from_utf8_lossy(&sum.stdout)[..64].to_owned();
        assert!(
            mf.contains(&format!("SHA256({f})= {hex}")),
            "{f} digest: {mf}"
        );
    }
    let check = run(Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(&vmdk));
    assert!(
        check.status.success(),
        "qemu-img check of the VMDK in the .ova"
    );
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vmdk"])
        .arg(raw)
        .arg(&vmdk));
    assert!(
        cmp.status.success(),
        "the .ova's disk differs from the raw image"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // Nothing but the artefacts and their files is left in the output directory.
    for e in std::fs::read_dir(sb.out()).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "{n} left in the output directory");
    }
}
