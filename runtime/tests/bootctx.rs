//! `cps context apply`: metadata sources, once-per-instance semantics, user-data execution.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use runtime::bootctx::{
    apply, maybe_gunzip, opennebula_context, parse_context_sh, parse_meta_data_json, ApplyOptions,
    Runner, SourceKind, UserDataOutcome,
};

const TOKEN: &str = "AQAEAFakeToken==";
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@example";
const MARKER_SCRIPT: &str = "#!/bin/sh\n\
echo \"ran $CPS_INSTANCE_ID\" >> \"$CPS_CONTEXT_ROOT/marker\"\n\
echo hello-from-userdata\n";

// ------------------------------------------------------------ fake IMDS

#[derive(Default)]
struct ImdsState {
    instance_id: String,
    key: Option<String>,
    user_data: Option<Vec<u8>>,
    hostname: Option<String>,
    /// Answer the token PUT with this status instead of a token (IMDSv1-only service).
    put_status: Option<u16>,
    /// OpenStack metadata service documents.
    openstack_meta: Option<String>,
    openstack_user_data: Option<Vec<u8>>,
    /// "METHOD PATH token?" per request.
    seen: Vec<String>,
}

/// A tiny EC2 metadata service on 127.0.0.1: IMDSv2 token PUT, GETs refused (401) without
/// the token header unless `put_status` makes it a v1-only service. Stopped on drop.
struct Imds {
    port: u16,
    state: Arc<Mutex<ImdsState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn respond(s: &mut TcpStream, status: u16, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn serve(mut s: TcpStream, st: &Mutex<ImdsState>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = Vec::new();
    let mut b = [0u8; 1024];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&b[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let mut lines = text.split("\r\n");
    let mut rl = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (rl.next().unwrap_or_default(), rl.next().unwrap_or_default());
    let hdr = |name: &str| {
        text.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut st = st.lock().unwrap();
    let tok = hdr("X-aws-ec2-metadata-token");
    st.seen.push(format!("{method} {path} {}", tok.is_some()));
    if method == "PUT" && path == "/latest/api/token" {
        if let Some(code) = st.put_status {
            return respond(&mut s, code, b"");
        }
        if hdr("X-aws-ec2-metadata-token-ttl-seconds").is_none() {
            return respond(&mut s, 400, b"missing ttl");
        }
        return respond(&mut s, 200, TOKEN.as_bytes());
    }
    if method != "GET" {
        return respond(&mut s, 405, b"");
    }
    if st.put_status.is_none() && tok.as_deref() != Some(TOKEN) {
        return respond(&mut s, 401, b"");
    }
    let body: Option<Vec<u8>> = match path {
        "/latest/meta-data/instance-id" if !st.instance_id.is_empty() => {
            Some(st.instance_id.clone().into_bytes())
        }
        "/openstack/latest/meta_data.json" => st.openstack_meta.clone().map(String::into_bytes),
        "/openstack/latest/user_data" => st.openstack_user_data.clone(),
        "/latest/meta-data/public-keys/0/openssh-key" => st.key.clone().map(String::into_bytes),
        "/latest/user-data" => st.user_data.clone(),
        "/latest/meta-data/local-hostname" => st.hostname.clone().map(String::into_bytes),
        _ => None,
    };
    match body {
        Some(b) => respond(&mut s, 200, &b),
        None => respond(&mut s, 404, b"Not Found"),
    }
}

impl Imds {
    fn start(state: ImdsState) -> Imds {
        Imds::start_on(0, state)
    }

    fn start_on(port: u16, state: ImdsState) -> Imds {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for c in l.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = c {
                    serve(c, &st);
                }
            }
        });
        Imds {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------ helpers

fn opts(root: &Path, sources: Vec<SourceKind>) -> ApplyOptions {
    ApplyOptions {
        sources,
        root: root.to_path_buf(),
        network_wait: Duration::ZERO,
        runner: Runner::Direct,
        ..ApplyOptions::default()
    }
}

fn ec2_opts(root: &Path, imds: &Imds) -> ApplyOptions {
    ApplyOptions {
        metadata_url: imds.url(),
        ..opts(root, vec![SourceKind::Ec2])
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn marker_lines(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("marker"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn assert_contextualized(root: &Path, host: &str) {
    let ssh = root.join("root/.ssh");
    assert_eq!(mode(&ssh), 0o700);
    assert_eq!(mode(&ssh.join("authorized_keys")), 0o600);
    assert_eq!(read(root, "root/.ssh/authorized_keys"), format!("{KEY}\n"));
    assert_eq!(read(root, "etc/hostname"), format!("{host}\n"));
}

// ------------------------------------------------------------ EC2

#[test]
fn imdsv2_keys_hostname_and_user_data_once_per_instance() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let imds = Imds::start(ImdsState {
        instance_id: "i-0123456789abcdef0".into(),
        key: Some(format!("{KEY}\n")),
        user_data: Some(MARKER_SCRIPT.as_bytes().to_vec()),
        hostname: Some("ip-10-0-0-7.ec2.internal".into()),
        ..Default::default()
    });
    let o = ec2_opts(r, &imds);

    let rep = apply(&o).unwrap();
    assert_eq!(rep.source, Some(SourceKind::Ec2));
    assert_eq!(rep.instance_id.as_deref(), Some("i-0123456789abcdef0"));
    assert!(!rep.already_applied);
    assert_eq!(rep.keys_added, 1);
    assert_eq!(rep.user_data, UserDataOutcome::Exited(0));
    assert_contextualized(r, "ip-10-0-0-7.ec2.internal");
    assert_eq!(marker_lines(r), vec!["ran i-0123456789abcdef0"]);
    assert_eq!(
        read(r, "var/lib/cps/context/instance-id"),
        "i-0123456789abcdef0\n"
    );
    assert_eq!(read(r, "var/lib/cps/context/userdata-status"), "exit 0\n");
    assert_eq!(mode(&r.join("var/lib/cps/context")), 0o700);
    assert!(!r.join("var/lib/cps/context/user-data.run").exists());
    let log = read(r, "var/log/cps-userdata.log");
    assert!(log.contains("hello-from-userdata"), "{log}");
    assert_eq!(mode(&r.join("var/log/cps-userdata.log")), 0o600);
    {
        let st = imds.state.lock().unwrap();
        assert_eq!(st.seen[0], "PUT /latest/api/token false");
        assert!(
            st.seen[1..].iter().all(|s| s.ends_with(" true")),
            "{:?}",
            st.seen
        );
    }

    // Reboot of the same instance: nothing re-run, nothing duplicated.
    let rep = apply(&o).unwrap();
    assert!(rep.already_applied);
    assert_eq!(rep.user_data, UserDataOutcome::None);
    assert_eq!(marker_lines(r).len(), 1);
    assert_contextualized(r, "ip-10-0-0-7.ec2.internal");

    // New instance from the same disk: user-data runs again, the key is not appended twice.
    imds.state.lock().unwrap().instance_id = "i-0fedcba9876543210".into();
    let rep = apply(&o).unwrap();
    assert!(!rep.already_applied);
    assert_eq!(rep.keys_added, 0);
    assert_eq!(
        marker_lines(r),
        vec!["ran i-0123456789abcdef0", "ran i-0fedcba9876543210"]
    );
    assert_contextualized(r, "ip-10-0-0-7.ec2.internal");
    assert_eq!(
        read(r, "var/lib/cps/context/instance-id"),
        "i-0fedcba9876543210\n"
    );
}

#[test]
fn imds_gzip_user_data_is_decompressed_and_run() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let imds = Imds::start(ImdsState {
        instance_id: "i-gzip".into(),
        key: Some(KEY.into()),
        user_data: Some(gzip(MARKER_SCRIPT.as_bytes())),
        hostname: Some("gz-host".into()),
        ..Default::default()
    });
    let rep = apply(&ec2_opts(r, &imds)).unwrap();
    assert_eq!(rep.user_data, UserDataOutcome::Exited(0));
    assert_eq!(marker_lines(r), vec!["ran i-gzip"]);
    assert_contextualized(r, "gz-host");
}

#[test]
fn imdsv1_fallback_when_the_token_put_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let imds = Imds::start(ImdsState {
        instance_id: "i-v1".into(),
        key: Some(KEY.into()),
        user_data: Some(MARKER_SCRIPT.as_bytes().to_vec()),
        hostname: Some("v1-host".into()),
        put_status: Some(405),
        ..Default::default()
    });
    let rep = apply(&ec2_opts(r, &imds)).unwrap();
    assert_eq!(rep.instance_id.as_deref(), Some("i-v1"));
    assert_eq!(marker_lines(r), vec!["ran i-v1"]);
    assert_contextualized(r, "v1-host");
    assert!(
        rep.log.iter().any(|l| l.contains("IMDSv1")),
        "{:?}",
        rep.log
    );
}

#[test]
fn non_script_user_data_is_ignored_and_missing_documents_are_fine() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let imds = Imds::start(ImdsState {
        instance_id: "i-cloudconfig".into(),
        user_data: Some(b"#cloud-config\npackages: [htop]\n".to_vec()),
        ..Default::default()
    });
    let rep = apply(&ec2_opts(r, &imds)).unwrap();
    assert_eq!(rep.user_data, UserDataOutcome::NotScript);
    assert_eq!(rep.keys_added, 0);
    assert!(rep.hostname.is_none());
    assert!(!r.join("root/.ssh/authorized_keys").exists());
    assert!(!r.join("etc/hostname").exists());
    assert!(!r.join("marker").exists());
    assert_eq!(
        read(r, "var/lib/cps/context/userdata-status"),
        "not-a-script\n"
    );
}

#[test]
fn user_data_timeout_kills_the_script_and_is_a_failure() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let imds = Imds::start(ImdsState {
        instance_id: "i-slow".into(),
        user_data: Some(b"#!/bin/sh\necho start >> \"$CPS_CONTEXT_ROOT/marker\"\nsleep 60\necho end >> \"$CPS_CONTEXT_ROOT/marker\"\n".to_vec()),
        ..Default::default()
    });
    let o = ApplyOptions {
        userdata_timeout: Duration::from_secs(1),
        ..ec2_opts(r, &imds)
    };
    let t = Instant::now();
    let rep = apply(&o).unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(rep.user_data, UserDataOutcome::TimedOut);
    assert!(rep.user_data.failed());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(marker_lines(r), vec!["start"]);
    assert_eq!(read(r, "var/lib/cps/context/userdata-status"), "timeout\n");
}

#[test]
fn a_background_daemon_started_by_user_data_outlives_apply() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // What the rendered start script does with the agent: nohup … &.
    let imds = Imds::start(ImdsState {
        instance_id: "i-daemon".into(),
        user_data: Some(b"#!/bin/sh\nnohup sleep 30 >/dev/null 2>&1 &\necho $! > \"$CPS_CONTEXT_ROOT/daemon.pid\"\n".to_vec()),
        ..Default::default()
    });
    let rep = apply(&ec2_opts(r, &imds)).unwrap();
    assert_eq!(rep.user_data, UserDataOutcome::Exited(0));
    let pid: i32 = read(r, "daemon.pid").trim().parse().unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    let alive = nix::sys::signal::kill(pid, None).is_ok();
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    assert!(alive, "the daemon died with the user-data script");
}

#[test]
fn systemd_scope_runner_execs_the_script_in_a_named_scope() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Stands in for systemd-run --scope: records its arguments, then execs the command.
    let fake = r.join("fake-systemd-run");
    std::fs::write(
        &fake,
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$CPS_CONTEXT_ROOT/systemd-run.args\"\n\
while [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let imds = Imds::start(ImdsState {
        instance_id: "i-scope.1".into(),
        user_data: Some(format!("{MARKER_SCRIPT}exit 4\n").into_bytes()),
        ..Default::default()
    });
    let o = ApplyOptions {
        runner: Runner::SystemdScope,
        systemd_run: Some(fake),
        ..ec2_opts(r, &imds)
    };
    let rep = apply(&o).unwrap();
    assert_eq!(rep.user_data, UserDataOutcome::Exited(4));
    assert_eq!(marker_lines(r), vec!["ran i-scope.1"]);
    let args = read(r, "systemd-run.args");
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(&args[..3], &["--scope", "--quiet", "--collect"]);
    assert!(
        args[3].starts_with("--unit=cps-userdata-i_scope_1-"),
        "{args:?}"
    );
    assert_eq!(args[5], "--");
    assert!(args[6].ends_with("var/lib/cps/context/user-data.run"));
}

fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn no_source_is_not_an_error() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let o = ApplyOptions {
        metadata_url: format!("http://127.0.0.1:{}", closed_port()),
        network_wait: Duration::from_secs(3),
        ..opts(r, vec![SourceKind::Ec2, SourceKind::OpenStack])
    };
    let t = Instant::now();
    let rep = apply(&o).unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "no retry: {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(rep.source.is_none());
    assert!(rep.log.iter().any(|l| l == "no contextualization data"));
    assert!(!r.join("var").exists());
}

#[test]
fn metadata_service_that_comes_up_late_is_waited_for() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let port = closed_port();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2500));
        Imds::start_on(
            port,
            ImdsState {
                instance_id: "i-late".into(),
                key: Some(KEY.into()),
                ..Default::default()
            },
        )
    });
    let o = ApplyOptions {
        metadata_url: format!("http://127.0.0.1:{port}"),
        network_wait: Duration::from_secs(30),
        ..opts(r, vec![SourceKind::Ec2])
    };
    let t = Instant::now();
    let rep = apply(&o).unwrap();
    let _imds = late.join().unwrap();
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert_eq!(rep.instance_id.as_deref(), Some("i-late"));
    assert_eq!(rep.keys_added, 1);
    assert!(
        rep.log.iter().any(|l| l.contains("retrying")),
        "{:?}",
        rep.log
    );
}

#[test]
fn openstack_metadata_service_when_ec2_has_no_instance_id() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let meta = serde_json::json!({
        "uuid": "os-uuid-1",
        "hostname": "os-node",
        "public_keys": {"k": KEY},
    });
    let imds = Imds::start(ImdsState {
        put_status: Some(404),
        openstack_meta: Some(meta.to_string()),
        openstack_user_data: Some(MARKER_SCRIPT.as_bytes().to_vec()),
        ..Default::default()
    });
    let o = ApplyOptions {
        metadata_url: imds.url(),
        ..opts(r, vec![SourceKind::Ec2, SourceKind::OpenStack])
    };
    let rep = apply(&o).unwrap();
    assert_eq!(rep.source, Some(SourceKind::OpenStack));
    assert_eq!(rep.instance_id.as_deref(), Some("os-uuid-1"));
    assert_contextualized(r, "os-node");
    assert_eq!(marker_lines(r), vec!["ran os-uuid-1"]);
    assert_eq!(read(r, "var/lib/cps/context/source"), "openstack\n");
}

#[test]
fn cli_exit_codes() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let cps = env!("CARGO_BIN_EXE_cps");
    let run = |url: &str| {
        Command::new(cps)
            .args([
                "context",
                "apply",
                "--sources",
                "ec2",
                "--network-wait",
                "0",
            ])
            .arg("--root")
            .arg(r)
            .args(["--metadata-url", url])
            .output()
            .unwrap()
    };
    let out = run(&format!("http://127.0.0.1:{}", closed_port()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no contextualization data"));

    let imds = Imds::start(ImdsState {
        instance_id: "i-fails".into(),
        user_data: Some(b"#!/bin/sh\necho oops >&2\nexit 3\n".to_vec()),
        ..Default::default()
    });
    let out = run(&imds.url());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("oops"),
        "{out:?}"
    );
    assert_eq!(read(r, "var/lib/cps/context/userdata-status"), "exit 3\n");
    // Same instance again: not re-run, success.
    let out = run(&imds.url());
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let bad = Command::new(cps)
        .args(["context", "apply", "--sources", "azure"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
}

// ------------------------------------------------------------ config drive / OpenNebula media

/// A read-only loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn make_iso(label: &str, tree: &Path, out: &Path) {
    let st = Command::new("genisoimage")
        .args(["-quiet", "-V", label, "-r", "-J", "-o"])
        .arg(out)
        .arg(tree)
        .status()
        .expect("genisoimage (Debian package genisoimage) must be installed");
    assert!(st.success());
}

#[test]
fn config_drive_on_a_read_only_loop_device() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let latest = tree.join("openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    let meta = serde_json::json!({
        "uuid": "8d2c1a4e-5b6f-4c3d-9e8f-0a1b2c3d4e5f",
        "hostname": "cd-node.novalocal",
        "name": "cd-node",
        "public_keys": {"mykey": KEY},
        "keys": [{"name": "mykey", "type": "ssh", "data": KEY}],
    });
    std::fs::write(latest.join("meta_data.json"), meta.to_string()).unwrap();
    std::fs::write(latest.join("user_data"), MARKER_SCRIPT).unwrap();
    std::fs::create_dir_all(tree.join("ec2/latest")).unwrap();
    let iso = work.path().join("config-2.iso");
    make_iso("config-2", &tree, &iso);
    let dev = Loop::attach(&iso);

    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let o = ApplyOptions {
        config_drive: Some(dev.0.clone()),
        ..opts(r, vec![SourceKind::ConfigDrive])
    };
    let rep = apply(&o).unwrap();
    assert_eq!(rep.source, Some(SourceKind::ConfigDrive));
    assert_eq!(
        rep.instance_id.as_deref(),
        Some("8d2c1a4e-5b6f-4c3d-9e8f-0a1b2c3d4e5f")
    );
    assert_eq!(rep.keys_added, 1);
    assert_eq!(rep.user_data, UserDataOutcome::Exited(0));
    assert_contextualized(r, "cd-node.novalocal");
    assert_eq!(
        marker_lines(r),
        vec!["ran 8d2c1a4e-5b6f-4c3d-9e8f-0a1b2c3d4e5f"]
    );
    let rep = apply(&o).unwrap();
    assert!(rep.already_applied);
    assert_eq!(marker_lines(r).len(), 1);
    // The volume label is what the boot-time search looks for.
    assert_eq!(
        runtime::bootctx::iso9660::volume_label(&dev.0).as_deref(),
        Some("config-2")
    );
}

#[test]
fn config_drive_without_user_data() {
    let work = tempfile::tempdir().unwrap();
    let latest = work.path().join("tree/openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    std::fs::write(
        latest.join("meta_data.json"),
        r#"{"uuid": "u-1", "public_keys": {"a": "ssh-rsa AAAA a", "b": "ssh-rsa BBBB b"}}"#,
    )
    .unwrap();
    let iso = work.path().join("cd.iso");
    make_iso("config-2", &work.path().join("tree"), &iso);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let rep = apply(&ApplyOptions {
        config_drive: Some(iso),
        ..opts(r, vec![SourceKind::ConfigDrive])
    })
    .unwrap();
    assert_eq!(rep.user_data, UserDataOutcome::None);
    assert_eq!(rep.keys_added, 2);
    assert_eq!(
        read(r, "root/.ssh/authorized_keys"),
        "ssh-rsa AAAA a\nssh-rsa BBBB b\n"
    );
    assert!(!r.join("etc/hostname").exists());
}

#[test]
fn opennebula_context_cd() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let ctx = format!(
        "# Context variables generated by OpenNebula\nDISK_ID='1'\nSSH_PUBLIC_KEY='{KEY}'\nSET_HOSTNAME='one-vm-7'\nUSERDATA='{}'\nTARGET='hdb'\n",
        hex::encode(MARKER_SCRIPT)
    );
    std::fs::write(tree.join("context.sh"), &ctx).unwrap();
    let iso = work.path().join("context.iso");
    make_iso("CONTEXT", &tree, &iso);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let rep = apply(&ApplyOptions {
        context_cd: Some(iso),
        ..opts(r, SourceKind::AUTO.to_vec())
    })
    .unwrap();
    assert_eq!(rep.source, Some(SourceKind::OpenNebula));
    let id = rep.instance_id.unwrap();
    assert!(id.starts_with("one-") && id.len() == 20, "{id}");
    assert_contextualized(r, "one-vm-7");
    assert_eq!(marker_lines(r), vec![format!("ran {id}")]);
}

// ------------------------------------------------------------ parsers

#[test]
fn context_sh_parsing() {
    let text = "# comment\n\
ETH0_IP='10.0.0.5'\n\
export FOO=\"a \\\"quoted\\\" \\$HOME\"\n\
SSH_PUBLIC_KEY='ssh-rsa AAAA one\nssh-ed25519 BBBB two'\n\
QUOTE='it'\\''s'\n\
BARE=plain\\ word ; NEXT=1\n\
EMPTY=''\n\
not an assignment\n\
9BAD=x\n";
    let v = parse_context_sh(text);
    assert_eq!(v["ETH0_IP"], "10.0.0.5");
    assert_eq!(v["FOO"], "a \"quoted\" $HOME");
    assert_eq!(
        v["SSH_PUBLIC_KEY"],
        "ssh-rsa AAAA one\nssh-ed25519 BBBB two"
    );
    assert_eq!(v["QUOTE"], "it's");
    assert_eq!(v["BARE"], "plain word");
    assert_eq!(v["NEXT"], "1");
    assert_eq!(v["EMPTY"], "");
    assert!(!v.contains_key("9BAD"));
    assert!(!v.contains_key("not"));
}

#[test]
fn opennebula_user_data_encodings_and_instance_id() {
    let script = "#!/bin/sh\necho hi\n";
    // Hex as `xxd -p` writes it: 60 digits a line.
    let hexed: String = hex::encode(script)
        .as_bytes()
        .chunks(60)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect();
    let ctx = format!("USERDATA='{hexed}'\nHOSTNAME='h1'\nSSH_PUBLIC_KEY='k1\nk2\nk1'\n");
    let d = opennebula_context(ctx.as_bytes()).unwrap();
    assert_eq!(d.user_data.as_deref(), Some(script.as_bytes()));
    assert_eq!(d.meta.hostname.as_deref(), Some("h1"));
    assert_eq!(d.meta.public_keys, vec!["k1", "k2"]);
    assert_eq!(d.source, SourceKind::OpenNebula);
    // Same file → same id; any change → another id.
    assert_eq!(
        opennebula_context(ctx.as_bytes()).unwrap().meta.instance_id,
        d.meta.instance_id
    );
    let other = opennebula_context(format!("{ctx}X='1'\n").as_bytes()).unwrap();
    assert_ne!(other.meta.instance_id, d.meta.instance_id);

    let b64 = "IyEvYmluL3NoCmVjaG8gaGkK"; // base64 of the script
    let d = opennebula_context(format!("START_SCRIPT_BASE64='{b64}'\n").as_bytes()).unwrap();
    assert_eq!(d.user_data.as_deref(), Some(script.as_bytes()));
    let d = opennebula_context(
        format!("USER_DATA='{b64}'\nUSER_DATA_ENCODING='base64'\nSET_HOSTNAME='a'\nHOSTNAME='b'\n")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(d.user_data.as_deref(), Some(script.as_bytes()));
    assert_eq!(d.meta.hostname.as_deref(), Some("a"));
    let d = opennebula_context(b"START_SCRIPT='#!/bin/sh\necho x'\n").unwrap();
    assert_eq!(d.user_data.as_deref(), Some(&b"#!/bin/sh\necho x"[..]));
    assert!(opennebula_context(b"USERDATA='zz'\n").is_err());
    assert!(opennebula_context(b"A=1\n").unwrap().user_data.is_none());
}

#[test]
fn meta_data_json_and_gunzip() {
    let m = parse_meta_data_json(
        br#"{"uuid": "abc", "hostname": "h.novalocal", "public_keys": {"k": "ssh-rsa X k\n"}, "keys": [{"data": "ssh-rsa X k"}, {"data": "ssh-ed25519 Y y"}]}"#,
    )
    .unwrap();
    assert_eq!(m.instance_id, "abc");
    assert_eq!(m.hostname.as_deref(), Some("h.novalocal"));
    assert_eq!(m.public_keys, vec!["ssh-rsa X k", "ssh-ed25519 Y y"]);
    assert!(parse_meta_data_json(br#"{"hostname": "x"}"#).is_err());
    assert!(parse_meta_data_json(b"not json").is_err());

    assert_eq!(maybe_gunzip(b"#!/bin/sh\n").unwrap(), b"#!/bin/sh\n");
    assert_eq!(maybe_gunzip(&gzip(b"#!/bin/sh\n")).unwrap(), b"#!/bin/sh\n");
    let mut two = gzip(b"ab");
    two.extend(gzip(b"cd"));
    assert_eq!(maybe_gunzip(&two).unwrap(), b"abcd");
    assert!(maybe_gunzip(&[0x1f, 0x8b, 0, 0]).is_err());
}
