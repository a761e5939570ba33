//! The `nspawn` driver (what a Nutshell's manager uses): agents run in
//! `systemd-nspawn` containers on a root tree, enrol through one-time tokens and
//! answer over mutual TLS; removing nodes stops exactly their containers. The user's
//! certificate comes from the manager's `USER_TOKEN`, as a Nutshell's owner gets it.
//!
//! Needs root and `systemd-nspawn` (Debian's systemd-container; `.ci/run` installs
//! it). The root tree is made here: the `cps` binary and the libraries `ldd` names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CPS: &str = env!("CARGO_BIN_EXE_cps");

fn cps(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(CPS);
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run cps")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "cps failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A root tree with just the runtime and what it links against.
fn minimal_root(root: &Path) {
    let copy = |src: &Path| {
        let dest = root.join(src.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(src, &dest).unwrap();
    };
    let bin = root.join("usr/local/bin/cps");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(CPS, &bin).unwrap();
    let ldd = Command::new("ldd").arg(CPS).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let p = Path::new(p);
            copy(p);
            // Keep the canonical file too when the name is a symlink (usrmerge).
            if let Ok(real) = p.canonicalize() {
                if real != p {
                    copy(&real);
                }
            }
        }
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "run", "var/tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/os-release"),
        "ID=cps-test\nNAME=\"cps test root\"\n",
    )
    .unwrap();
}

/// `systemd-nspawn` processes running on `root`.
fn containers_on(root: &Path) -> Vec<u32> {
    let want = format!("--directory\0{}\0", root.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).into_owned();
                    c.starts_with("systemd-nspawn\0") && c.contains(&want)
                })
                .unwrap_or(false)
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Manager(Child);

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agents_run_in_containers_and_answer_over_mtls() {
    let have_nspawn = Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_nspawn || !nix::unistd::geteuid().is_root() {
        if std::env::var_os("MKIMAGE_SKIP_NSPAWN").is_some() {
            eprintln!("skipped: needs root and systemd-nspawn (MKIMAGE_SKIP_NSPAWN set)");
            return;
        }
        panic!("needs root and systemd-nspawn (install systemd-container; .ci/run does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    let root: PathBuf = d.join("rootfs");
    minimal_root(&root);
    ok(cps(&["ca", "init", "--dir", &p("ca")], &[]));
    ok(cps(
        &[
            "ca",
            "issue",
            "--dir",
            &p("ca"),
            "--role",
            "manager",
            "--uid",
            "1",
            "--app",
            "1",
            "--out",
            &p("mgr"),
        ],
        &[],
    ));
    // Two probes in a row may be handed the same free port; the manager could then bind
    // only one of them.
    let (port, enroll_port) = loop {
        let (a, b) = (emulators::free_port(), emulators::free_port());
        if a != b {
            break (a, b);
        }
    };
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let cfg = format!(
        "[manager]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 1\nBIND = 127.0.0.1\nMY_IP = 127.0.0.1\n\
         PORT = {port}\nENROLL_PORT = {enroll_port}\nLOG_FILE = {}\nCERT_DIR = {}\nCA_DIR = {}\n\
         VAR_RUN = {}\nVAR_CACHE = {}\nCONFIG_DIR = {}\nCLOUD = nspawn\nNSPAWN_ROOTFS = {}\n\
         POLL_INTERVAL = 0.3\nBOOT_TIMEOUT = 60\nSTARTING_NODES = 0\nUSER_TOKEN = t0k3n\n",
        p("manager.log"),
        p("mgr"),
        p("ca"),
        p("run"),
        p("cache"),
        config_dir.display(),
        root.display()
    );
    std::fs::write(d.join("manager.cfg"), cfg).unwrap();
    let out = std::fs::File::create(d.join("manager.out")).unwrap();
    let mut mgr = Manager(
        Command::new(CPS)
            .args(["manager", "-c", &p("manager.cfg")])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    // On a timeout or an early exit, say what the manager said.
    let said = || {
        format!(
            "manager output:\n{}\nmanager log:\n{}",
            std::fs::read_to_string(d.join("manager.out")).unwrap_or_default(),
            std::fs::read_to_string(d.join("manager.log")).unwrap_or_default()
        )
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", enroll_port)).is_err() {
        if let Ok(Some(st)) = mgr.0.try_wait() {
            panic!(
                "the manager exited ({st}) before its enrolment port opened; {}",
                said()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for the enrolment port {enroll_port}; {}",
            said()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The owner's certificate, through the one-time USER_TOKEN.
    let user = p("user");
    let ca_cert = p("ca/ca_cert.pem");
    let url = format!("https://127.0.0.1:{enroll_port}/enroll");
    let out = ok(cps(
        &[
            "enroll",
            "--url",
            &url,
            "--token",
            "t0k3n",
            "--node-id",
            "user",
            "--cert-dir",
            &user,
            "--ca",
            &ca_cert,
        ],
        &[],
    ));
    assert!(out.contains("urn:conpaas:user:u1:a1"), "{out}");
    // Single use.
    let again = cps(
        &[
            "enroll",
            "--url",
            &url,
            "--token",
            "t0k3n",
            "--node-id",
            "user",
            "--cert-dir",
            &p("user2"),
            "--ca",
            &p("ca/ca_cert.pem"),
        ],
        &[],
    );
    assert!(!again.status.success());

    let mgr_url = format!("https://127.0.0.1:{port}");
    let client = |args: &[&str]| {
        let mut a = vec!["client", "--manager", mgr_url.as_str(), "--cert-dir", &user];
        a.extend_from_slice(args);
        cps(&a, &[])
    };
    let state =
        |c: &dyn Fn(&[&str]) -> Output| String::from_utf8_lossy(&c(&["info"]).stdout).into_owned();
    ok(client(&["startup"]));
    wait_for("RUNNING after startup", Duration::from_secs(30), || {
        state(&client).contains("RUNNING")
    });
    ok(client(&["add-nodes", "2"]));
    wait_for("RUNNING with 2 agents", Duration::from_secs(90), || {
        state(&client).contains("RUNNING")
    });
    let hello = ok(client(&["hello"]));
    assert_eq!(
        hello.matches("Received helloworld from").count(),
        2,
        "{hello}"
    );
    assert_eq!(containers_on(&root).len(), 2, "two containers on the tree");

    ok(client(&["remove-nodes", "1"]));
    wait_for("one container left", Duration::from_secs(30), || {
        containers_on(&root).len() == 1
    });
    wait_for("RUNNING after removal", Duration::from_secs(30), || {
        state(&client).contains("RUNNING")
    });
    let hello = ok(client(&["hello"]));
    assert_eq!(
        hello.matches("Received helloworld from").count(),
        1,
        "{hello}"
    );
    ok(client(&["stop"]));
    wait_for("no container left", Duration::from_secs(30), || {
        containers_on(&root).is_empty()
    });
}
