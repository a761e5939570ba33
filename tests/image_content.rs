//! Real image content (services, optimize, per-cloud contextualization), built with
//! the real mkimage against the host's mirror and booted under qemu. Run as root.

use e2e::*;
use mkimage::host::{LoopDevice, MountGuard};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mounts the root filesystem of a built disk image read-only (offset loop device,
/// guards release both even if an assertion fails).
struct MountedImage {
    dir: tempfile::TempDir,
    _mount: Option<MountGuard>,
    _loop: LoopDevice,
}

impl MountedImage {
    fn open(image: &Path) -> MountedImage {
        let lo = LoopDevice::attach(image, 1 << 20, None, true).expect("loop device");
        let dir = tempfile::tempdir().unwrap();
        let m = MountGuard::mount(lo.path(), dir.path(), "ext4", Some("ro,noload")).expect("mount");
        MountedImage {
            dir,
            _mount: Some(m),
            _loop: lo,
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        // Unmount before the loop device detaches and the directory goes.
        self._mount.take();
    }
}

fn build(sb: &Sandbox, services: &str, extra: &[&str], name: &str) -> PathBuf {
    let mut c = sb.build();
    c.args(["--services", services, "--output", name])
        .args(extra);
    let out = run(&mut c);
    assert!(out.status.success(), "build of {name} failed");
    sb.out().join(name)
}

/// A user-data script that proves it ran inside the booted image: it prints a marker
/// and the SSH key contextualization installed to the serial console.
fn user_data_dir(sb: &Sandbox, marker: &str) -> PathBuf {
    let d = sb.path().join("context");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("user_data"),
        format!(
            "#!/bin/sh\nfor t in /dev/ttyS0 /dev/hvc0; do [ -c $t ] && echo \"{marker} keys=$(grep -c mkimage-test-key /root/.ssh/authorized_keys)\" > $t; done\n"
        ),
    )
    .unwrap();
    std::fs::write(d.join("ssh_key.pub"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMkimageTestKeyMaterialOnly00000000000000000 mkimage-test-key\n").unwrap();
    d
}

fn security_checks(img: &MountedImage) {
    let shadow = std::fs::read_to_string(img.path("etc/shadow")).unwrap();
    let root = shadow.lines().find(|l| l.starts_with("root:")).unwrap();
    let hash = root.split(':').nth(1).unwrap();
    assert!(
        hash.starts_with('!') || hash.starts_with('*'),
        "root has a usable password: {hash}"
    );
    let ssh: Vec<String> = std::fs::read_dir(img.path("etc/ssh"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    assert!(ssh.is_empty(), "host keys baked into the image: {ssh:?}");
    // No private key anywhere a build could have left one.
    for dir in ["etc", "root", "home", "var/lib", "usr/share/cps", "opt"] {
        let out = Command::new("grep")
            .args(["-rlI", "--exclude-dir=proc", "PRIVATE KEY-----"])
            .arg(img.path(dir))
            .output()
            .unwrap();
        let hits = String::from_utf8_lossy(&out.stdout);
        // ssl-cert's snakeoil key would be one; we install no such package.
        assert!(hits.trim().is_empty(), "private keys in the image: {hits}");
    }
    assert!(
        img.path("usr/local/bin/cps").exists(),
        "runtime not installed"
    );
    // An absolute symlink: read the link itself, it points into the image.
    let unit = std::fs::read_link(
        img.path("etc/systemd/system/multi-user.target.wants/cps-context.service"),
    )
    .expect("cps-context.service not enabled");
    assert_eq!(unit, Path::new("/etc/systemd/system/cps-context.service"));
    assert!(img.path("etc/systemd/system/cps-context.service").is_file());
    assert!(img.path("var/log/cpsagent.log").exists());
    assert!(img.path("etc/cpsagent").is_dir());
}

#[test]
fn helloworld_openstack_optimized_image_is_small_clean_and_contextualizes() {
    let _g = heavy();
    let sb = Sandbox::new();
    let image = build(
        &sb,
        "helloworld",
        &["--optimize", "true", "--size", "2G"],
        "hello-os.img",
    );
    let size = std::fs::metadata(&image).unwrap().len();
    assert!(size < 2048 << 20, "optimize did not shrink: {size} bytes");
    {
        let img = MountedImage::open(&image);
        security_checks(&img);
        // Docs pruned down to copyright files.
        for e in std::fs::read_dir(img.path("usr/share/doc"))
            .unwrap()
            .flatten()
        {
            if e.path().is_dir() && !e.path().is_symlink() {
                for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                    assert_eq!(f.file_name(), "copyright", "{}", f.path().display());
                }
            }
        }
        assert!(!img.path("usr/share/man/man1").exists());
    }
    assert_clean(sb.path());
    // Boot with an OpenStack config drive: the runtime's contextualization runs the
    // user-data and installs the SSH key.
    let ctx = user_data_dir(&sb, "ctx-openstack-ok");
    let out = run(mkimage()
        .arg("boot-test")
        .arg(&image)
        .arg("--context")
        .arg(&ctx)
        .args([
            "--ready-marker",
            "ctx-openstack-ok keys=1",
            "--timeout",
            "300",
        ]));
    assert!(
        out.status.success(),
        "no contextualization seen on the console"
    );
    assert_clean(sb.path());
}

#[test]
fn helloworld_ec2_image_boots_with_imdsv2_and_has_a_pv_grub_menu() {
    let _g = heavy();
    let sb = Sandbox::new();
    let image = build(
        &sb,
        "helloworld",
        &[
            "--cloud",
            "ec2",
            "--hypervisor",
            "xen",
            "--optimize",
            "true",
        ],
        "hello-ec2.img",
    );
    {
        let img = MountedImage::open(&image);
        security_checks(&img);
        let menu = std::fs::read_to_string(img.path("boot/grub/menu.lst")).expect("menu.lst");
        let fstab = std::fs::read_to_string(img.path("etc/fstab")).unwrap();
        let uuid = fstab
            .split("UUID=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        assert!(menu.contains(&format!("root=UUID={uuid}")), "{menu}");
        assert!(!menu.contains("xvda1") && !fstab.contains("sda1"));
        let grub = std::fs::read_to_string(img.path("boot/grub/grub.cfg")).unwrap();
        assert!(grub.contains("console=hvc0") && grub.contains("console=ttyS0"));
    }
    let ctx = user_data_dir(&sb, "ctx-ec2-ok");
    let out = run(mkimage()
        .arg("boot-test")
        .arg(&image)
        .arg("--context")
        .arg(&ctx)
        .args([
            "--context-via",
            "ec2",
            "--ready-marker",
            "ctx-ec2-ok keys=1",
            "--timeout",
            "300",
        ]));
    assert!(
        out.status.success(),
        "no IMDSv2 contextualization seen on the console"
    );
    assert_clean(sb.path());
}

#[test]
fn mysql_image_really_installs_mariadb_and_php_plans() {
    let _g = heavy();
    let sb = Sandbox::new();
    let image = build(&sb, "mysql", &["--size", "3G"], "mysql.img");
    {
        let img = MountedImage::open(&image);
        let status = Command::new("dpkg-query")
            .arg(format!("--admindir={}", img.path("var/lib/dpkg").display()))
            .args([
                "-W",
                "-f",
                "${db:Status-Abbrev}",
                "mariadb-server",
                "galera-4",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&status.stdout),
            "ii ii ",
            "mariadb/galera not installed"
        );
        // The daemon is disabled: the runtime starts it when the service needs it.
        assert!(!img
            .path("etc/systemd/system/multi-user.target.wants/mariadb.service")
            .exists());
    }
    assert_clean(sb.path());
    let plan = run(mkimage().arg("plan").args(["--services", "php"]));
    assert!(plan.status.success());
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("service-php") && text.contains("php-fpm"),
        "{text}"
    );
}

#[test]
fn services_from_unreachable_repositories_fail_at_preflight_leaving_nothing() {
    for svc in ["scalaris", "xtreemfs"] {
        let sb = Sandbox::new();
        let t = std::time::Instant::now();
        let out = run(sb.build().args(["--services", svc]));
        assert_eq!(out.status.code(), Some(1), "{svc}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("preflight") && err.contains(&format!("service `{svc}`")),
            "{err}"
        );
        assert!(err.contains("opensuse"), "repository not named: {err}");
        assert!(t.elapsed().as_secs() < 60, "preflight took too long");
        assert!(!sb.state().join("work").exists() || files_in(&sb.state().join("work")).is_empty());
        assert!(files_in(&sb.out()).iter().all(|f| !f.ends_with(".img")));
        assert_clean(sb.path());
    }
}
