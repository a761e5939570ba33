//! Mutual TLS: who may talk to a manager and to an agent.

mod common;

use common::*;
use runtime::client::RpcClient;
use runtime::pki::{self, Ca, CertPaths, PeerRule, Role, Validity};
use runtime::rpc::{Dispatcher, Methods, Verb};
use serde_json::json;
use time::{Duration, OffsetDateTime};

fn dispatcher() -> Dispatcher {
    let mut m = Methods::default();
    m.expose(Verb::GET, "check_process", |_p| async { Ok(json!({})) });
    let mut d = Dispatcher::new();
    d.add_methods(0, m);
    d
}

/// A client that only checks the server's CA signature (to test the server side alone).
fn any_server() -> PeerRule {
    PeerRule {
        roles: vec![Role::Manager, Role::Agent, Role::User],
        uid: 1,
        app: None,
    }
}

async fn call(paths: &CertPaths, addr: std::net::SocketAddr) -> Result<serde_json::Value, String> {
    let c = client(
        paths,
        PeerRule {
            uid: uid_of(paths),
            ..any_server()
        },
        addr,
    );
    c.get(0, "check_process", &json!({}))
        .await
        .map_err(|e| e.to_string())
}

fn uid_of(p: &CertPaths) -> u64 {
    p.identity().unwrap().uid
}

#[tokio::test]
async fn manager_accepts_only_its_users_and_managers() {
    let pki = Pki::new();
    let server = pki.issue("mgr", Role::Manager, 1, 1);
    let addr = serve(dispatcher(), &server, PeerRule::manager_server(1, 1)).await;

    // accepted
    for (name, role, app) in [
        ("u", Role::User, 1),
        ("u0", Role::User, 0),
        ("m", Role::Manager, 1),
    ] {
        let p = pki.issue(name, role, 1, app);
        assert_eq!(call(&p, addr).await.unwrap(), json!({}), "{name}");
    }
    // refused: wrong role, other user, other application
    for (name, role, uid, app) in [
        ("agent", Role::Agent, 1, 1),
        ("other-user", Role::User, 2, 1),
        ("other-user-mgr", Role::Manager, 2, 1),
        ("other-app-user", Role::User, 1, 2),
        ("other-app-mgr", Role::Manager, 1, 2),
    ] {
        let p = pki.issue(name, role, uid, app);
        let c = client(&p, any_server(), addr);
        assert!(
            c.get(0, "check_process", &json!({})).await.is_err(),
            "{name} must be refused"
        );
    }
}

#[tokio::test]
async fn agent_accepts_managers_and_agents_of_same_user_and_app() {
    let pki = Pki::new();
    let server = pki.issue("agent", Role::Agent, 4, 9);
    let addr = serve(dispatcher(), &server, PeerRule::agent_server(4, 9)).await;
    let rule = PeerRule {
        roles: vec![Role::Agent],
        uid: 4,
        app: Some(9),
    };
    for (name, role) in [("m", Role::Manager), ("a", Role::Agent)] {
        let p = pki.issue(name, role, 4, 9);
        assert!(
            client(&p, rule.clone(), addr)
                .get(0, "check_process", &json!({}))
                .await
                .is_ok(),
            "{name}"
        );
    }
    for (name, role, uid, app) in [
        ("user", Role::User, 4, 9),
        ("m-other-app", Role::Manager, 4, 8),
        ("m-other-user", Role::Manager, 5, 9),
        ("a-other-app", Role::Agent, 4, 10),
    ] {
        let p = pki.issue(name, role, uid, app);
        let c = client(
            &p,
            PeerRule {
                uid,
                ..rule.clone()
            },
            addr,
        );
        assert!(
            c.get(0, "check_process", &json!({})).await.is_err(),
            "{name} must be refused"
        );
    }
}

#[tokio::test]
async fn no_cert_foreign_ca_and_expired_are_refused() {
    let pki = Pki::new();
    let server = pki.issue("mgr", Role::Manager, 1, 1);
    let addr = serve(dispatcher(), &server, PeerRule::manager_server(1, 1)).await;

    // no client certificate
    let anon = pki::anonymous_client_config(pki.ca.cert_pem.as_bytes(), None).unwrap();
    let c = RpcClient::new(anon, addr.to_string());
    assert!(
        c.get(0, "check_process", &json!({})).await.is_err(),
        "no client cert"
    );
    let r = c
        .raw(
            "GET",
            "/?service_id=0&method=check_process&id=1",
            &[("content-type", "application/json")],
            "",
        )
        .await;
    assert!(
        r.is_err(),
        "no application data without a client cert: {r:?}"
    );

    // a certificate of another CA with the right identity fields
    let other = Ca::generate("evil CA", 30).unwrap();
    let p = pki.issue_with("foreign", &other, Role::User, 1, 1, Validity::days(1));
    assert!(call(&p, addr).await.is_err(), "foreign CA");

    // a certificate whose subject CN is "CA" gets no bypass
    let p = pki.issue_with("CA", &other, Role::User, 1, 1, Validity::days(1));
    assert!(call(&p, addr).await.is_err(), "CN=CA");

    // expired
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let p = pki.issue_with("expired", &pki.ca, Role::User, 1, 1, expired);
    assert!(call(&p, addr).await.is_err(), "expired");
    // not yet valid
    let future = Validity {
        not_before: now + Duration::days(1),
        not_after: now + Duration::days(10),
    };
    let p = pki.issue_with("future", &pki.ca, Role::User, 1, 1, future);
    assert!(call(&p, addr).await.is_err(), "not yet valid");

    // and a valid one still works
    let p = pki.issue("ok", Role::User, 1, 1);
    assert!(call(&p, addr).await.is_ok());
}

#[tokio::test]
async fn clients_check_the_server_too() {
    let pki = Pki::new();
    // an agent certificate pretending to be the manager
    let server = pki.issue("agent-as-mgr", Role::Agent, 1, 1);
    let addr = serve(dispatcher(), &server, PeerRule::manager_server(1, 1)).await;
    let user = pki.issue("u", Role::User, 1, 1);
    let wants_manager = PeerRule {
        roles: vec![Role::Manager],
        uid: 1,
        app: Some(1),
    };
    assert!(client(&user, wants_manager, addr)
        .get(0, "check_process", &json!({}))
        .await
        .is_err());

    // a manager of another user
    let server = pki.issue("mgr2", Role::Manager, 2, 1);
    let addr = serve(dispatcher(), &server, PeerRule::manager_server(1, 1)).await;
    let wants_manager = PeerRule {
        roles: vec![Role::Manager],
        uid: 1,
        app: Some(1),
    };
    assert!(client(&user, wants_manager, addr)
        .get(0, "check_process", &json!({}))
        .await
        .is_err());
}
