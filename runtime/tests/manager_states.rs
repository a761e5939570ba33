//! Manager state machine and controller behaviour, with an in-process fake cloud whose nodes
//! are real agents served over mTLS on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use runtime::agent::{Agent, AgentConfig};
use runtime::cloud::{Cloud, NodeRequest, ServiceNode};
use runtime::context::{ConfigTree, NodeVars};
use runtime::controller::Controller;
use runtime::enrol::Enroller;
use runtime::manager::{Manager, State};
use runtime::pki::{self, Ca, PeerRule, Role};
use runtime::rpc::{Call, Dispatcher, Verb};
use serde_json::{json, Value};

struct FakeCloud {
    name: String,
    pki_dir: std::path::PathBuf,
    ca: Ca,
    next: AtomicU64,
    /// While closed, create_node blocks (keeps the manager in PROLOGUE/ADAPTING).
    gate: tokio::sync::Semaphore,
    dead: AtomicU32,
    nodes: Mutex<BTreeMap<String, (ServiceNode, tokio::task::JoinHandle<()>)>>,
    deleted: Mutex<Vec<String>>,
    scripts: Mutex<Vec<Option<String>>>,
}

#[async_trait]
impl Cloud for FakeCloud {
    fn cloud_name(&self) -> &str {
        &self.name
    }
    fn cloud_type(&self) -> &str {
        "fake"
    }
    async fn create_node(&self, req: NodeRequest) -> anyhow::Result<ServiceNode> {
        self.gate.acquire().await?.forget();
        self.scripts
            .lock()
            .unwrap()
            .push(req.vars.startup_script.clone());
        let vmid = self.next.fetch_add(1, Ordering::SeqCst).to_string();
        let dead = self
            .dead
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        let task = if dead {
            // accepts TCP, never answers
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = l.accept().await {
                    held.push(s);
                }
            })
        } else {
            let dir = self.pki_dir.join(format!("node{vmid}"));
            std::fs::create_dir_all(&dir)?;
            let id = pki::Identity {
                role: Role::Agent,
                uid: req.vars.user_id,
                app: req.vars.app_id,
            };
            let (c, k) = self.ca.issue(&id, &vmid, pki::Validity::days(1))?;
            let p = pki::CertPaths::in_dir(&dir);
            std::fs::write(&p.cert, c)?;
            std::fs::write(&p.key, k)?;
            std::fs::write(&p.ca, &self.ca.cert_pem)?;
            std::fs::write(
                dir.join("agent.log"),
                format!("agent started on node {vmid}\n"),
            )?;
            let cfg = AgentConfig {
                service_type: req.vars.service_type.clone(),
                user_id: req.vars.user_id,
                app_id: req.vars.app_id,
                service_id: 1,
                node_id: req.vars.node_id.clone(),
                bind: "127.0.0.1".into(),
                port,
                log_file: dir.join("agent.log"),
                cert_dir: dir.clone(),
                enroll_url: None,
                enroll_token: None,
                string_to_generate: req
                    .vars
                    .replacements
                    .get("STRING")
                    .cloned()
                    .unwrap_or_default(),
            };
            let mut d = Dispatcher::new();
            d.add_service(0, Agent::new(cfg));
            let tls = pki::server_config(
                &p,
                PeerRule::agent_server(req.vars.user_id, req.vars.app_id),
            )?;
            tokio::spawn(runtime::rpc::serve_tls(l, tls, d.router()))
        };
        let node = ServiceNode {
            id: format!("{}{vmid}", self.name),
            name: req.vars.node_id.clone(),
            vmid: vmid.clone(),
            ip: "127.0.0.1".into(),
            private_ip: "127.0.0.1".into(),
            cloud: self.name.clone(),
            role: req.role,
            port,
        };
        self.nodes
            .lock()
            .unwrap()
            .insert(vmid, (node.clone(), task));
        Ok(node)
    }
    async fn delete_node(&self, node: &ServiceNode) -> anyhow::Result<()> {
        let (_, task) = self
            .nodes
            .lock()
            .unwrap()
            .remove(&node.vmid)
            .ok_or_else(|| anyhow::anyhow!("no node"))?;
        task.abort();
        self.deleted.lock().unwrap().push(node.id.clone());
        Ok(())
    }
    async fn list_nodes(&self) -> anyhow::Result<Vec<ServiceNode>> {
        Ok(self
            .nodes
            .lock()
            .unwrap()
            .values()
            .map(|(n, _)| n.clone())
            .collect())
    }
}

struct Fx {
    _pki: Pki,
    cloud: Arc<FakeCloud>,
    /// A second cloud, `other`, in `other_clouds`.
    other: Arc<FakeCloud>,
    d: Dispatcher,
    manager: Arc<Manager>,
}

fn fixture(open_gate: bool, dead: u32, max_retries: u32) -> Fx {
    let pki = Pki::new();
    let mgr = pki.issue("mgr", Role::Manager, 1, 1);
    let fake = |name: &str, dead: u32| {
        Arc::new(FakeCloud {
            name: name.into(),
            pki_dir: pki.dir.path().join(format!("nodes-{name}")),
            ca: Ca::load(&pki.ca_dir()).unwrap(),
            next: AtomicU64::new(1),
            gate: tokio::sync::Semaphore::new(if open_gate { 1000 } else { 0 }),
            dead: AtomicU32::new(dead),
            nodes: Mutex::new(BTreeMap::new()),
            deleted: Mutex::new(Vec::new()),
            scripts: Mutex::new(Vec::new()),
        })
    };
    let cloud = fake("iaas", dead);
    let other = fake("other", 0);
    let enroller = Arc::new(Enroller::new(
        Ca::load(&pki.ca_dir()).unwrap(),
        Duration::from_secs(60),
        1,
    ));
    let base_vars = NodeVars {
        role: Role::Agent,
        service_type: "helloworld".into(),
        deployment_name: "t".into(),
        user_id: 1,
        app_id: 1,
        service_id: 1,
        node_id: String::new(),
        manager_ip: "127.0.0.1".into(),
        enroll_url: "https://127.0.0.1:1/enroll".into(),
        token: String::new(),
        ca_cert_pem: pki.ca.cert_pem.clone(),
        port: 0,
        replacements: [("STRING".to_string(), "hi-there".to_string())].into(),
        startup_script: None,
    };
    let controller = Arc::new(Controller {
        cloud: cloud.clone(),
        other_clouds: vec![other.clone()],
        config: ConfigTree::locate().unwrap(),
        enroller,
        agent_tls: pki::client_config(
            &mgr,
            PeerRule {
                roles: vec![Role::Agent],
                uid: 1,
                app: Some(1),
            },
        )
        .unwrap(),
        base_vars,
        poll: Duration::from_millis(100),
        boot_timeout: Duration::from_millis(1500),
        max_retries,
        startup_script: Mutex::new(None),
    });
    let manager = Manager::new("helloworld", pki.dir.path().join("manager.log"), controller);
    std::fs::write(pki.dir.path().join("manager.log"), "manager log line\n").unwrap();
    let mut d = Dispatcher::new();
    d.add_service(0, manager.clone());
    Fx {
        _pki: pki,
        cloud,
        other,
        d,
        manager,
    }
}

async fn call(d: &Dispatcher, verb: Verb, method: &str, params: Value) -> Value {
    let call = Call {
        verb,
        service_id: Some(json!(0)),
        method: Some(json!(method)),
        params: params.as_object().cloned().unwrap_or_default(),
        id: Some(json!(1)),
    };
    let r = d.dispatch(call).await;
    let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn err(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}

async fn wait_state(m: &Manager, s: State) {
    wait_for_async(&format!("state {s}"), Duration::from_secs(20), || async {
        m.state() == s
    })
    .await;
}

#[tokio::test]
async fn startup_only_from_init_or_stopped() {
    let fx = fixture(false, 0, 0);
    assert_eq!(fx.manager.state(), State::INIT);
    let v = call(&fx.d, Verb::POST, "startup", json!({})).await;
    assert_eq!(v["result"]["state"], "PROLOGUE");
    // blocked in PROLOGUE: nothing else may start
    let v = call(&fx.d, Verb::POST, "startup", json!({})).await;
    assert_eq!(
        err(&v),
        "Wrong state to startup: service is PROLOGUE (must be INIT or STOPPED)"
    );
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert!(err(&v).starts_with("Wrong state to add_nodes: service is PROLOGUE"));
    let v = call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert!(err(&v).starts_with("Wrong state to remove_nodes: service is PROLOGUE"));
    let v = call(&fx.d, Verb::GET, "get_helloworld", json!({})).await;
    assert!(err(&v).starts_with("Wrong state to get_helloworld"));
    fx.cloud.gate.add_permits(100);
    wait_state(&fx.manager, State::RUNNING).await;
    let v = call(&fx.d, Verb::POST, "startup", json!({})).await;
    assert_eq!(
        err(&v),
        "Wrong state to startup: service is RUNNING (must be INIT or STOPPED)"
    );
    // stop, then start again from STOPPED
    assert_eq!(
        call(&fx.d, Verb::POST, "stop", json!({})).await["result"]["state"],
        "EPILOGUE"
    );
    wait_state(&fx.manager, State::STOPPED).await;
    assert_eq!(
        fx.cloud.list_nodes().await.unwrap().len(),
        0,
        "stop deletes every node"
    );
    assert_eq!(
        call(&fx.d, Verb::POST, "startup", json!({})).await["result"]["state"],
        "PROLOGUE"
    );
    wait_state(&fx.manager, State::RUNNING).await;
    let states: Vec<String> = call(&fx.d, Verb::GET, "get_service_history", json!({})).await
        ["result"]["state_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["time"].as_f64().unwrap() > 0.0 && e["reason"].is_string());
            e["state"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        states,
        ["INIT", "PROLOGUE", "RUNNING", "EPILOGUE", "STOPPED", "PROLOGUE", "RUNNING"]
    );
}

#[tokio::test]
async fn node_changes_only_in_running() {
    let fx = fixture(true, 0, 0);
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert_eq!(
        err(&v),
        "Wrong state to add_nodes: service is INIT (must be RUNNING)"
    );
    let v = call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert_eq!(
        err(&v),
        "Wrong state to remove_nodes: service is INIT (must be RUNNING)"
    );
    assert_eq!(
        call(&fx.d, Verb::GET, "list_nodes", json!({})).await["result"],
        json!({})
    );
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    // ADAPTING while nodes are being added: further changes refused
    fx.cloud.gate.forget_permits(10_000);
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 2}}),
    )
    .await;
    assert_eq!(v["result"]["state"], "ADAPTING");
    assert_eq!(fx.manager.state(), State::ADAPTING);
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert_eq!(
        err(&v),
        "Wrong state to add_nodes: service is ADAPTING (must be RUNNING)"
    );
    let v = call(&fx.d, Verb::POST, "remove_nodes", json!({"count": 1})).await;
    assert!(err(&v).starts_with("Missing the mandatory parameter 'nodes'"));
    fx.cloud.gate.add_permits(100);
    wait_state(&fx.manager, State::RUNNING).await;
    let ids = call(&fx.d, Verb::GET, "list_nodes", json!({})).await["result"]["helloworld"].clone();
    assert_eq!(ids, json!(["iaas1", "iaas2", "iaas3"]));
    // helloworld: one line per agent
    let v = call(&fx.d, Verb::GET, "get_helloworld", json!({})).await;
    assert_eq!(
        v["result"]["helloworld"],
        "Received hi-there from iaas1\nReceived hi-there from iaas2\nReceived hi-there from iaas3"
    );
    let v = call(
        &fx.d,
        Verb::GET,
        "get_node_info",
        json!({"serviceNodeId": "iaas2"}),
    )
    .await;
    assert_eq!(v["result"]["serviceNode"]["id"], "iaas2");
    assert_eq!(v["result"]["serviceNode"]["vmid"], "2");
    let v = call(
        &fx.d,
        Verb::GET,
        "get_node_info",
        json!({"serviceNodeId": "iaas9"}),
    )
    .await;
    assert_eq!(err(&v), "Invalid node id 'iaas9'");
    let v = call(
        &fx.d,
        Verb::GET,
        "get_agent_log",
        json!({"agentId": "iaas1"}),
    )
    .await;
    assert!(
        v["result"]["log"]
            .as_str()
            .unwrap()
            .contains("agent started on node 1"),
        "{v}"
    );
}

#[tokio::test]
async fn removing_all_nodes_is_refused() {
    let fx = fixture(true, 0, 0);
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    let v = call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    assert_eq!(
        err(&v),
        "Requesting to delete 1 nodes while none can be removed"
    );
    call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"count": 2}}),
    )
    .await;
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(fx.manager.nodes().len(), 3);
    let v = call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 3}}),
    )
    .await;
    assert_eq!(
        err(&v),
        "Requesting to delete 3 nodes while only 2 can be removed"
    );
    assert_eq!(
        fx.manager.state(),
        State::RUNNING,
        "a refused call changes nothing"
    );
    let v = call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 2}}),
    )
    .await;
    assert_eq!(v["result"]["state"], "ADAPTING");
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(fx.manager.nodes().len(), 1);
    assert_eq!(
        *fx.cloud.deleted.lock().unwrap(),
        ["iaas2", "iaas3"],
        "the last nodes go"
    );
}

#[tokio::test]
async fn node_role_checks() {
    let fx = fixture(true, 0, 0);
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    for (nodes, msg) in [
        (json!({"web": 1}), "Unknown role 'web' (roles: node)"),
        (
            json!({"node": 0}),
            "The number of nodes must be greater than 0.",
        ),
        (
            json!({"node": -1}),
            "Role 'node': negative number of nodes -1.",
        ),
        (json!({"node": "x"}), "Role 'node': 'x' is not an integer."),
    ] {
        let v = call(&fx.d, Verb::POST, "add_nodes", json!({"nodes": nodes})).await;
        assert_eq!(err(&v), msg);
    }
    let v = call(&fx.d, Verb::POST, "add_nodes", json!({"nodes": 3})).await;
    assert_eq!(err(&v), "Parameter 'nodes': 3 is not a dict.");
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}, "extra": 1}),
    )
    .await;
    assert_eq!(err(&v), "Unexpected parameters: {\"extra\":1}.");
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}, "cloud": "mars"}),
    )
    .await;
    // An unknown cloud is refused before the state changes.
    assert_eq!(err(&v), "Unknown cloud 'mars' (clouds: iaas, other)");
    assert_eq!(fx.manager.state(), State::RUNNING);
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}, "cloud": "iaas"}),
    )
    .await;
    assert_eq!(
        v["result"]["state"], "ADAPTING",
        "the default cloud by name"
    );
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(fx.manager.nodes().len(), 2);
    let v = call(&fx.d, Verb::GET, "get_log", json!({})).await;
    assert_eq!(v["result"]["log"], "manager log line\n");
    let v = call(
        &fx.d,
        Verb::GET,
        "get_log",
        json!({"filename": "/etc/passwd"}),
    )
    .await;
    assert!(
        err(&v).starts_with("Unexpected parameters"),
        "no path argument"
    );
}

#[tokio::test]
async fn dead_node_is_replaced_and_deleted() {
    let fx = fixture(true, 1, 2);
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(
        *fx.cloud.deleted.lock().unwrap(),
        ["iaas1"],
        "the dead node was deleted"
    );
    let ids: Vec<String> = fx.manager.nodes().iter().map(|n| n.id.clone()).collect();
    assert_eq!(ids, ["iaas2"], "replaced by a fresh node");
    assert_eq!(fx.cloud.list_nodes().await.unwrap().len(), 1);
}

#[tokio::test]
async fn retries_are_bounded() {
    let fx = fixture(true, 5, 1);
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::ERROR).await;
    assert_eq!(
        fx.cloud.deleted.lock().unwrap().len(),
        2,
        "one try + one retry, both deleted"
    );
    assert!(fx.cloud.list_nodes().await.unwrap().is_empty());
    let log = call(&fx.d, Verb::GET, "get_service_history", json!({})).await;
    let last = log["result"]["state_log"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("only 0 of 1 node(s) started (2 never answered"),
        "{last}"
    );
}

#[tokio::test]
async fn uploaded_startup_script_reaches_new_nodes() {
    let fx = fixture(true, 0, 0);
    let v = call(&fx.d, Verb::GET, "get_startup_script", json!({})).await;
    assert_eq!(err(&v), "No startup script");
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    // UPLOAD only
    let v = call(&fx.d, Verb::POST, "upload_startup_script", json!({})).await;
    assert_eq!(err(&v), "Method not found");
    let v = call(
        &fx.d,
        Verb::UPLOAD,
        "upload_startup_script",
        json!({"script": "not a file"}),
    )
    .await;
    assert_eq!(err(&v), "Parameter 'script': is not an uploaded file.");
    let script = json!({"filename": "startup.sh", "content": "echo from-user"});
    let v = call(
        &fx.d,
        Verb::UPLOAD,
        "upload_startup_script",
        json!({"script": script}),
    )
    .await;
    assert_eq!(v["result"], json!({"filename": "startup.sh"}));
    assert_eq!(
        call(&fx.d, Verb::GET, "get_startup_script", json!({})).await["result"],
        "echo from-user"
    );
    call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(
        *fx.cloud.scripts.lock().unwrap(),
        [None, Some("echo from-user".to_string())]
    );
}

#[tokio::test]
async fn stop_during_startup_wins() {
    let fx = fixture(false, 0, 0);
    call(&fx.d, Verb::POST, "startup", json!({})).await;
    assert_eq!(fx.manager.state(), State::PROLOGUE);
    assert_eq!(
        call(&fx.d, Verb::POST, "stop", json!({})).await["result"]["state"],
        "EPILOGUE"
    );
    let v = call(&fx.d, Verb::POST, "stop", json!({})).await;
    assert!(err(&v).starts_with("Wrong state to stop: service is EPILOGUE"));
    fx.cloud.gate.add_permits(100);
    wait_state(&fx.manager, State::STOPPED).await;
    assert!(
        fx.cloud.list_nodes().await.unwrap().is_empty(),
        "the node started meanwhile is deleted"
    );
    let states: Vec<String> = call(&fx.d, Verb::GET, "get_service_history", json!({})).await
        ["result"]["state_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["INIT", "PROLOGUE", "EPILOGUE", "STOPPED"]);
}

#[tokio::test]
async fn nodes_go_to_the_named_cloud_and_are_deleted_there() {
    let fx = fixture(true, 0, 0);
    call(&fx.d, Verb::POST, "startup", json!({"cloud": "other"})).await;
    wait_state(&fx.manager, State::RUNNING).await;
    let v = call(
        &fx.d,
        Verb::POST,
        "add_nodes",
        json!({"nodes": {"node": 2}, "cloud": "default"}),
    )
    .await;
    assert_eq!(v["result"]["state"], "ADAPTING");
    wait_state(&fx.manager, State::RUNNING).await;
    let v = call(&fx.d, Verb::GET, "list_nodes", json!({})).await;
    assert_eq!(
        v["result"],
        json!({"helloworld": ["other1", "iaas1", "iaas2"]}),
        "node ids carry their cloud's name"
    );
    let v = call(
        &fx.d,
        Verb::GET,
        "get_node_info",
        json!({"serviceNodeId": "other1"}),
    )
    .await;
    assert_eq!(v["result"]["serviceNode"]["cloud"], "other");
    // remove_nodes takes the newest (iaas2); stop deletes the rest, each in its own cloud.
    call(
        &fx.d,
        Verb::POST,
        "remove_nodes",
        json!({"nodes": {"node": 1}}),
    )
    .await;
    wait_state(&fx.manager, State::RUNNING).await;
    assert_eq!(*fx.cloud.deleted.lock().unwrap(), ["iaas2"]);
    call(&fx.d, Verb::POST, "stop", json!({})).await;
    wait_state(&fx.manager, State::STOPPED).await;
    assert_eq!(*fx.cloud.deleted.lock().unwrap(), ["iaas2", "iaas1"]);
    assert_eq!(*fx.other.deleted.lock().unwrap(), ["other1"]);
    assert!(fx.other.list_nodes().await.unwrap().is_empty());
}
