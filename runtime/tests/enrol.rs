//! The enrolment endpoint over TLS: single-use tokens bound to a node, node-generated keys.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use runtime::enrol::{enroll, Enroller};
use runtime::pki::{self, Ca, CertPaths, Identity, PeerRule, Role};

async fn serve_enrol(pki: &Pki, mgr: &CertPaths) -> (Arc<Enroller>, String) {
    let e = Arc::new(Enroller::new(
        Ca::load(&pki.ca_dir()).unwrap(),
        Duration::from_secs(60),
        1,
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/enroll",
        l.local_addr().unwrap().port()
    );
    tokio::spawn(runtime::rpc::serve_tls(
        l,
        pki::enrol_server_config(mgr).unwrap(),
        e.clone().router(),
    ));
    (e, url)
}

#[tokio::test]
async fn token_flow() {
    let pki = Pki::new();
    let mgr = pki.issue("mgr", Role::Manager, 5, 6);
    let (e, url) = serve_enrol(&pki, &mgr).await;
    let ca = pki.ca.cert_pem.as_bytes();
    let id = Identity {
        role: Role::Agent,
        uid: 5,
        app: 6,
    };

    let token = e.mint("node-a", id.clone());
    let out = pki.dir.path().join("node-a");
    // wrong node name: refused, and the token is burnt
    let err = enroll(&url, &token, "node-b", ca, &out)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not issued for node"), "{err}");
    let err = enroll(&url, &token, "node-a", ca, &out)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown or already used token"), "{err}");
    assert!(!out.join("key.pem").exists());

    let token = e.mint("node-a", id.clone());
    assert_eq!(enroll(&url, &token, "node-a", ca, &out).await.unwrap(), id);
    let paths = CertPaths::in_dir(&out);
    assert_eq!(paths.identity().unwrap(), id);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&paths.key).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key readable by its owner only");
    // single use
    let err = enroll(&url, &token, "node-a", ca, &pki.dir.path().join("again"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown or already used token"), "{err}");
    let err = enroll(&url, "nonsense", "node-a", ca, &pki.dir.path().join("x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 403"), "{err}");

    // the enrolled certificate is accepted by an agent of the same application
    let agent = pki.issue("agent", Role::Agent, 5, 6);
    let mut m = runtime::rpc::Methods::default();
    m.expose(runtime::rpc::Verb::GET, "check_process", |_p| async {
        Ok(serde_json::json!({}))
    });
    let mut d = runtime::rpc::Dispatcher::new();
    d.add_methods(0, m);
    let addr = serve(d, &agent, PeerRule::agent_server(5, 6)).await;
    let c = client(
        &paths,
        PeerRule {
            roles: vec![Role::Agent],
            uid: 5,
            app: Some(6),
        },
        addr,
    );
    assert!(c
        .get(0, "check_process", &serde_json::json!({}))
        .await
        .is_ok());
}

#[tokio::test]
async fn node_authenticates_the_enrolment_server() {
    let pki = Pki::new();
    let mgr = pki.issue("mgr", Role::Manager, 1, 1);
    let (e, url) = serve_enrol(&pki, &mgr).await;
    let token = e.mint(
        "n",
        Identity {
            role: Role::Agent,
            uid: 1,
            app: 1,
        },
    );
    // the node was given another CA: it must not send its CSR/token to this server
    let other = Ca::generate("other", 1).unwrap();
    let err = enroll(
        &url,
        &token,
        "n",
        other.cert_pem.as_bytes(),
        &pki.dir.path().join("n"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // plain http is refused outright
    assert!(enroll(
        "http://127.0.0.1:1/enroll",
        &token,
        "n",
        pki.ca.cert_pem.as_bytes(),
        &pki.dir.path().join("n")
    )
    .await
    .is_err());
}
