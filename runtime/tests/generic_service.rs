//! The Generic service end to end: a manager (in process, `local` cloud) whose agents are
//! real `cps agent` processes running as root; the application's scripts run as `nobody`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use runtime::manager::State;
use runtime::testkit::TestManager;
use serde_json::json;

const CPS: &str = env!("CARGO_BIN_EXE_cps");

/// A tar.gz of `(name, content)` files, names written raw (hostile ones too).
fn targz(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        let raw = &mut h.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// The uid scripts run as: `nobody` (SCRIPT_USER's default) when the agents run as root,
/// else the agents' own.
fn script_uid() -> u32 {
    if !nix::unistd::geteuid().is_root() {
        return nix::unistd::geteuid().as_raw();
    }
    let u = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    assert_ne!(u.uid.as_raw(), 0);
    u.uid.as_raw()
}

async fn wait_until<F, Fut>(what: &str, m: &TestManager, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; manager log:\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

const INIT: &str =
    "id -u > init.out\necho \"$CONPAAS_NODE_ID\" >> init.out\necho init done on $CONPAAS_NODE_ID\n";
const NOTIFY: &str = "echo \"$CONPAAS_NODES\" >> notify.log\ncat \"$CONPAAS_NODES_FILE\"\n";
const RUN: &str = "echo started > run.out\nexec sleep 60\n";
const INTERRUPT: &str = "echo interrupted\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_lifecycle_scripts_run_unprivileged_on_every_node() {
    let uid = script_uid();
    let m = TestManager::start("generic", CPS, "STARTING_NODES = 0")
        .await
        .unwrap();
    m.post("startup", json!({})).await.unwrap();
    m.wait_state(State::RUNNING).await.unwrap();

    let app = targz(&[
        ("init.sh", INIT),
        ("notify.sh", NOTIFY),
        ("run.sh", RUN),
        ("interrupt.sh", INTERRUPT),
    ]);
    let r = m
        .client
        .upload(
            0,
            "upload_code_version",
            &[("description", "first")],
            &[("code", "app.tar.gz", &app)],
        )
        .await
        .unwrap();
    assert_eq!(r["codeVersionId"], "code-1");
    let v = m.get("list_code_versions", json!({})).await.unwrap();
    assert_eq!(v["codeVersions"][0]["current"], true, "{v}");

    m.post("add_nodes", json!({"nodes": {"node": 2}}))
        .await
        .unwrap();
    m.wait_state(State::RUNNING).await.unwrap();

    // both nodes ran init.sh, then notify.sh, as nobody
    let code = |vmid: u32| m.node_dir(vmid).join("cache/code/code-1");
    wait_until("init.sh and notify.sh on both nodes", &m, || async {
        let v = m.get("get_script_status", json!({})).await.unwrap();
        ["iaas1", "iaas2"].iter().all(|n| {
            ["init.sh", "notify.sh"]
                .iter()
                .all(|s| v["nodes"][n]["scripts"][s]["state"] == "STOPPED")
        })
    })
    .await;
    let v = m.get("get_script_status", json!({})).await.unwrap();
    for (vmid, id) in [(1, "iaas1"), (2, "iaas2")] {
        let st = &v["nodes"][id]["scripts"]["init.sh"];
        assert_eq!(st["returncode"], 0, "{v}");
        assert_eq!(st["uid"], uid, "{v}");
        assert!(
            st["output"]
                .as_str()
                .unwrap()
                .contains(&format!("init done on {id}")),
            "output retrievable: {v}"
        );
        let out = code(vmid).join("init.out");
        assert_eq!(read(&out), format!("{uid}\n{id}\n"), "init.sh of {id}");
        assert_eq!(
            std::fs::metadata(&out).unwrap().uid(),
            uid,
            "the file init.sh wrote belongs to nobody"
        );
        assert_eq!(read(&code(vmid).join("notify.log")), "iaas1 iaas2\n");
        // the agent log tells what ran
        let log = read(&m.node_dir(vmid).join("cpsagent.log"));
        assert!(
            log.contains("init.sh started") && log.contains("init.sh exited with Some(0)"),
            "{log}"
        );
    }

    // a node leaves: the remaining one is notified with the new list
    m.post("remove_nodes", json!({"nodes": {"node": 1}}))
        .await
        .unwrap();
    m.wait_state(State::RUNNING).await.unwrap();
    wait_until("notify.sh after the removal", &m, || async {
        read(&code(1).join("notify.log")) == "iaas1 iaas2\niaas1\n"
    })
    .await;
    assert_eq!(read(&code(1).join("../nodes")).trim(), "iaas1 127.0.0.1");

    // run on request, then interrupt stops it
    let r = m
        .post("execute_script", json!({"command": "run"}))
        .await
        .unwrap();
    assert_eq!(r["nodes"], 1);
    wait_until("run.sh running", &m, || async {
        let v = m.get("get_script_status", json!({})).await.unwrap();
        v["nodes"]["iaas1"]["scripts"]["run.sh"]["state"] == "RUNNING"
            && read(&code(1).join("run.out")) == "started\n"
    })
    .await;
    m.post("execute_script", json!({"command": "interrupt"}))
        .await
        .unwrap();
    wait_until("run.sh stopped by interrupt", &m, || async {
        let v = m.get("get_script_status", json!({})).await.unwrap();
        let s = &v["nodes"]["iaas1"]["scripts"];
        s["run.sh"]["state"] == "STOPPED" && s["interrupt.sh"]["output"] == "interrupted\n"
    })
    .await;
    let e = m
        .post("execute_script", json!({"command": "rm -rf /"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Invalid command"), "{e}");

    // a second version, a zip, uploaded with the CLI; enable_code installs it and runs init.sh
    let zip = {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start_file("init.sh", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"echo v2 > v2.out\n").unwrap();
        w.finish().unwrap().into_inner()
    };
    let zp = m.dir.join("app2.zip");
    std::fs::write(&zp, zip).unwrap();
    let o = std::process::Command::new(CPS)
        .args(["client", "--manager"])
        .arg(format!("https://{}", m.running.rpc_addr))
        .arg("--cert-dir")
        .arg(m.dir.join("user"))
        .args([
            "upload",
            "upload_code_version",
            "-P",
            "description=second",
            "-F",
        ])
        .arg(format!("code={}", zp.display()))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("code-2"), "{out}{o:?}");
    m.post("enable_code", json!({"codeVersionId": "code-2"}))
        .await
        .unwrap();
    let v2 = m.node_dir(1).join("cache/code/code-2/v2.out");
    wait_until("init.sh of code-2", &m, || async { read(&v2) == "v2\n" }).await;
    let v = m.get("list_code_versions", json!({})).await.unwrap();
    assert_eq!(v["codeVersions"][1]["description"], "second");
    assert_eq!(v["codeVersions"][1]["current"], true, "{v}");

    m.post("stop", json!({})).await.unwrap();
    m.wait_state(State::STOPPED).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_escaping_its_directory_is_refused() {
    let m = TestManager::start("generic", CPS, "STARTING_NODES = 1")
        .await
        .unwrap();
    m.post("startup", json!({})).await.unwrap();
    m.wait_state(State::RUNNING).await.unwrap();
    let marker = format!("cps-evil-{}", std::process::id());
    let evil_name = format!("../../../../../../tmp/{marker}");
    let bad = targz(&[("init.sh", "echo hi\n"), (&evil_name, "owned\n")]);

    // the manager refuses the upload
    let e = m
        .client
        .upload(
            0,
            "upload_code_version",
            &[],
            &[("code", "bad.tar.gz", &bad)],
        )
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("Invalid archive bad.tar.gz") && msg.contains("'..' in path"),
        "{msg}"
    );
    let v = m.get("list_code_versions", json!({})).await.unwrap();
    assert_eq!(v["codeVersions"], json!([]), "nothing stored");

    // an agent refuses it too (defence in depth), and writes nothing
    let node = m.running.manager.nodes()[0].clone();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bad);
    let r = m
        .running
        .manager
        .call_nodes(
            &[node],
            true,
            "update_code",
            &json!({"codeVersionId": "v1", "filename": "bad.tar.gz", "archive": b64}),
        )
        .await;
    let err = r[0].1.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("Cannot install code version v1") && err.contains("'..' in path"),
        "{err}"
    );
    assert!(!Path::new("/tmp").join(&marker).exists());
    let code_dir = m.node_dir(1).join("cache/code");
    let left: Vec<_> = std::fs::read_dir(&code_dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing left in the code dir: {left:?}");
    let e = m
        .post("execute_script", json!({"command": "init"}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("No code version installed"), "{e}");
}

#[test]
fn agent_config_annex_sets_code_dir_and_user() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent/generic-agent.cfg"),
    )
    .unwrap();
    let ini = runtime::config::Ini::parse(&format!("[agent]\nVAR_CACHE = /v\n{text}")).unwrap();
    assert_eq!(ini.get("agent", "CODE_DIR").unwrap(), "/v/code");
    assert_eq!(ini.get("agent", "SCRIPT_USER").unwrap(), "nobody");
}
