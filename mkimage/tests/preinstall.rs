//! `mkimage preinstall` against a real image built by the library: real loop
//! devices, mounts, chroots, apt and qemu. Run as root.
//!
//! One image is built per test binary (the debootstrap base is cached under
//! /var/cache/mkimage); every test works on its own copy in its own directory and
//! ends by checking that nothing of it stays mounted, attached or running.
//! `MKIMAGE_TEST_IMAGE=/path/to/built.img` reuses an image built earlier (its
//! manifest must sit beside it).

use mkimage::preinstall::{self, PreinstallArgs, PreinstallError};
use mkimage::recipe::{HostFacts, Overrides, RecipeInput};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(rel)
}

static BASE: OnceLock<PathBuf> = OnceLock::new();

/// A freshly built bootable raw image with its manifest and sums beside it.
fn base_image() -> &'static Path {
    BASE.get_or_init(|| {
        mkimage::logging::init(0);
        if let Some(p) = std::env::var_os("MKIMAGE_TEST_IMAGE") {
            return PathBuf::from(p);
        }
        ensure_cps();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("preinstall-base");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let recipe = mkimage::recipe::load(
            &RecipeInput::Defaults,
            &Overrides {
                size: Some("1536M".into()),
                ..Default::default()
            },
            &HostFacts::detect(),
        )
        .expect("default recipe");
        let rep = mkimage::build::build(&recipe, &mkimage::build::BuildOptions::with_output(&dir))
            .unwrap_or_else(|e| panic!("building the base image: {e}"));
        rep.image
    })
}

/// The build puts the runtime's `cps` binary into the image. `cargo test
/// --workspace` builds it next to this test; with `-p mkimage` it is built here, in
/// a target directory of its own (the running `cargo test` holds the lock on ours).
fn ensure_cps() {
    if mkimage::stage::core::find_cps_binary().is_some_and(|p| p.is_file()) {
        return;
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cps-build");
    run(Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "runtime", "--bin", "cps"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    std::env::set_var("MKIMAGE_CPS_BIN", target.join("debug/cps"));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    mkimage::verify::digest_file(path, |_| {}).unwrap().sha256
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Fails when anything below `dir` is mounted, backs a loop device, or is used by a
/// running qemu, or when temporaries were left behind.
fn assert_clean(dir: &Path) {
    let d = dir.to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&d)).collect();
    assert!(mounted.is_empty(), "still mounted: {mounted:?}");
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let bf = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&bf) {
            assert!(
                !b.contains(&d),
                "{} still backs {}",
                b.trim(),
                e.path().display()
            );
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c);
            assert!(
                !(c.contains("qemu") && c.contains(&d)),
                "qemu still running: {c}"
            );
        }
    }
    for n in names(dir) {
        assert!(
            !n.contains(".partial-") && !n.contains(".preinstall-"),
            "temporary {n} left in {d}"
        );
    }
}

/// A test's private directory holding its copy of the base image.
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        let base = base_image();
        let dir = tempfile::Builder::new()
            .prefix("preinstall-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let c = Case { dir };
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(base)
            .arg(c.image()));
        // The manifest beside the image is how the input is verified by default.
        std::fs::copy(
            mkimage::manifest::Manifest::path_for(base),
            mkimage::manifest::Manifest::path_for(&c.image()),
        )
        .unwrap();
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Same file name as the base, so the copied manifest describes it.
    fn image(&self) -> PathBuf {
        self.path().join(base_image().file_name().unwrap())
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_clean(self.dir.path());
        }
    }
}

/// Byte range of the root filesystem (found independently of the code under test:
/// the first partition of `sfdisk --json`, or the whole file).
fn root_range(img: &Path) -> (u64, u64) {
    part_range(img, 0)
}

/// Byte range of partition `index` (0-based), or the whole file without a table.
fn part_range(img: &Path, index: usize) -> (u64, u64) {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(img)
        .output()
        .unwrap();
    let size = std::fs::metadata(img).unwrap().len();
    if !out.status.success() {
        return (0, size);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["partitiontable"]["partitions"][index];
    (
        p["start"].as_u64().unwrap() * 512,
        p["size"].as_u64().unwrap() * 512,
    )
}

/// A raw image's root filesystem mounted read-only (loop device attached read-only).
struct RoMount {
    dir: tempfile::TempDir,
    _lo: mkimage::host::LoopDevice,
}

impl RoMount {
    fn new(img: &Path) -> RoMount {
        let (off, len) = root_range(img);
        RoMount::range(img, off, len)
    }

    fn range(img: &Path, off: u64, len: u64) -> RoMount {
        let lo = mkimage::host::LoopDevice::attach(img, off, Some(len), true).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("ro-")
            .tempdir_in(img.parent().unwrap())
            .unwrap();
        nix::mount::mount(
            Some(lo.path()),
            dir.path(),
            Some("ext4"),
            nix::mount::MsFlags::MS_RDONLY,
            Some("noload"),
        )
        .unwrap();
        RoMount { dir, _lo: lo }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Path of an image file on the host (only for paths without symlinks).
    fn at(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }
}

impl Drop for RoMount {
    fn drop(&mut self) {
        mkimage::host::mount::unmount(self.dir.path()).unwrap();
    }
}

/// (kind, size, mode, mtime, link target) of every entry below `root`, by relative
/// path; symlinks are never followed.
fn tree(root: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap().flatten() {
            let r = rel.join(e.file_name());
            if r == skip {
                continue;
            }
            let m = e.path().symlink_metadata().unwrap();
            let link = if m.file_type().is_symlink() {
                std::fs::read_link(e.path()).unwrap().display().to_string()
            } else {
                String::new()
            };
            out.insert(
                r.clone(),
                format!(
                    "{:o} {} {} {} {link}",
                    m.mode(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
            if m.is_dir() {
                stack.push(r);
            }
        }
    }
    out
}

fn dpkg_installed(root: &Path, pkg: &str) -> bool {
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    status.split("\n\n").any(|stanza| {
        stanza.lines().any(|l| l == format!("Package: {pkg}"))
            && stanza.lines().any(|l| l == "Status: install ok installed")
    })
}

fn args(image: &Path) -> PreinstallArgs {
    let mut a = PreinstallArgs::new(image, &fixture("apps/hello"));
    a.progress = false;
    a
}

/// The fixture app, the fixture script, the readiness marker — checked in a
/// mounted result.
fn check_hello_app(m: &RoMount, tree_installed: bool) {
    let hello = m.at("/opt/app/bin/hello");
    assert_eq!(
        std::fs::read(&hello).unwrap(),
        std::fs::read(fixture("apps/hello/bin/hello")).unwrap()
    );
    assert_eq!(
        hello.metadata().unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(hello.metadata().unwrap().uid(), 0);
    assert_eq!(
        std::fs::read_link(m.at("/opt/app/bin/version-link")).unwrap(),
        Path::new("../etc/version")
    );
    let installed = std::fs::read_to_string(m.at("/var/lib/hello/installed")).unwrap();
    assert!(installed.contains("app_dir=/opt/app"), "{installed}");
    assert!(installed.contains("cwd=/opt/app"), "{installed}");
    assert!(installed.contains("version=1.0"), "{installed}");
    let want = if tree_installed {
        "tree=yes"
    } else {
        "tree=no"
    };
    assert!(installed.contains(want), "{installed}");
    assert!(m
        .at("/etc/systemd/system/multi-user.target.wants/hello-app.service")
        .symlink_metadata()
        .is_ok());
    // The script was removed, and the chroot left nothing of itself behind.
    let tmp: Vec<String> = names(&m.at("/tmp"));
    assert!(
        tmp.iter().all(|n| !n.starts_with("mkimage-preinstall")),
        "{tmp:?}"
    );
    assert!(!m.at("/usr/sbin/policy-rc.d").exists());
    assert!(names(&m.at("/proc")).is_empty());
    assert!(names(&m.at("/sys")).is_empty());
}

#[test]
fn partitioned_raw_gets_app_packages_script_and_boots() {
    let case = Case::new();
    let input_sha = sha256(&case.image());
    let mut a = args(&case.image());
    a.packages = vec!["tree".into()];
    a.run_script = Some(fixture("apps/hello-setup.sh"));
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));

    let stem = case
        .image()
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let out = case.path().join(format!("{stem}-preinstalled.img"));
    assert_eq!(rep.output, out);
    assert_eq!(rep.format, "raw");
    assert!(rep.layout.contains("dos partition table"), "{}", rep.layout);
    assert_eq!(sha256(&case.image()), input_sha, "input modified");
    assert_eq!(rep.input_sha256.as_deref(), Some(input_sha.as_str()));
    assert_eq!(rep.copy.files, 4);
    assert_eq!(rep.copy.symlinks, 1);
    assert!(rep.copy.skipped.is_empty());

    // Manifest and sums describe the output.
    let d = mkimage::verify::digest_file(&out, |_| {}).unwrap();
    assert_eq!(d.sha256, rep.sha256);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rep.manifest).unwrap()).unwrap();
    assert_eq!(
        m["artefacts"][0]["file"],
        out.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(m["artefacts"][0]["md5"], d.md5.as_str());
    assert_eq!(m["artefacts"].as_array().unwrap().len(), 1);
    let stages: Vec<&str> = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages.last(), Some(&"preinstall"));
    assert!(stages.contains(&"assemble"), "base stages kept: {stages:?}");
    let pre = &m["preinstall"][0];
    assert_eq!(pre["packages"][0], "tree");
    assert_eq!(pre["script"], "hello-setup.sh");
    assert_eq!(pre["app_digest"], rep.copy.digest.as_str());
    assert_eq!(pre["input_sha256"], input_sha.as_str());
    assert!(m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_str().unwrap().starts_with("tree=")));
    let name = out.file_name().unwrap().to_str().unwrap();
    let sums = std::fs::read_to_string(case.path().join("MD5SUMS")).unwrap();
    assert!(sums.contains(&format!("{}  {name}", d.md5)), "{sums}");
    let ok = mkimage::verify::verify(&out, &mkimage::verify::Expected::beside(&out), |_| {});
    assert!(ok.is_ok(), "{ok:?}");

    {
        let mnt = RoMount::new(&out);
        check_hello_app(&mnt, true);
        assert!(dpkg_installed(mnt.root(), "tree"));
        assert!(mnt.at("/usr/bin/tree").is_file());
        // apt's lists and archives were cleaned.
        let lists = names(&mnt.at("/var/lib/apt/lists"));
        assert!(
            lists.iter().all(|n| n == "lock" || n == "partial"),
            "{lists:?}"
        );
        let debs: Vec<String> = names(&mnt.at("/var/cache/apt/archives"))
            .into_iter()
            .filter(|n| n.ends_with(".deb"))
            .collect();
        assert!(debs.is_empty(), "{debs:?}");
    }

    // It boots, and the preinstalled app runs at boot.
    let serial = case.path().join("serial.log");
    let mut b = mkimage::boot::BootOptions::new(&out, &serial);
    b.ready = mkimage::boot::Readiness::SerialMarker("hello-app-ready version=1.0".into());
    b.timeout = std::time::Duration::from_secs(600);
    let boot = mkimage::boot::boot_test(&b).unwrap_or_else(|e| panic!("boot: {e}"));
    eprintln!(
        "booted with {} in {:.0} s",
        boot.accel, boot.seconds_to_ready
    );
}

#[test]
fn bare_filesystem_image() {
    let case = Case::new();
    let (off, len) = root_range(&case.image());
    let bare = case.path().join("rootfs.ext4");
    run(Command::new("dd")
        .arg(format!("if={}", case.image().display()))
        .arg(format!("of={}", bare.display()))
        .args(["bs=1M", "conv=sparse", "status=none"])
        .arg(format!("skip={}", off / MIB))
        .arg(format!("count={}", len / MIB)));
    let mut a = args(&bare);
    a.no_verify = true;
    a.run_script = Some(fixture("apps/hello-setup.sh"));
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));
    assert!(rep.layout.starts_with("bare ext4"), "{}", rep.layout);
    assert_eq!(rep.format, "ext4");
    assert_eq!(rep.output, case.path().join("rootfs-preinstalled.ext4"));
    assert_eq!(rep.input_sha256, None);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rep.manifest).unwrap()).unwrap();
    assert_eq!(m["preinstall"][0]["verified"], false);
    assert_eq!(m["artefacts"][0]["format"], "ext4");
    let mnt = RoMount::new(&rep.output);
    check_hello_app(&mnt, false);
}

#[test]
fn qcow2_image() {
    let case = Case::new();
    let q = case.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(case.image())
        .arg(&q));
    let q_sha = sha256(&q);
    let mut a = args(&q);
    a.sha256 = Some(q_sha.clone());
    a.run_script = Some(fixture("apps/hello-setup.sh"));
    a.output = Some(case.path().join("custom.qcow2"));
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));
    assert_eq!(rep.format, "qcow2");
    assert_eq!(sha256(&q), q_sha, "input modified");
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&rep.output));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info["backing-filename"].is_null());
    assert_eq!(info["virtual-size"], 1536 * MIB);
    let raw = case.path().join("check.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&rep.output)
        .arg(&raw));
    let mnt = RoMount::new(&raw);
    check_hello_app(&mnt, false);
}

#[test]
fn wrong_or_missing_digest_is_refused_and_nothing_written() {
    let case = Case::new();
    let before = names(case.path());
    let mut a = args(&case.image());
    a.md5 = Some("0".repeat(32));
    let e = preinstall::run(&a).unwrap_err();
    assert!(
        matches!(
            e,
            PreinstallError::Verify(mkimage::verify::VerifyError::Mismatch { .. })
        ),
        "{e}"
    );
    assert_eq!(e.exit_code(), 1);
    assert_eq!(names(case.path()), before);

    // A manifest that disagrees with the file is a mismatch too.
    let manifest = mkimage::manifest::Manifest::path_for(&case.image());
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut m: mkimage::manifest::Manifest = serde_json::from_str(&text).unwrap();
    m.artefacts[0].sha256 = "f".repeat(64);
    m.artefacts[0].md5 = "f".repeat(32);
    m.store(&manifest).unwrap();
    let e = preinstall::run(&args(&case.image())).unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert_eq!(names(case.path()), before);

    // So is an explicit --manifest.
    let mut a = args(&case.image());
    a.manifest = Some(Some(manifest.clone()));
    assert_eq!(preinstall::run(&a).unwrap_err().exit_code(), 1);

    // Without a manifest, MD5SUMS beside the image is used.
    std::fs::remove_file(&manifest).unwrap();
    let name = case
        .image()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let sums = case.path().join("MD5SUMS");
    std::fs::write(&sums, format!("{}  {name}\n", "0".repeat(32))).unwrap();
    let e = preinstall::run(&args(&case.image())).unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("MD5"), "{e}");
    std::fs::remove_file(&sums).unwrap();

    // No digest anywhere: refused as bad input unless --no-verify.
    let before = names(case.path());
    let e = preinstall::run(&args(&case.image())).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("--no-verify"), "{e}");
    assert_eq!(names(case.path()), before);

    // Bad arguments are bad input, before anything is read or written.
    let mut a = args(&case.image());
    a.no_verify = true;
    a.dest = "/opt/../etc".into();
    assert_eq!(preinstall::run(&a).unwrap_err().exit_code(), 2);
    let mut a = args(&case.image());
    a.no_verify = true;
    a.packages = vec!["--allow-unauthenticated".into()];
    assert_eq!(preinstall::run(&a).unwrap_err().exit_code(), 2);
    let mut a = args(&case.image());
    a.no_verify = true;
    a.output = Some(case.image());
    assert_eq!(preinstall::run(&a).unwrap_err().exit_code(), 2);
    assert_eq!(names(case.path()), before);

    // A qcow2 overlay would make us read its backing file: refused.
    let overlay = case.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(case.image())
        .arg(&overlay));
    let before = names(case.path());
    let mut a = args(&overlay);
    a.no_verify = true;
    let e = preinstall::run(&a).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert_eq!(names(case.path()), before);
}

/// A GPT disk: partition 1 an ext4 `data` filesystem, partition 2 the root
/// filesystem of the base image (name and label `root`) — or the other way round.
fn gpt_image(case: &Case, name: &str, root_first: bool) -> PathBuf {
    const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    let (base_off, root_len) = root_range(&case.image());
    let data_len = 16 * MIB;
    let img = case.path().join(name);
    let total = MIB + data_len + root_len + MIB;
    std::fs::File::create(&img).unwrap().set_len(total).unwrap();
    let (first, second) = if root_first {
        (("root", root_len), ("data", data_len))
    } else {
        (("data", data_len), ("root", root_len))
    };
    let script = format!(
        "label: gpt\nstart=2048, size={}, type={LINUX}, name={}\nsize={}, type={LINUX}, name={}\n",
        first.1 / 512,
        first.0,
        second.1 / 512,
        second.0
    );
    let out = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(out.success());
    let (data_i, root_i) = if root_first { (1, 0) } else { (0, 1) };
    let (data_off, _) = part_range(&img, data_i);
    let (root_off, len) = part_range(&img, root_i);
    assert_eq!(len, root_len);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "data", "-E"])
        .arg(format!("offset={data_off}"))
        .arg(&img)
        .arg(format!("{}k", data_len / 1024)));
    run(Command::new("dd")
        .arg(format!("if={}", case.image().display()))
        .arg(format!("of={}", img.display()))
        .args(["bs=1M", "conv=sparse,notrunc", "status=none"])
        .arg(format!("skip={}", base_off / MIB))
        .arg(format!("seek={}", root_off / MIB))
        .arg(format!("count={}", root_len / MIB)));
    img
}

#[test]
fn gpt_root_found_by_label_and_grown_only_when_last() {
    let case = Case::new();
    let img = gpt_image(&case, "gpt.img", false);
    let mut a = args(&img);
    a.no_verify = true;
    a.grow = Some("+64M".into());
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));
    assert!(
        rep.layout
            .starts_with("gpt partition table, root is partition 2"),
        "{}",
        rep.layout
    );
    assert_eq!(rep.grown_by, 64 * MIB);
    run(Command::new("sfdisk").arg("--verify").arg(&rep.output));
    let (off, len) = part_range(&rep.output, 1);
    let (_, old_len) = part_range(&img, 1);
    assert!(len >= old_len + 63 * MIB, "{old_len} -> {len}");
    assert!(rep.fs_bytes_after >= rep.fs_bytes_before + 63 * MIB);
    {
        let m = RoMount::range(&rep.output, off, len);
        assert!(m.at("/opt/app/bin/hello").is_file());
    }
    // The data partition was left alone.
    let (doff, dlen) = part_range(&rep.output, 0);
    let m = RoMount::range(&rep.output, doff, dlen);
    assert_eq!(names(m.root()), ["lost+found"]);
    drop(m);

    // Root first, another partition after it: growing is refused, nothing written.
    let img = gpt_image(&case, "gpt-root-first.img", true);
    let before = names(case.path());
    let mut a = args(&img);
    a.no_verify = true;
    a.grow = Some("+64M".into());
    let e = preinstall::run(&a).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("not the last"), "{e}");
    assert_eq!(names(case.path()), before);
}

#[test]
fn injected_failures_leave_the_input_identical_and_nothing_behind() {
    let case = Case::new();
    let input_sha = sha256(&case.image());
    let before = names(case.path());
    for point in [
        "after-workcopy",
        "after-mount",
        "after-copy",
        "after-packages",
        "after-chroot",
        "after-unmount",
    ] {
        let mut a = args(&case.image());
        a.no_verify = true;
        a.run_script = Some(fixture("apps/hello-setup.sh"));
        a.fail_at = Some(point.into());
        let e = preinstall::run(&a).unwrap_err();
        assert_eq!(e.exit_code(), 1, "{point}: {e}");
        assert!(e.to_string().contains("injected failure"), "{point}: {e}");
        assert_clean(case.path());
        assert_eq!(names(case.path()), before, "{point}");
    }
    assert_eq!(sha256(&case.image()), input_sha, "input modified");
}

#[test]
fn hostile_app_dir_cannot_reach_outside() {
    let case = Case::new();
    let app = case.path().join("hostile");
    std::fs::create_dir_all(app.join("sub/deeper")).unwrap();
    std::fs::write(app.join("sub/file"), b"inside\n").unwrap();
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, app.join(at)).unwrap();
    link("/etc/shadow", "shadow");
    link("../../../../../../../etc", "up");
    link("/", "root");
    link("../../x", "sub/esc");
    link("/opt/app/sub/file", "abs-inside");
    link("sub/file", "ok");
    link("../file", "sub/deeper/ok2");
    link("sub/deeper/../../../etc/passwd", "tricky");
    nix::unistd::mkfifo(
        &app.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();

    let host_shadow = std::fs::read("/etc/shadow").unwrap();
    let mut a = args(&case.image());
    a.app_dir = app.clone();
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));
    let mut skipped: Vec<String> = rep
        .copy
        .skipped
        .iter()
        .map(|s| s.path.display().to_string())
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        ["pipe", "root", "shadow", "sub/esc", "tricky", "up"]
    );
    assert_eq!(rep.copy.symlinks, 3);

    let out_m = RoMount::new(&rep.output);
    let in_m = RoMount::new(&case.image());
    // Nothing outside /opt/app changed (/opt itself got a new entry, so a new mtime).
    let outside = |m: &RoMount| {
        let mut t = tree(m.root(), Path::new("opt/app"));
        t.remove(Path::new("opt"));
        t
    };
    assert_eq!(outside(&in_m), outside(&out_m));
    // /opt/app holds exactly the safe part of the app.
    let got: Vec<String> = tree(&out_m.at("/opt/app"), Path::new(""))
        .into_iter()
        .map(|(p, meta)| format!("{} {}", p.display(), meta.rsplit(' ').next().unwrap()))
        .collect::<Vec<_>>();
    let mut got = got;
    got.sort();
    assert_eq!(
        got,
        [
            "abs-inside /opt/app/sub/file",
            "ok sub/file",
            "sub ",
            "sub/deeper ",
            "sub/deeper/ok2 ../file",
            "sub/file ",
        ]
    );
    // Host secrets never land in the image.
    for (p, _) in tree(&out_m.at("/opt/app"), Path::new("")) {
        let f = out_m.at("/opt/app").join(&p);
        if f.symlink_metadata().unwrap().is_file() {
            assert_ne!(std::fs::read(&f).unwrap(), host_shadow, "{}", p.display());
        }
    }
    assert_eq!(std::fs::read("/etc/shadow").unwrap(), host_shadow);
    drop(out_m);
    drop(in_m);

    // An image whose /opt/app is a symlink out of the app directory is refused,
    // and nothing is written through it.
    let (off, _) = root_range(&case.image());
    run(Command::new("debugfs")
        .args(["-w", "-R", "symlink /opt/app /etc"])
        .arg(format!("{}?offset={off}", case.image().display())));
    let before = names(case.path());
    let trap_tree = {
        let m = RoMount::new(&case.image());
        tree(m.root(), Path::new(""))
    };
    let mut a = args(&case.image());
    a.no_verify = true;
    let e = preinstall::run(&a).unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("symlink"), "{e}");
    assert_eq!(names(case.path()), before);
    let m = RoMount::new(&case.image());
    assert_eq!(tree(m.root(), Path::new("")), trap_tree);
    // Resolved on the host, the trap would have led into the host's /etc.
    assert!(!Path::new("/etc/hello-app.service").exists());
    assert!(!Path::new("/etc/bin/hello").exists());
    drop(m);

    // A dangling policy-rc.d symlink would make the chroot setup write on the host.
    let pwned = "/etc/mkimage-preinstall-test-pwned";
    run(Command::new("debugfs")
        .args([
            "-w",
            "-R",
            &format!("symlink /usr/sbin/policy-rc.d {pwned}"),
        ])
        .arg(format!("{}?offset={off}", case.image().display())));
    let mut a = args(&case.image());
    a.no_verify = true;
    a.dest = "/srv/app".into();
    a.run_script = Some(fixture("apps/hello-setup.sh"));
    let e = preinstall::run(&a).unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("policy-rc.d"), "{e}");
    assert!(!Path::new(pwned).exists());
    assert_eq!(names(case.path()), before);
}

#[test]
fn grow_enlarges_file_partition_and_filesystem() {
    let case = Case::new();
    let in_size = std::fs::metadata(case.image()).unwrap().len();
    let blocks = |img: &Path| -> u64 {
        let (off, len) = root_range(img);
        let lo = mkimage::host::LoopDevice::attach(img, off, Some(len), true).unwrap();
        let out = run(Command::new("dumpe2fs").arg("-h").arg(lo.path()));
        out.lines()
            .find_map(|l| l.strip_prefix("Block count:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = blocks(&case.image());
    let mut a = args(&case.image());
    a.grow = Some("+256M".into());
    let rep = preinstall::run(&a).unwrap_or_else(|e| panic!("preinstall: {e}"));
    assert_eq!(rep.grown_by, 256 * MIB);
    let out_size = std::fs::metadata(&rep.output).unwrap().len();
    assert_eq!(out_size, in_size + 256 * MIB);
    let after = blocks(&rep.output);
    // 4 KiB blocks: 65536 more, give or take alignment.
    assert!(after >= before + 65_000, "blocks {before} -> {after}");
    assert!(rep.fs_bytes_after > rep.fs_bytes_before);
    // The partition now ends at the end of the file, and the filesystem is clean.
    let (off, len) = root_range(&rep.output);
    assert_eq!(off + len, out_size);
    let lo = mkimage::host::LoopDevice::attach(&rep.output, off, Some(len), true).unwrap();
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(lo.path()));
    drop(lo);
    let mnt = RoMount::new(&rep.output);
    assert!(mnt.at("/opt/app/bin/hello").is_file());
}

const CHILD_IMAGE: &str = "MKIMAGE_PREINSTALL_CHILD_IMAGE";
const CHILD_RESULT: &str = "MKIMAGE_PREINSTALL_CHILD_RESULT";

/// Runs a preinstall in a child process for `sigint_releases_everything`; does
/// nothing in a normal test run (a signal would end this whole test process's work).
#[test]
fn interrupted_child() {
    let (Some(img), Some(result)) = (
        std::env::var_os(CHILD_IMAGE),
        std::env::var_os(CHILD_RESULT),
    ) else {
        return;
    };
    let mut a = args(Path::new(&img));
    a.no_verify = true;
    a.packages = vec!["tree".into()];
    a.run_script = Some(fixture("apps/hello-setup.sh"));
    let code = match preinstall::run(&a) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("child: {e}");
            e.exit_code()
        }
    };
    std::fs::write(result, code.to_string()).unwrap();
}

#[test]
fn sigint_releases_everything() {
    let case = Case::new();
    let input_sha = sha256(&case.image());
    let before = names(case.path());
    let result_dir = tempfile::tempdir().unwrap();
    let result = result_dir.path().join("code");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "interrupted_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_IMAGE, case.image())
        .env(CHILD_RESULT, &result)
        .spawn()
        .unwrap();
    // Interrupt once the image is mounted.
    let d = case.path().to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if mi.contains(&d) {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the child ended ({st}) before mounting the image");
        }
        assert!(std::time::Instant::now() < deadline, "never mounted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "child test failed: {st}");
    assert_eq!(std::fs::read_to_string(&result).unwrap(), "130");
    assert_clean(case.path());
    assert_eq!(names(case.path()), before);
    assert_eq!(sha256(&case.image()), input_sha, "input modified");
}
