//! The `ec2` driver against a real `moto_server` on 127.0.0.1: the driver directly (user-data,
//! tags, addresses, termination, orphans), then a manager with a local default cloud and an
//! ec2 cloud (orphans reaped at start, `add_nodes` picking the cloud by name). Instances in
//! moto never boot, so the ec2 node's readiness wait fails: that part checks what reached
//! EC2 and that the controller terminated the node again.
#![cfg(feature = "clouds")]

mod common;

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    Filter, Instance, InstanceStateName, ResourceType, Tag, TagSpecification,
};
use base64::Engine;
use emulators::Moto;
use runtime::cloud::{Cloud, NodeRequest, Owner};
use runtime::cloudcfg::{load_cloud, CloudSettings};
use runtime::context::{ConfigTree, NodeVars};
use runtime::ec2::Ec2Cloud;
use runtime::pki::{PeerRule, Role};
use serde_json::json;

const MANAGER_ID: &str = "moto-u1-a1-s1";

fn vars(token: &str) -> NodeVars {
    NodeVars {
        role: Role::Agent,
        service_type: "helloworld".into(),
        deployment_name: "moto".into(),
        user_id: 1,
        app_id: 1,
        service_id: 1,
        node_id: "moto-u1-a1-s1-helloworld-00c0ffee".into(),
        manager_ip: "192.0.2.10".into(),
        enroll_url: "https://192.0.2.10:4443/enroll".into(),
        token: token.into(),
        ca_cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        port: 5555,
        replacements: [("STRING".to_string(), "hi".to_string())].into(),
        startup_script: None,
    }
}

/// An EC2 client on `moto` (region us-east-1, test credentials).
async fn ec2_client(moto: &Moto) -> aws_sdk_ec2::Client {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&moto.url)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&conf)
}

/// An AMI moto knows, and the key pair `conpaas`.
async fn prepare(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.create_key_pair()
        .key_name("conpaas")
        .send()
        .await
        .expect("CreateKeyPair");
    let images = ec2.describe_images().send().await.expect("DescribeImages");
    images.images()[0].image_id().unwrap().to_string()
}

/// A cloud cfg with the original's keys (USER/PASSWORD access keys, IMAGE_ID, SIZE_ID,
/// SECURITY_GROUP_NAME, KEY_NAME, REGION in the endpoint-host form) plus ENDPOINT.
fn write_cfg(dir: &std::path::Path, moto: &Moto, ami: &str, extra: &str) -> std::path::PathBuf {
    let p = dir.join("ec2.cfg");
    std::fs::write(
        &p,
        format!(
            "[iaas]\nDRIVER = EC2\nUSER = testing\nPASSWORD = testing\nIMAGE_ID = {ami}\n\
             SIZE_ID = t2.micro\nSECURITY_GROUP_NAME = default\nKEY_NAME = conpaas\n\
             REGION = ec2.us-east-1.amazonaws.com\nENDPOINT = {}\nPOLL_INTERVAL = 0.1\n\
             ADDRESS_TIMEOUT = 30\n{extra}",
            moto.url
        ),
    )
    .unwrap();
    p
}

/// Starts an instance out of band with the given manager and cloud tags.
async fn run_tagged(ec2: &aws_sdk_ec2::Client, ami: &str, manager: &str, cloud: &str) -> String {
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let r = ec2
        .run_instances()
        .image_id(ami)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(tag("cps-manager", manager))
                .tags(tag("cps-cloud", cloud))
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    r.instances()[0].instance_id().unwrap().to_string()
}

async fn instance(ec2: &aws_sdk_ec2::Client, id: &str) -> Instance {
    let r = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .expect("DescribeInstances");
    r.reservations()[0].instances()[0].clone()
}

fn state(i: &Instance) -> InstanceStateName {
    i.state().and_then(|s| s.name()).cloned().unwrap()
}

fn gone(i: &Instance) -> bool {
    matches!(
        state(i),
        InstanceStateName::Terminated | InstanceStateName::ShuttingDown
    )
}

fn tag<'a>(i: &'a Instance, k: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(k))
        .and_then(|t| t.value())
}

async fn user_data(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let r = ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("DescribeInstanceAttribute userData");
    let b64 = r.user_data().and_then(|u| u.value()).expect("user data");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 user data");
    String::from_utf8(raw).expect("plain (not gzipped) script")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_driver_in_moto() {
    let t0 = Instant::now();
    let Some(moto) = Moto::start().await else {
        return;
    };
    let ec2 = ec2_client(&moto).await;
    let ami = prepare(&ec2).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = match load_cloud(&write_cfg(dir.path(), &moto, &ami, ""), "aws", None).unwrap() {
        CloudSettings::Ec2(s) => s,
        o => panic!("{o:?}"),
    };
    assert_eq!(settings.region, "us-east-1");
    let owner = Owner {
        manager_id: MANAGER_ID.into(),
        name_prefix: "moto-u1-a1-s1-".into(),
    };
    let cloud = Ec2Cloud::new("aws", settings, owner).await.unwrap();
    let tree = ConfigTree::locate().unwrap();
    let token = "enrol-token-77aa01";
    let node = cloud
        .create_node(NodeRequest {
            vars: vars(token),
            role: "node".into(),
            config: tree.clone(),
        })
        .await
        .expect("create_node");
    assert!(node.vmid.starts_with("i-"), "{node:?}");
    assert_eq!(node.id, format!("aws{}", node.vmid));
    assert!(
        !node.ip.is_empty() && !node.private_ip.is_empty(),
        "{node:?}"
    );
    assert_eq!((node.port, node.cloud.as_str()), (5555, "aws"));

    // What EC2 got: the rendered script (token, no private key), type, AMI, key, tags.
    let i = instance(&ec2, &node.vmid).await;
    assert_eq!(state(&i), InstanceStateName::Running);
    assert_eq!(i.image_id(), Some(ami.as_str()));
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t2.micro"));
    assert_eq!(i.key_name(), Some("conpaas"));
    assert_eq!(node.ip, i.public_ip_address().unwrap());
    let script = user_data(&ec2, &node.vmid).await;
    assert_eq!(script, tree.render_script(&vars(token), "ec2").unwrap());
    assert!(script.contains(&format!("--token '{token}'")));
    assert!(!script.contains("PRIVATE KEY"));
    for (k, v) in [
        ("Name", "moto-u1-a1-s1-helloworld-00c0ffee"),
        ("cps-manager", MANAGER_ID),
        ("cps-cloud", "aws"),
        ("cps-node", "moto-u1-a1-s1-helloworld-00c0ffee"),
        ("cps-role", "node"),
        ("cps-user", "1"),
        ("cps-app", "1"),
        ("cps-service", "1"),
    ] {
        assert_eq!(tag(&i, k), Some(v), "tag {k}");
    }

    // Orphans: an instance of this manager and cloud started out of band is terminated;
    // another manager's and another cloud's are not; the known node stays.
    let orphan = run_tagged(&ec2, &ami, MANAGER_ID, "aws").await;
    let foreign = run_tagged(&ec2, &ami, "someone-else", "aws").await;
    let other_cloud = run_tagged(&ec2, &ami, MANAGER_ID, "aws2").await;
    let listed: Vec<String> = cloud
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.vmid)
        .collect();
    let mut want = vec![node.vmid.clone(), orphan.clone()];
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(got, want);
    let reaped = cloud
        .reap_orphans(std::slice::from_ref(&node))
        .await
        .unwrap();
    assert_eq!(reaped, vec![orphan.clone()]);
    assert!(gone(&instance(&ec2, &orphan).await));
    for id in [&foreign, &other_cloud, &node.vmid] {
        assert_eq!(state(&instance(&ec2, id).await), InstanceStateName::Running);
    }
    assert_eq!(cloud.list_nodes().await.unwrap().len(), 1);

    // Delete: terminated.
    cloud.delete_node(&node).await.unwrap();
    assert!(gone(&instance(&ec2, &node.vmid).await));
    assert!(cloud.list_nodes().await.unwrap().is_empty());
    eprintln!("done after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_local_plus_ec2_clouds() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let ec2 = ec2_client(&moto).await;
    let ami = prepare(&ec2).await;
    let pki = common::Pki::new();
    let d = pki.dir.path().to_path_buf();
    let cfg_file = write_cfg(&d, &moto, &ami, "USE_PRIVATE_IP = true\n");
    // Left by an "earlier run" of this manager; and one of somebody else.
    let orphan = run_tagged(&ec2, &ami, MANAGER_ID, "aws").await;
    let foreign = run_tagged(&ec2, &ami, "someone-else", "aws").await;

    let mgr = pki.issue("mgr", Role::Manager, 1, 1);
    let user = pki.issue("user", Role::User, 1, 1);
    let ini = runtime::config::Ini::parse(&format!(
        "[manager]\nUSER_ID = 1\nAPP_ID = 1\nDEPLOYMENT_NAME = moto\nBIND = 127.0.0.1\n\
         PORT = 0\nENROLL_PORT = 0\nLOG_FILE = {d}/manager.log\nCERT_DIR = {m}\n\
         CA_DIR = {ca}\nVAR_RUN = {d}/run\nVAR_CACHE = {d}/cache\nCLOUD = local\n\
         CPS_BIN = {bin}\nPOLL_INTERVAL = 0.2\nBOOT_TIMEOUT = 4\nMAX_RETRIES = 0\n\
         OTHER_CLOUDS = aws\n[aws]\nCLOUD = ec2\nCLOUD_CONFIG = {f}\n",
        d = d.display(),
        m = mgr.cert.parent().unwrap().display(),
        ca = pki.ca_dir().display(),
        bin = env!("CARGO_BIN_EXE_cps"),
        f = cfg_file.display()
    ))
    .unwrap();
    let cfg = runtime::manager::ManagerConfig::from_ini(&ini).unwrap();
    assert_eq!(cfg.manager_id, MANAGER_ID);
    let running = runtime::manager::start(&cfg).await.expect("manager start");
    assert!(
        gone(&instance(&ec2, &orphan).await),
        "orphan reaped at manager start"
    );
    assert_eq!(
        state(&instance(&ec2, &foreign).await),
        InstanceStateName::Running
    );

    let rule = PeerRule {
        roles: vec![Role::Manager],
        uid: 1,
        app: Some(1),
    };
    let c = common::client(&user, rule, running.rpc_addr);
    let state_is = |want: &'static str| {
        let c = &c;
        async move {
            let v = c.get(0, "get_service_info", &json!({})).await.unwrap();
            v["state"] == want
        }
    };
    c.post(0, "startup", &json!({})).await.unwrap();
    common::wait_for_async("RUNNING", Duration::from_secs(30), || state_is("RUNNING")).await;
    let nodes = c.get(0, "list_nodes", &json!({})).await.unwrap();
    assert_eq!(
        nodes,
        json!({"helloworld": ["iaas1"]}),
        "default cloud: local"
    );

    let e = c
        .post(
            0,
            "add_nodes",
            &json!({"nodes": {"node": 1}, "cloud": "nosuch"}),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Unknown cloud 'nosuch' (clouds: iaas, aws)"),
        "{e}"
    );
    assert!(state_is("RUNNING").await);

    // cloud=aws: the node is created in EC2 (moto), never answers, and is terminated again.
    c.post(
        0,
        "add_nodes",
        &json!({"nodes": {"node": 1}, "cloud": "aws"}),
    )
    .await
    .unwrap();
    common::wait_for_async("add_nodes to finish", Duration::from_secs(60), || async {
        !state_is("ADAPTING").await
    })
    .await;
    assert!(state_is("ERROR").await);
    let hist = c.get(0, "get_service_history", &json!({})).await.unwrap();
    let last = hist["state_log"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("only 0 of 1 node(s) started (1 never answered"),
        "{last}"
    );
    let r = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:cps-manager")
                .values(MANAGER_ID)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mine: Vec<Instance> = r
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.instance_id() != Some(orphan.as_str()))
        .cloned()
        .collect();
    assert_eq!(mine.len(), 1, "one instance for the aws node: {mine:?}");
    let i = &mine[0];
    assert!(gone(i), "the node that never answered was terminated");
    assert_eq!(tag(i, "cps-cloud"), Some("aws"));
    let node_name = tag(i, "cps-node").unwrap().to_string();
    assert!(node_name.starts_with("moto-u1-a1-s1-helloworld-"));
    let script = user_data(&ec2, i.instance_id().unwrap()).await;
    let enroll = format!("https://127.0.0.1:{}/enroll", running.enroll_addr.port());
    assert!(script.contains(&enroll), "enrolment URL of this manager");
    assert!(script.contains("--token '") && !script.contains("PRIVATE KEY"));
    assert!(script.contains(&format!("--node-id '{node_name}'")) || script.contains(&node_name));

    running.manager.shutdown().await;
    for l in &running.local_clouds {
        l.kill_all();
    }
}
