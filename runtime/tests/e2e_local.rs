//! End to end through the real `cps` binary: a manager with the `local` cloud driver starts
//! agents as processes (which enrol through one-time tokens), the client CLI talks mTLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const CPS: &str = env!("CARGO_BIN_EXE_cps");

fn cps(args: &[&str]) -> Output {
    Command::new(CPS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cps")
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

struct Mgr {
    guard: ChildGuard,
    dir: tempfile::TempDir,
    url: String,
}

impl Mgr {
    fn start(extra: &str) -> Mgr {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let p = |s: &str| d.join(s).display().to_string();
        ok(cps(&["ca", "init", "--dir", &p("ca")]));
        ok(cps(&[
            "ca",
            "issue",
            "--dir",
            &p("ca"),
            "--role",
            "manager",
            "--uid",
            "1",
            "--app",
            "2",
            "--out",
            &p("mgr"),
        ]));
        ok(cps(&[
            "ca",
            "issue",
            "--dir",
            &p("ca"),
            "--role",
            "user",
            "--uid",
            "1",
            "--app",
            "2",
            "--out",
            &p("user"),
        ]));
        let cfg = format!(
            "[manager]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 2\nBIND = 127.0.0.1\nMY_IP = 127.0.0.1\nPORT = 0\n\
             ENROLL_PORT = 0\nLOG_FILE = {}\nCERT_DIR = {}\nCA_DIR = {}\nVAR_RUN = {}\nVAR_CACHE = {}\n\
             CONFIG_DIR = {}\nCLOUD = local\nPOLL_INTERVAL = 0.2\nBOOT_TIMEOUT = 20\nMAX_RETRIES = 2\n{extra}\n",
            p("manager.log"),
            p("mgr"),
            p("ca"),
            p("run"),
            p("cache"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config").display(),
        );
        std::fs::write(d.join("manager.cfg"), cfg).unwrap();
        let child = Command::new(CPS)
            .args(["manager", "-c", &p("manager.cfg")])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("manager.out")).unwrap())
            .stderr(std::fs::File::create(d.join("manager.err")).unwrap())
            .spawn()
            .unwrap();
        let guard = ChildGuard(Some(child));
        let ports = d.join("run/ports.json");
        wait_for("manager ports file", Duration::from_secs(20), || {
            ports.exists()
        });
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
        let url = format!("https://127.0.0.1:{}", v["port"]);
        Mgr { guard, dir, url }
    }

    fn client(&self, args: &[&str]) -> Output {
        let cert_dir = self.dir.path().join("user").display().to_string();
        let mut a = vec!["client", "--manager", &self.url, "--cert-dir", &cert_dir];
        a.extend_from_slice(args);
        cps(&a)
    }

    fn state(&self) -> String {
        let v: Value = serde_json::from_str(&ok(self.client(&["--json", "info"]))).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    fn wait_state(&self, s: &str) {
        wait_for(&format!("state {s}"), Duration::from_secs(60), || {
            let st = self.state();
            assert_ne!(st, "ERROR", "manager went to ERROR; log:\n{}", self.log());
            st == s
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("manager.log")).unwrap_or_default()
    }

    fn node_dir(&self, vmid: u32) -> PathBuf {
        self.dir
            .path()
            .join("cache/local-nodes")
            .join(vmid.to_string())
    }

    fn node_pid(&self, vmid: u32) -> u32 {
        std::fs::read_to_string(self.node_dir(vmid).join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

#[test]
fn helloworld_end_to_end_with_two_local_agents() {
    let m = Mgr::start("STARTING_NODES = 0");
    assert_eq!(m.state(), "INIT");
    ok(m.client(&["startup"]));
    m.wait_state("RUNNING");
    assert_eq!(ok(m.client(&["add-nodes", "2"])).trim(), "state: ADAPTING");
    m.wait_state("RUNNING");

    let hello = ok(m.client(&["hello"]));
    let lines: Vec<&str> = hello.lines().collect();
    assert_eq!(
        lines,
        [
            "Received helloworld from iaas1",
            "Received helloworld from iaas2"
        ],
        "{hello}"
    );
    // the same through the generic call
    let v: Value = serde_json::from_str(&ok(m.client(&["call", "get_helloworld"]))).unwrap();
    assert_eq!(
        v["helloworld"],
        "Received helloworld from iaas1\nReceived helloworld from iaas2"
    );

    // agents got their certificates through the token flow: key generated on the node,
    // no private key in the context, token written nowhere else than the node's config
    for vmid in [1, 2] {
        let nd = m.node_dir(vmid);
        assert!(nd.join("certs/key.pem").exists() && nd.join("certs/cert.pem").exists());
        let ctx = std::fs::read_to_string(nd.join("context.sh")).unwrap();
        assert!(!ctx.contains("PRIVATE KEY"), "no private key in user-data");
        let agent_log = std::fs::read_to_string(nd.join("cpsagent.log")).unwrap();
        assert!(
            agent_log.contains("enrolled as urn:conpaas:agent:u1:a2"),
            "{agent_log}"
        );
    }
    assert!(
        m.log().contains("enrolled node"),
        "manager log mentions enrolment"
    );

    let list = ok(m.client(&["list"]));
    assert!(list.contains("iaas1") && list.contains("iaas2"), "{list}");
    let out = m.client(&["remove-nodes", "2"]);
    assert_eq!(out.status.code(), Some(3), "RPC error exit code");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Requesting to delete 2 nodes while only 1 can be removed"));
    ok(m.client(&["remove-nodes", "1"]));
    m.wait_state("RUNNING");
    assert_eq!(
        ok(m.client(&["hello"])).trim(),
        "Received helloworld from iaas1"
    );
    let p2 = m.node_pid(2);
    assert!(!process_alive(p2), "removed agent process is gone");

    let p1 = m.node_pid(1);
    assert!(process_alive(p1));
    ok(m.client(&["stop"]));
    m.wait_state("STOPPED");
    assert!(!process_alive(p1), "stop deletes every agent");
    let hist = ok(m.client(&["history"]));
    for s in [
        "INIT", "PROLOGUE", "RUNNING", "ADAPTING", "EPILOGUE", "STOPPED",
    ] {
        assert!(hist.contains(s), "{hist}");
    }
    let mut m = m;
    assert!(
        m.guard.terminate(Duration::from_secs(10)),
        "manager exits on SIGTERM"
    );
}

#[test]
fn dead_agent_is_replaced_and_deleted() {
    let m = Mgr::start("STARTING_NODES = 1\nLOCAL_DEAD_NODES = 1\nBOOT_TIMEOUT = 5");
    ok(m.client(&["startup"]));
    let dead_pid = {
        let pid_file = m.node_dir(1).join("pid");
        wait_for("dead node pid", Duration::from_secs(10), || {
            pid_file.exists()
        });
        m.node_pid(1)
    };
    m.wait_state("RUNNING");
    let list = ok(m.client(&["list"]));
    assert!(list.contains("iaas2") && !list.contains("iaas1"), "{list}");
    assert!(m.node_dir(1).join("deleted").exists());
    assert!(!process_alive(dead_pid), "dead node process killed");
    assert!(m.log().contains("node iaas1 never answered; deleting it"));
    assert_eq!(
        ok(m.client(&["hello"])).trim(),
        "Received helloworld from iaas2"
    );

    // agents die with their manager, however it ends
    let live = m.node_pid(2);
    assert!(process_alive(live));
    let mut m = m;
    let mut child = m.guard.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(
        "agent to die with its manager",
        Duration::from_secs(10),
        || !process_alive(live),
    );
}

#[test]
fn client_reports_connection_and_tls_errors() {
    let m = Mgr::start("");
    // wrong port: connection error, exit code 2
    let cert_dir = m.dir.path().join("user").display().to_string();
    let o = cps(&[
        "client",
        "--manager",
        "https://127.0.0.1:1",
        "--cert-dir",
        &cert_dir,
        "info",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot connect"),
        "{o:?}"
    );
    // a user of another application is refused by the manager
    let d = m.dir.path();
    let p = |s: &str| d.join(s).display().to_string();
    ok(cps(&[
        "ca",
        "issue",
        "--dir",
        &p("ca"),
        "--role",
        "user",
        "--uid",
        "1",
        "--app",
        "3",
        "--out",
        &p("other"),
    ]));
    let o = cps(&[
        "client",
        "--manager",
        &m.url,
        "--cert-dir",
        &p("other"),
        "info",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // a cloud the manager does not have: refused by the service (exit 3), state unchanged
    let o = cps(&[
        "client",
        "--manager",
        &m.url,
        "--cert-dir",
        &cert_dir,
        "add-nodes",
        "1",
        "--cloud",
        "nosuch",
    ]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Unknown cloud 'nosuch' (clouds: iaas)"),
        "{o:?}"
    );
    // missing cert paths
    let o = cps(&["client", "--manager", &m.url, "info"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("client certificate, key and CA are required")
    );
}

#[test]
fn context_render_cli() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(cps(&["ca", "init", "--dir", ca.to_str().unwrap()]));
    let out = ok(cps(&[
        "context",
        "render",
        "--uid",
        "3",
        "--app",
        "4",
        "--node-id",
        "n1",
        "--manager-ip",
        "10.1.1.1",
        "--enroll-url",
        "https://10.1.1.1:4443/enroll",
        "--token",
        "abc",
        "--ca-cert",
        ca.join("ca_cert.pem").to_str().unwrap(),
        "--cloud",
        "openstack",
        "--set",
        "STRING=bonjour",
    ]));
    assert!(out.starts_with("#!/bin/bash"));
    assert!(out.contains("STRING_TO_GENERATE = bonjour"));
    assert!(out.contains("--token 'abc'"));
    let cfg = ok(cps(&[
        "context",
        "render",
        "--uid",
        "3",
        "--app",
        "4",
        "--node-id",
        "n1",
        "--manager-ip",
        "10.1.1.1",
        "--enroll-url",
        "u",
        "--token",
        "abc",
        "--ca-cert",
        ca.join("ca_cert.pem").to_str().unwrap(),
        "--config-only",
    ]));
    assert!(cfg.starts_with("# Default agent configuration") && cfg.contains("USER_ID = 3"));
}

#[test]
fn agent_refuses_incomplete_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.cfg");
    std::fs::write(
        &cfg,
        "[agent]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 1\nLOG_FILE = /tmp/x.log\n",
    )
    .unwrap();
    let o = cps(&["agent", "-c", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Missing configuration variable ETC"));
    let o = cps(&["agent", "-c", "/nonexistent.cfg"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Failed to find configuration file"));
}
