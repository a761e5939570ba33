//! End-to-end: a helloworld image built by the real mkimage, booted as ConPaaS agents by a
//! `cps manager` with the `qemu` cloud driver. The agents enrol over the guest forward
//! (10.0.2.100 -> the manager's enrolment port on 127.0.0.1), the manager reaches them through
//! host forwards; removing and stopping kill exactly their VMs. Run as root (mkimage build).
//!
//! `AGENT_VM_ADD` (default 2): how many nodes `add-nodes` asks for.

use e2e::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Pids of qemu processes whose command line mentions `dir`.
fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a0| a0.contains("qemu-system"))
            && args.iter().any(|a| a.contains(&needle))
        {
            v.push(pid);
        }
    }
    v.sort();
    v
}

fn kill(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The manager process; on drop (also when the test fails) it is stopped, and any qemu of
/// this sandbox still running is killed by pid.
struct Mgr {
    child: Option<Child>,
    root: PathBuf,
    url: String,
    user: PathBuf,
}

impl Mgr {
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        kill("-TERM", c.id());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    fn client(&self, args: &[&str]) -> Output {
        let out = Command::new(bin("cps"))
            .args(["client", "--manager", &self.url, "--cert-dir"])
            .arg(&self.user)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "cps client {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.client(&a);
        assert!(out.status.success(), "cps client {args:?} failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn state(&self) -> String {
        self.json(&["info"])["state"].as_str().unwrap().to_string()
    }

    /// Manager log and the tail of every node's serial log.
    fn diagnostics(&self) -> String {
        let mut s = format!(
            "--- manager log:\n{}",
            std::fs::read_to_string(self.root.join("manager.log")).unwrap_or_default()
        );
        let nodes = self.root.join("nodes");
        for n in files_in(&nodes) {
            let log =
                std::fs::read_to_string(nodes.join(&n).join("serial.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            s.push_str(&format!(
                "\n--- node {n} serial (last 40 lines):\n{}\n--- qemu stderr: {}",
                lines[lines.len().saturating_sub(40)..].join("\n"),
                std::fs::read_to_string(nodes.join(&n).join("qemu.err")).unwrap_or_default()
            ));
        }
        s
    }

    fn wait_state(&self, want: &str, timeout: Duration) -> f64 {
        let t0 = Instant::now();
        loop {
            let st = self.state();
            if st == want {
                return t0.elapsed().as_secs_f64();
            }
            if st == "ERROR" || t0.elapsed() > timeout {
                panic!(
                    "state {st} while waiting for {want} ({:.0} s)\n{}",
                    t0.elapsed().as_secs_f64(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Mgr {
    fn drop(&mut self) {
        self.terminate();
        for pid in qemus_under(&self.root) {
            eprintln!("killing leftover qemu {pid}");
            kill("-KILL", pid);
        }
    }
}

/// The cloud part of a manager config: the qemu driver booting `image`; `extra` goes into
/// the `[qemu]` section.
fn qemu_cloud(root: &Path, image: &Path, extra: &str) -> String {
    format!(
        "CLOUD = qemu\n\n[qemu]\nIMAGE = {}\nWORK_DIR = {}\nMEMORY = 768\nCPUS = 1\nACCEL = auto\n{extra}",
        image.display(),
        root.join("nodes").display()
    )
}

/// A CA (`root/ca`) and the manager's (`mgr`) and user's (`user`) certificates.
fn issue_pki(root: &Path) {
    let p = |s: &str| root.join(s).display().to_string();
    cps_ok(&["ca", "init", "--dir", &p("ca")]);
    for (role, out) in [("manager", "mgr"), ("user", "user")] {
        cps_ok(&[
            "ca",
            "issue",
            "--dir",
            &p("ca"),
            "--role",
            role,
            "--uid",
            "1",
            "--app",
            "2",
            "--out",
            &p(out),
        ]);
    }
}

/// CA, manager and user certificates under `root`, and a `cps manager` for a helloworld
/// service saying `hello`; `cloud` ends its `[manager]` section (`CLOUD = …` and more).
fn start_manager(root: &Path, hello: &str, cloud: &str) -> Mgr {
    let p = |s: &str| root.join(s).display().to_string();
    issue_pki(root);
    let cfg = format!(
        "[manager]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 2\nBIND = 127.0.0.1\nMY_IP = 127.0.0.1\n\
         PORT = 0\nENROLL_PORT = 0\nLOG_FILE = {}\nCERT_DIR = {}\nCA_DIR = {}\nVAR_RUN = {}\n\
         VAR_CACHE = {}\nCONFIG_DIR = {}\nPOLL_INTERVAL = 2\nBOOT_TIMEOUT = 600\n\
         MAX_RETRIES = 0\nCONTEXT_STRING = {hello}\n{cloud}",
        p("manager.log"),
        p("mgr"),
        p("ca"),
        p("run"),
        p("cache"),
        workspace().join("config").display(),
    );
    std::fs::write(root.join("manager.cfg"), cfg).unwrap();
    let child = Command::new(bin("cps"))
        .args(["manager", "-c", &p("manager.cfg")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(root.join("manager.out")).unwrap())
        .stderr(std::fs::File::create(root.join("manager.err")).unwrap())
        .spawn()
        .unwrap();
    let mut mgr = Mgr {
        child: Some(child),
        root: root.to_path_buf(),
        url: String::new(),
        user: root.join("user"),
    };
    let ports = root.join("run/ports.json");
    let t = Instant::now();
    while !ports.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "manager did not start: {}",
            std::fs::read_to_string(root.join("manager.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    mgr.url = format!("https://127.0.0.1:{}", v["port"]);
    mgr
}

fn cps_ok(args: &[&str]) {
    let out = run(Command::new(bin("cps")).args(args));
    assert!(out.status.success(), "cps {args:?} failed");
}

#[test]
fn helloworld_agents_in_qemu_vms() {
    if !is_root() {
        eprintln!("skipped: needs root (mkimage build)");
        return;
    }
    let _g = heavy();
    let add: usize = std::env::var("AGENT_VM_ADD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let sb = Sandbox::new();
    let root = sb.path().to_path_buf();

    let t0 = Instant::now();
    let out = run(sb.build().args([
        "--services",
        "helloworld",
        "--optimize",
        "true",
        "--size",
        "2G",
        "--output",
        "hello.img",
    ]));
    assert!(out.status.success(), "mkimage build failed");
    let image = sb.out().join("hello.img");
    assert!(image.is_file());
    eprintln!("image built in {:.0} s", t0.elapsed().as_secs_f64());
    assert_clean(&root);

    let mut mgr = start_manager(&root, "helloworld", &qemu_cloud(&root, &image, ""));

    // startup: one VM
    assert!(mgr.client(&["startup"]).status.success());
    let s = mgr.wait_state("RUNNING", Duration::from_secs(900));
    eprintln!("startup: 1 VM RUNNING after {s:.0} s");
    assert_eq!(qemus_under(&root).len(), 1);

    // add-nodes: booted concurrently
    let t = Instant::now();
    assert!(mgr
        .client(&["add-nodes", &add.to_string()])
        .status
        .success());
    mgr.wait_state("RUNNING", Duration::from_secs(900));
    let secs = t.elapsed().as_secs_f64();
    eprintln!("add_nodes {add}: RUNNING after {secs:.0} s");
    println!("add_nodes({add}) -> RUNNING: {secs:.1} s");
    let total = 1 + add;
    assert_eq!(qemus_under(&root).len(), total);

    let ids: Vec<String> = mgr.json(&["list"])["helloworld"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), total);
    let hello = mgr.json(&["hello"])["helloworld"]
        .as_str()
        .unwrap()
        .to_string();
    let mut lines: Vec<&str> = hello.lines().collect();
    lines.sort();
    let mut want: Vec<String> = ids
        .iter()
        .map(|id| format!("Received helloworld from {id}"))
        .collect();
    want.sort();
    assert_eq!(lines, want);

    // remove-nodes 1 kills exactly one VM
    let before = qemus_under(&root);
    assert!(mgr.client(&["remove-nodes", "1"]).status.success());
    mgr.wait_state("RUNNING", Duration::from_secs(120));
    let after = qemus_under(&root);
    assert_eq!(after.len(), total - 1);
    assert!(after.iter().all(|p| before.contains(p)));
    assert_eq!(files_in(&root.join("nodes")).len(), total - 1);

    // stop kills the rest
    assert!(mgr.client(&["stop"]).status.success());
    mgr.wait_state("STOPPED", Duration::from_secs(120));
    assert_eq!(qemus_under(&root), Vec::<u32>::new());
    assert_eq!(files_in(&root.join("nodes")), Vec::<String>::new());

    let st = mgr.terminate().expect("manager exit status");
    assert!(st.success(), "manager exited with {st}");
    assert_eq!(qemus_under(&root), Vec::<u32>::new());
    assert_clean(&root);
}

/// Manager exit (SIGTERM) with VMs still running and still booting kills them all.
#[test]
fn manager_exit_kills_its_vms() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let _g = heavy();
    let sb = Sandbox::new();
    let root = sb.path().to_path_buf();
    // Any bootable-looking file will do: the VMs only have to exist, not to boot.
    let image = root.join("blank.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let p = |s: &str| root.join(s).display().to_string();
    issue_pki(&root);
    let cfg = format!(
        "[manager]\nUSER_ID = 1\nAPP_ID = 2\nBIND = 127.0.0.1\nPORT = 0\nENROLL_PORT = 0\n\
         LOG_FILE = {}\nCERT_DIR = {}\nCA_DIR = {}\nVAR_RUN = {}\nVAR_CACHE = {}\nCONFIG_DIR = {}\n\
         CLOUD = qemu\nPOLL_INTERVAL = 1\nBOOT_TIMEOUT = 600\nSTARTING_NODES = 2\n\
         [qemu]\nIMAGE = {}\nWORK_DIR = {}\nMEMORY = 64\nACCEL = tcg\n",
        p("manager.log"),
        p("mgr"),
        p("ca"),
        p("run"),
        p("cache"),
        workspace().join("config").display(),
        image.display(),
        p("nodes"),
    );
    std::fs::write(root.join("manager.cfg"), cfg).unwrap();
    let child = Command::new(bin("cps"))
        .args(["manager", "-c", &p("manager.cfg")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("manager.err")).unwrap())
        .spawn()
        .unwrap();
    let mut mgr = Mgr {
        child: Some(child),
        root: root.clone(),
        url: String::new(),
        user: root.join("user"),
    };
    let ports = root.join("run/ports.json");
    let t = Instant::now();
    while !ports.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "manager did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    mgr.url = format!("https://127.0.0.1:{}", v["port"]);
    assert!(mgr.client(&["startup"]).status.success());
    let t = Instant::now();
    while qemus_under(&root).len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "VMs not started\n{}",
            mgr.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = mgr.terminate().expect("manager exit status");
    assert!(st.success(), "manager exited with {st}");
    let t = Instant::now();
    while !qemus_under(&root).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu left after manager exit: {:?}",
            qemus_under(&root)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(files_in(&root.join("nodes")), Vec::<String>::new());
}

/// `cps client` with the manager's certificate, straight to an agent (mutual TLS: the agent
/// accepts manager certificates of its user and application, the client expects an agent).
fn agent_call(root: &Path, port: u16, method: &str) -> Output {
    run(Command::new(bin("cps"))
        .args(["client", "--json", "--manager"])
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--cert-dir")
        .arg(root.join("mgr"))
        .args(["call", method])
        .stdin(Stdio::null()))
}

/// Issue #4: a helloworld image for EC2/Xen (optimize on) is booted as an HVM guest by the
/// manager's qemu driver with EC2 contextualization (`CONTEXT = ec2`: no config drive, an
/// IMDSv2-only metadata service at 169.254.169.254 behind a guest forward). The guest's
/// `cps context apply` takes the user-data from the metadata service, the agent enrols with its
/// token at the manager (guest forward to the enrolment port), and the test then calls the
/// agent itself over mutual TLS on its host-forwarded port.
#[test]
fn ec2_image_agent_contextualized_by_imdsv2_answers_over_mtls() {
    if !is_root() {
        eprintln!("skipped: needs root (mkimage build)");
        return;
    }
    let _g = heavy();
    let sb = Sandbox::new();
    let root = sb.path().to_path_buf();
    let t0 = Instant::now();
    let out = run(sb.build().args([
        "--services",
        "helloworld",
        "--cloud",
        "ec2",
        "--hypervisor",
        "xen",
        "--optimize",
        "true",
        "--output",
        "hello-ec2.img",
    ]));
    assert!(out.status.success(), "mkimage build failed");
    let image = sb.out().join("hello-ec2.img");
    eprintln!("image built in {:.0} s", t0.elapsed().as_secs_f64());

    // The PV-GRUB menu names the installed kernel and the root filesystem by UUID.
    {
        let lo = mkimage::host::LoopDevice::attach(&image, 1 << 20, None, true).expect("loop");
        let mnt = tempfile::tempdir_in(&root).unwrap();
        let m = mkimage::host::MountGuard::mount(lo.path(), mnt.path(), "ext4", Some("ro,noload"))
            .expect("mount");
        let menu = std::fs::read_to_string(mnt.path().join("boot/grub/menu.lst"))
            .expect("/boot/grub/menu.lst missing");
        let fstab = std::fs::read_to_string(mnt.path().join("etc/fstab")).unwrap();
        let uuid = fstab
            .split("UUID=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("fstab without UUID")
            .to_owned();
        let kernel = menu
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("kernel "))
            .unwrap_or_else(|| panic!("no kernel line in menu.lst:\n{menu}"));
        let vmlinuz = kernel.split_whitespace().nth(1).unwrap();
        assert!(vmlinuz.starts_with("/boot/vmlinuz-"), "{kernel}");
        assert!(
            mnt.path().join(vmlinuz.trim_start_matches('/')).is_file(),
            "menu.lst names {vmlinuz}, which is not in the image"
        );
        assert!(
            kernel.contains(&format!("root=UUID={uuid}")),
            "{kernel} (root is {uuid})"
        );
        drop(m);
    }
    assert_clean(&root);

    let hello = "ec2-agent-says-hello";
    let mut mgr = start_manager(&root, hello, &qemu_cloud(&root, &image, "CONTEXT = ec2\n"));
    let t = Instant::now();
    assert!(mgr.client(&["startup"]).status.success());
    mgr.wait_state("RUNNING", Duration::from_secs(900));
    eprintln!("ec2 node RUNNING after {:.0} s", t.elapsed().as_secs_f64());
    assert_eq!(qemus_under(&root).len(), 1);

    // Contextualized through the metadata service, not a config drive.
    let node_dir = root.join("nodes/1");
    assert!(!node_dir.join("config.iso").exists());
    let args = std::fs::read_to_string(node_dir.join("qemu.args")).unwrap();
    assert!(
        args.contains("net=169.254.0.0/16") && args.contains("guestfwd=tcp:169.254.169.254:80-"),
        "{args}"
    );
    let imds = std::fs::read_to_string(node_dir.join("imds.log")).unwrap();
    for want in [
        "PUT /latest/api/token 200",
        "GET /latest/meta-data/instance-id 200",
        "GET /latest/user-data 200",
        "GET /latest/meta-data/local-ipv4 200",
    ] {
        assert!(
            imds.lines().any(|l| l == want),
            "{want} not in imds.log:\n{imds}"
        );
    }
    assert!(
        !imds.lines().any(|l| l.ends_with(" 401")),
        "a metadata request without token:\n{imds}"
    );
    let serial = std::fs::read_to_string(node_dir.join("serial.log")).unwrap_or_default();
    assert!(serial.contains("source ec2"), "{}", mgr.diagnostics());

    // The agent itself, over mutual TLS on its host-forwarded port.
    let ids: Vec<String> = mgr.json(&["list"])["helloworld"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    let info = mgr.json(&[
        "call",
        "get_node_info",
        "-P",
        &format!("serviceNodeId={}", ids[0]),
    ]);
    let port = info["serviceNode"]["port"].as_u64().expect("agent port") as u16;
    assert_eq!(info["serviceNode"]["ip"], "127.0.0.1");
    let check = agent_call(&root, port, "check_process");
    assert!(check.status.success(), "check_process over mTLS failed");
    let got = agent_call(&root, port, "get_helloworld");
    assert!(got.status.success(), "get_helloworld over mTLS failed");
    let v: Value = serde_json::from_slice(&got.stdout).unwrap();
    let said = v.get("result").unwrap_or(&v).as_str().unwrap_or_default();
    assert_eq!(said, hello, "{v}");
    assert!(mgr.client(&["stop"]).status.success());
    mgr.wait_state("STOPPED", Duration::from_secs(120));
    let st = mgr.terminate().expect("manager exit status");
    assert!(st.success(), "manager exited with {st}");
    assert_eq!(qemus_under(&root), Vec::<u32>::new());
    assert_clean(&root);
}

/// Pids of systemd-nspawn processes whose command line mentions `dir`.
fn nspawns_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a0| a0.ends_with("systemd-nspawn"))
            && args.iter().any(|a| a.contains(&needle))
        {
            v.push(pid);
        }
    }
    v
}

/// The text without terminal colour sequences (systemd colours its status lines).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Children of `pid` (the container's init is nspawn's child).
fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(p);
        }
    }
    v
}

/// A booted container. Dropping it asks nspawn to halt the container (SIGTERM); if it is
/// still there after a minute, nspawn and the container's init are killed.
struct Container {
    child: Option<Child>,
}

impl Container {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        kill("-TERM", c.id());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("container did not halt within 60 s: killing it");
        // nspawn killed outright leaves the container running: kill its init as well.
        let inits = children_of(c.id());
        let _ = c.kill();
        for p in inits {
            kill("-KILL", p);
        }
        c.wait().ok()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Issue #6: a helloworld image with `layout = "container"` (an ext4 filesystem image) booted
/// by systemd-nspawn (boot mode, host network, `--register=no`: there is no system bus here),
/// as a node of a manager's `local` cloud. The manager mints the enrolment token and writes
/// the node's config; a stand-in for the node's binary hands that config to the test, which
/// bind-mounts it into the container and gives the container a config drive whose user-data
/// starts the agent. The image's own `cps-context` unit runs it, the agent enrols with its
/// token, the manager sees it answer, and the test calls the agent over mutual TLS on
/// 127.0.0.1. Then the container is halted; nothing may stay mounted or running.
#[test]
fn container_image_boots_under_nspawn_enrols_and_answers_over_mtls() {
    if !is_root() {
        eprintln!("skipped: needs root (mkimage build, mounts, systemd-nspawn)");
        return;
    }
    let _g = heavy();
    let sb = Sandbox::new();
    let root = sb.path().to_path_buf();
    let t0 = Instant::now();
    let out = run(sb.build().args([
        "--services",
        "helloworld",
        "--layout",
        "container",
        "--output",
        "hello-ct.img",
    ]));
    assert!(out.status.success(), "mkimage build failed");
    let image = sb.out().join("hello-ct.img");
    eprintln!(
        "container image built in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let label = Command::new("blkid")
        .args(["-p", "-s", "LABEL", "-o", "value"])
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "root");

    // The node "binary" of the local cloud: records the config the manager wrote, then waits
    // (the manager kills it when it deletes the node).
    let requested = root.join("requested-nodes");
    let standin = root.join("nspawn-node.sh");
    std::fs::write(
        &standin,
        format!(
            "#!/bin/sh\n# called as: nspawn-node.sh agent -c NODE_DIR/config.cfg\necho \"$3\" >> {}\nexec sleep 100000\n",
            requested.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &standin,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let hello = "container-agent-says-hello";
    let mut mgr = start_manager(
        &root,
        hello,
        &format!("CLOUD = local\nCPS_BIN = {}\n", standin.display()),
    );
    assert!(mgr.client(&["startup"]).status.success());
    let t = Instant::now();
    let cfg = loop {
        if let Ok(s) = std::fs::read_to_string(&requested) {
            if let Some(l) = s.lines().next() {
                break PathBuf::from(l);
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the manager created no node\n{}",
            mgr.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let node_dir = cfg.parent().unwrap().to_path_buf();
    let config = std::fs::read_to_string(&cfg).unwrap();
    assert!(config.contains("ENROLL_TOKEN"), "{config}");

    // The config drive: user-data that starts the agent with the bind-mounted config.
    let ctx = root.join("context");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("user_data"),
        format!(
            "#!/bin/sh\nnohup /usr/local/bin/cps agent -c {} >>{nd}/container-agent.out 2>&1 &\n",
            cfg.display(),
            nd = node_dir.display()
        ),
    )
    .unwrap();
    std::fs::write(
        ctx.join("meta_data.json"),
        r#"{"uuid": "ct-0001", "hostname": "hello-ct"}"#,
    )
    .unwrap();
    let data = mkimage::context::InstanceData::from_path(&ctx, "hello-ct").unwrap();
    let iso = root.join("config-2.iso");
    mkimage::context::make_config_drive(&data, &iso, &root.join("cd-work")).unwrap();

    // The image, read-only; the container writes into a tmpfs overlay (--volatile=overlay).
    let lo = mkimage::host::LoopDevice::attach(&image, 0, None, true).expect("loop");
    let tree = root.join("ct-root");
    std::fs::create_dir_all(&tree).unwrap();
    let m = mkimage::host::MountGuard::mount(lo.path(), &tree, "ext4", Some("ro,noload"))
        .expect("mount");
    let console = root.join("console.log");
    let t = Instant::now();
    let child = Command::new("systemd-nspawn")
        .args(["--register=no", "--keep-unit", "--quiet", "--boot"])
        .args(["--volatile=overlay", "--console=read-only"])
        .arg(format!("--directory={}", tree.display()))
        .arg(format!(
            "--bind-ro={}:{}",
            iso.display(),
            mkimage::stage::core::CONTAINER_CONFIG_DRIVE
        ))
        .arg(format!("--bind={}", node_dir.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(root.join("nspawn.err")).unwrap())
        .spawn()
        .unwrap();
    let mut ct = Container { child: Some(child) };
    let console_text = || {
        format!(
            "--- console:\n{}\n--- nspawn stderr:\n{}\n--- agent:\n{}",
            strip_ansi(&std::fs::read_to_string(&console).unwrap_or_default()),
            std::fs::read_to_string(root.join("nspawn.err")).unwrap_or_default(),
            std::fs::read_to_string(node_dir.join("container-agent.out")).unwrap_or_default()
        )
    };
    let t_run = Instant::now();
    loop {
        let st = mgr.state();
        if st == "RUNNING" {
            break;
        }
        assert!(
            st != "ERROR" && t_run.elapsed() < Duration::from_secs(300),
            "state {st}\n{}\n{}",
            mgr.diagnostics(),
            console_text()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "container agent RUNNING {:.1} s after nspawn started",
        t.elapsed().as_secs_f64()
    );
    let text = console_text();
    assert!(text.contains("source configdrive"), "{text}");
    assert!(
        !text.contains("Started ssh.service"),
        "sshd started in a container on the host's network\n{text}"
    );
    // Enrolled: the certificate was signed through the token and written by the agent.
    assert!(
        node_dir.join("certs/cert.pem").is_file(),
        "no certificate in {}/certs",
        node_dir.display()
    );

    let ids: Vec<String> = mgr.json(&["list"])["helloworld"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1);
    let info = mgr.json(&[
        "call",
        "get_node_info",
        "-P",
        &format!("serviceNodeId={}", ids[0]),
    ]);
    let port = info["serviceNode"]["port"].as_u64().expect("agent port") as u16;
    assert!(agent_call(&root, port, "check_process").status.success());
    let got = agent_call(&root, port, "get_helloworld");
    assert!(got.status.success(), "get_helloworld over mTLS failed");
    let v: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(v.get("result").unwrap_or(&v).as_str(), Some(hello), "{v}");
    let hello_via_manager = mgr.json(&["hello"])["helloworld"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        hello_via_manager,
        format!("Received {hello} from {}", ids[0])
    );

    // Halt the container: nspawn exits by itself once the container's systemd has stopped.
    let t = Instant::now();
    let st = ct.stop().expect("nspawn exit status");
    eprintln!(
        "container halted in {:.1} s ({st})",
        t.elapsed().as_secs_f64()
    );
    let text = console_text();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "--- container console, first and last lines:\n{}\n...\n{}",
        lines[..lines.len().min(12)].join("\n"),
        lines[lines.len().saturating_sub(12)..].join("\n")
    );
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "container did not halt"
    );
    assert_eq!(nspawns_under(&root), Vec::<u32>::new());
    assert!(mgr.client(&["stop"]).status.success());
    mgr.wait_state("STOPPED", Duration::from_secs(120));
    let st = mgr.terminate().expect("manager exit status");
    assert!(st.success(), "manager exited with {st}");
    drop(m);
    drop(lo);
    assert_eq!(nspawns_under(&root), Vec::<u32>::new());
    assert_clean(&root);
}
