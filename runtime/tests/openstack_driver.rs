//! The `openstack` driver against a real Keystone (password auth, token, service catalog)
//! whose `compute` endpoint points at the recorded Nova fixtures of `fixtures/nova/`
//! (see its README: Nova itself cannot run here).
#![cfg(feature = "clouds")]

mod nova;

use std::time::{Duration, Instant};

use base64::Engine;
use emulators::Keystone;
use nova::NovaFixtures;
use runtime::cloud::{Cloud, NodeRequest, Owner};
use runtime::cloudcfg::{load_cloud, CloudSettings};
use runtime::context::{ConfigTree, NodeVars};
use runtime::openstack::OpenStackCloud;
use runtime::pki::Role;
use serde_json::json;

const CREATED: &str = "4f0a6b52-3d5e-4c1a-9b7e-2f8c1d0e6a11";
const ORPHAN: &str = "5b2e9c70-81d4-4e3f-a6b2-0c9d8e7f6a22";
const OTHER: &str = "7c3d1e44-2b6a-4f8e-9d0c-1a2b3c4d5e33";

fn vars(token: &str) -> NodeVars {
    NodeVars {
        role: Role::Agent,
        service_type: "helloworld".into(),
        deployment_name: "fixture".into(),
        user_id: 1,
        app_id: 1,
        service_id: 1,
        node_id: "fixture-u1-a1-s1-helloworld-0a1b2c3d".into(),
        manager_ip: "192.0.2.10".into(),
        enroll_url: "https://192.0.2.10:4443/enroll".into(),
        token: token.into(),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        port: 5555,
        replacements: [("STRING".to_string(), "hi".to_string())].into(),
        startup_script: None,
    }
}

fn owner() -> Owner {
    Owner {
        manager_id: "fixture-u1-a1-s1".into(),
        name_prefix: "fixture-u1-a1-s1-".into(),
    }
}

/// A cloud cfg with the original's key names (USER, PASSWORD, IMAGE_ID, SIZE_ID, NETWORK_ID,
/// KEY_NAME, SECURITY_GROUP_NAME) plus AUTH_URL/PROJECT/DOMAIN.
fn write_cfg(dir: &std::path::Path, ks: &Keystone, password: &str) -> std::path::PathBuf {
    let p = dir.join("openstack.cfg");
    std::fs::write(
        &p,
        format!(
            "[iaas]\nDRIVER = OPENSTACK\nAUTH_URL = http://127.0.0.1:{port}\nUSER = cps\n\
             PASSWORD = {password}\nPROJECT = conpaas\nDOMAIN = Default\n\
             IMAGE_ID = 70a599e0-31e7-49b7-b260-868f441e862b\nSIZE_ID = m1.small\n\
             NETWORK_ID = 3cb9bc59-5699-4588-a4b1-b87f96708bc6\nKEY_NAME = conpaas\n\
             SECURITY_GROUP_NAME = default\nPOLL_INTERVAL = 0.05\nADDRESS_TIMEOUT = 20\n",
            port = ks.port
        ),
    )
    .unwrap();
    p
}

fn settings(path: &std::path::Path) -> runtime::cloudcfg::OpenStackSettings {
    match load_cloud(path, "stack", None).unwrap() {
        CloudSettings::OpenStack(s) => s,
        o => panic!("not openstack: {o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_driver_keystone_and_nova_fixtures() {
    let t0 = Instant::now();
    let Some(ks) = Keystone::start().await else {
        return;
    };
    let nova = NovaFixtures::start().await;
    ks.add_project_user("conpaas", "cps", "cps-pw", "member")
        .await;
    ks.add_service("compute", "nova", &nova.url, &["public"])
        .await;
    eprintln!("keystone ready after {:?}", t0.elapsed());
    let dir = tempfile::tempdir().unwrap();

    // A wrong password: Keystone's refusal, and Nova never called.
    let bad = OpenStackCloud::new(
        "stack",
        settings(&write_cfg(dir.path(), &ks, "nope")),
        owner(),
    )
    .unwrap();
    let e = bad.list_nodes().await.unwrap_err().to_string();
    assert!(
        e.contains("Keystone refused user cps") && e.contains("401"),
        "{e}"
    );
    assert!(nova.seen().is_empty());

    let cloud = OpenStackCloud::new(
        "stack",
        settings(&write_cfg(dir.path(), &ks, "cps-pw")),
        owner(),
    )
    .unwrap();
    let tree = ConfigTree::locate().unwrap();
    let token = "enrol-token-5f1c9a";
    let req = NodeRequest {
        vars: vars(token),
        role: "node".into(),
        config: tree.clone(),
    };
    let node = cloud.create_node(req).await.expect("create_node");
    assert_eq!(node.vmid, CREATED);
    assert_eq!(node.id, format!("stack{CREATED}"));
    assert_eq!(node.ip, "172.24.4.9", "floating address first");
    assert_eq!(node.private_ip, "10.0.0.5");
    assert_eq!((node.port, node.cloud.as_str()), (5555, "stack"));
    assert_eq!(node.name, "fixture-u1-a1-s1-helloworld-0a1b2c3d");

    let seen = nova.seen();
    let calls: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        calls,
        [
            "GET /v2.1/flavors",
            "POST /v2.1/servers",
            &format!("GET /v2.1/servers/{CREATED}"),
            &format!("GET /v2.1/servers/{CREATED}"),
        ],
        "flavor lookup, create, then polled until ACTIVE"
    );
    // The token the driver sent is a real Keystone token of user cps.
    let tok = seen[1].token.clone().expect("X-Auth-Token");
    assert!(
        ks.token_valid(&tok).await,
        "Keystone accepts the driver's token"
    );
    assert!(seen
        .iter()
        .all(|s| s.token.as_deref() == Some(tok.as_str())));

    // The create request body.
    let server = &seen[1].body["server"];
    assert_eq!(server["name"], "fixture-u1-a1-s1-helloworld-0a1b2c3d");
    assert_eq!(
        server["flavorRef"], "2",
        "SIZE_ID m1.small resolved to its id"
    );
    assert_eq!(server["imageRef"], "70a599e0-31e7-49b7-b260-868f441e862b");
    assert_eq!(
        server["networks"],
        json!([{"uuid": "3cb9bc59-5699-4588-a4b1-b87f96708bc6"}])
    );
    assert_eq!(server["config_drive"], json!(true));
    assert_eq!(server["key_name"], "conpaas");
    assert_eq!(server["security_groups"], json!([{"name": "default"}]));
    assert_eq!(
        server["metadata"],
        json!({"cps-manager": "fixture-u1-a1-s1", "cps-cloud": "stack",
               "cps-node": "fixture-u1-a1-s1-helloworld-0a1b2c3d", "cps-role": "node",
               "cps-user": "1", "cps-app": "1", "cps-service": "1"})
    );
    let ud = base64::engine::general_purpose::STANDARD
        .decode(server["user_data"].as_str().expect("user_data"))
        .expect("user_data is base64");
    let script = String::from_utf8(ud).unwrap();
    assert_eq!(
        script,
        tree.render_script(&vars(token), "openstack").unwrap()
    );
    assert!(script.starts_with("#!/bin/bash"));
    assert!(script.contains(&format!("--token '{token}'")), "{script}");
    assert!(!script.contains("PRIVATE KEY"));

    // list: this manager's servers in this cloud only (not the other manager's).
    let listed = cloud.list_nodes().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|n| n.vmid.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&CREATED) && ids.contains(&ORPHAN) && !ids.contains(&OTHER));
    let q = nova.seen().last().unwrap().query.clone();
    assert_eq!(q, "name=%5Efixture-u1-a1-s1-", "name prefix filter");

    // Orphans: the known node stays, the other manager's server is not touched.
    let reaped = cloud
        .reap_orphans(std::slice::from_ref(&node))
        .await
        .unwrap();
    assert_eq!(reaped, vec![ORPHAN.to_string()]);
    cloud.delete_node(&node).await.unwrap();
    let deletes: Vec<String> = nova
        .seen()
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        deletes,
        [
            format!("/v2.1/servers/{ORPHAN}"),
            format!("/v2.1/servers/{CREATED}")
        ]
    );
    eprintln!("done after {:?}", t0.elapsed());
}

/// The manager builds an openstack cloud from `OTHER_CLOUDS` + `CLOUD_CONFIG` and reaps the
/// fixture's orphan when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_with_openstack_cloud_reaps_orphans_at_start() {
    let Some(ks) = Keystone::start().await else {
        return;
    };
    let nova = NovaFixtures::start().await;
    ks.add_project_user("conpaas", "cps", "cps-pw", "member")
        .await;
    ks.add_service("compute", "nova", &nova.url, &["public"])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg_file = write_cfg(dir.path(), &ks, "cps-pw");
    let d = dir.path();
    let ca = runtime::pki::Ca::generate("test CA", 2).unwrap();
    ca.save(&d.join("ca")).unwrap();
    let (cert, key) = ca
        .issue(
            &runtime::pki::Identity {
                role: Role::Manager,
                uid: 1,
                app: 1,
            },
            "manager",
            runtime::pki::Validity::days(1),
        )
        .unwrap();
    std::fs::create_dir_all(d.join("mgr")).unwrap();
    std::fs::write(d.join("mgr/cert.pem"), cert).unwrap();
    std::fs::write(d.join("mgr/key.pem"), key).unwrap();
    std::fs::write(d.join("mgr/ca_cert.pem"), &ca.cert_pem).unwrap();
    let ini = runtime::config::Ini::parse(&format!(
        "[manager]\nUSER_ID = 1\nAPP_ID = 1\nDEPLOYMENT_NAME = fixture\nBIND = 127.0.0.1\n\
         PORT = 0\nENROLL_PORT = 0\nLOG_FILE = {d}/manager.log\nCERT_DIR = {d}/mgr\n\
         CA_DIR = {d}/ca\nVAR_RUN = {d}/run\nVAR_CACHE = {d}/cache\nCLOUD = local\n\
         OTHER_CLOUDS = stack\n[stack]\nCLOUD_CONFIG = {f}\n",
        d = d.display(),
        f = cfg_file.display()
    ))
    .unwrap();
    let cfg = runtime::manager::ManagerConfig::from_ini(&ini).unwrap();
    assert_eq!(cfg.manager_id, "fixture-u1-a1-s1");
    let t = Instant::now();
    let running = runtime::manager::start(&cfg).await.expect("manager start");
    assert!(t.elapsed() < Duration::from_secs(30));
    let deletes: Vec<String> = nova
        .seen()
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.clone())
        .collect();
    // The manager knows no node yet: every server of it in that cloud is an orphan.
    assert_eq!(
        deletes,
        [
            format!("/v2.1/servers/{CREATED}"),
            format!("/v2.1/servers/{ORPHAN}")
        ]
    );
    assert!(!nova
        .seen()
        .iter()
        .any(|s| s.path.contains(OTHER) && s.method == "DELETE"));
    drop(running);
}
