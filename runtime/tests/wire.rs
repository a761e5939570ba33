//! Wire tests of the RPC rules against a server on 127.0.0.1 over mTLS.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use runtime::args::{is_int, Args};
use runtime::client::{ClientError, RpcClient};
use runtime::expose;
use runtime::pki::{PeerRule, Role};
use runtime::rpc::{Dispatcher, Exposed, Methods, Params, RpcError, RpcResult};
use serde_json::{json, Value};

struct Svc;

impl Svc {
    async fn echo(&self, p: Params) -> RpcResult {
        Ok(Value::Object(p))
    }
    async fn add(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let x = a.req("x", is_int)?;
        let y = a.opt("y", is_int, 1)?;
        a.finish()?;
        Ok(json!(x + y))
    }
    async fn fail(&self, _p: Params) -> RpcResult {
        Err(RpcError::new("it failed"))
    }
    async fn boom(&self, _p: Params) -> RpcResult {
        panic!("secret internal detail")
    }
    async fn slow(&self, _p: Params) -> RpcResult {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(json!("slow done"))
    }
    async fn upload(&self, p: Params) -> RpcResult {
        Ok(Value::Object(p))
    }
}

impl Exposed for Svc {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { GET echo, POST add, GET fail, GET boom, GET slow, UPLOAD upload });
    }
}

struct Fixture {
    _pki: Pki,
    c: RpcClient,
}

async fn fixture() -> Fixture {
    let pki = Pki::new();
    let server = pki.issue("mgr", Role::Manager, 1, 1);
    let user = pki.issue("user", Role::User, 1, 1);
    let mut d = Dispatcher::new();
    d.add_service(0, Arc::new(Svc));
    let mut only_get = Methods::default();
    only_get.expose(runtime::rpc::Verb::GET, "ping", |_p| async {
        Ok(json!("pong"))
    });
    d.add_methods(3, only_get);
    let addr = serve(d, &server, PeerRule::manager_server(1, 1)).await;
    let c = client(
        &user,
        PeerRule {
            roles: vec![Role::Manager],
            uid: 1,
            app: Some(1),
        },
        addr,
    );
    Fixture { _pki: pki, c }
}

const JSON: (&str, &str) = ("content-type", "application/json");

async fn get(c: &RpcClient, q: &str) -> (StatusCode, Value) {
    let r = c.raw("GET", q, &[JSON], "").await.unwrap();
    let v = r.json().unwrap_or(Value::Null);
    (r.status, v)
}

async fn post(c: &RpcClient, body: Value) -> (StatusCode, Value) {
    let r = c.raw("POST", "/", &[JSON], body.to_string()).await.unwrap();
    let v = r.json().unwrap_or(Value::Null);
    (r.status, v)
}

#[tokio::test]
async fn path_content_type_and_verb_rules() {
    let f = fixture().await;
    let r =
        f.c.raw("GET", "/other?service_id=0&method=echo&id=1", &[JSON], "")
            .await
            .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r =
        f.c.raw("GET", "/?service_id=0&method=echo&id=1", &[], "")
            .await
            .unwrap();
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r =
        f.c.raw(
            "GET",
            "/?service_id=0&method=echo&id=1",
            &[("content-type", "text/plain")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r =
        f.c.raw("POST", "/", &[("content-type", "text/plain")], "x")
            .await
            .unwrap();
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for verb in ["PUT", "DELETE", "PATCH"] {
        let r = f.c.raw(verb, "/", &[JSON], "{}").await.unwrap();
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{verb}");
    }
    // all three JSON content types are accepted for GET, with parameters after ';'
    for ct in [
        "application/json-rpc",
        "application/jsonrequest",
        "application/json; charset=utf-8",
    ] {
        let r =
            f.c.raw(
                "GET",
                "/?service_id=0&method=echo&id=1",
                &[("content-type", ct)],
                "",
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{ct}");
    }
}

#[tokio::test]
async fn dispatch_errors() {
    let f = fixture().await;
    let (s, v) = get(&f.c, "/?method=echo&id=1").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Did not specify service"))
    );
    let (s, v) = get(&f.c, "/?service_id=9&method=echo&id=1").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Service not found"))
    );
    let (s, v) = get(&f.c, "/?service_id=abc&method=echo&id=1").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Service not found"))
    );
    // service 3 has no POST methods: not found for that verb
    let (s, v) = post(&f.c, json!({"service_id": 3, "method": "ping", "id": 1})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Service not found"))
    );
    let (s, v) = get(&f.c, "/?service_id=0&id=1").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("Did not specify method"))
    );
    let (s, v) = get(&f.c, "/?service_id=0&method=nope&id=1").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Method not found"))
    );
}

#[tokio::test]
async fn methods_are_callable_only_with_their_verb() {
    let f = fixture().await;
    // add is POST only
    let (s, v) = get(
        &f.c,
        "/?service_id=0&method=add&id=1&params=%7B%22x%22%3A1%7D",
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Method not found"))
    );
    // echo is GET only
    let (s, v) = post(
        &f.c,
        json!({"service_id": 0, "method": "echo", "params": {}, "id": 1}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("Method not found"))
    );
    // upload is UPLOAD only
    let (s, _) = post(&f.c, json!({"service_id": 0, "method": "upload", "id": 1})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn envelopes() {
    let f = fixture().await;
    // GET: params from the query, id echoed (a string, as sent)
    let (s, v) = get(
        &f.c,
        "/?service_id=0&method=echo&id=7&params=%7B%22a%22%3A%5B1%2C2%5D%7D",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"result": {"a": [1, 2]}, "error": null, "id": "7"})
    );
    // last value wins for repeated keys
    let (_, v) = get(&f.c, "/?service_id=0&method=echo&id=1&id=2").await;
    assert_eq!(v["id"], "2");
    // POST envelope, numeric id echoed
    let (s, v) = post(
        &f.c,
        json!({"service_id": 0, "method": "add", "params": {"x": 2, "y": 3}, "id": 42}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"result": 5, "error": null, "id": 42}));
    // handler-reported error: no result key
    let (s, v) = get(&f.c, "/?service_id=0&method=fail&id=3").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"error": "it failed", "id": "3"}));
    // the high-level client maps both
    assert_eq!(
        f.c.post(0, "add", &json!({"x": 1})).await.unwrap(),
        json!(2)
    );
    match f.c.get(0, "fail", &json!({})).await {
        Err(ClientError::Rpc(m)) => assert_eq!(m, "it failed"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn missing_id_is_an_error_answer() {
    let f = fixture().await;
    let (s, v) = get(&f.c, "/?service_id=0&method=echo").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v, json!({"error": "Did not specify id", "id": null}));
    let (s, v) = post(
        &f.c,
        json!({"service_id": 0, "method": "add", "params": {"x": 1}}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "Did not specify id");
}

#[tokio::test]
async fn argument_validation_messages() {
    let f = fixture().await;
    let call = |p: Value| {
        post(
            &f.c,
            json!({"service_id": 0, "method": "add", "params": p, "id": 1}),
        )
    };
    let (_, v) = call(json!({})).await;
    assert_eq!(v["error"], "Missing the mandatory parameter 'x'.");
    let (_, v) = call(json!({"x": "seven"})).await;
    assert_eq!(v["error"], "Parameter 'x': 'seven' is not an integer.");
    let (_, v) = call(json!({"x": [1]})).await;
    assert_eq!(v["error"], "Parameter 'x': [1] is not an integer.");
    let (_, v) = call(json!({"x": 1, "z": true})).await;
    assert_eq!(v["error"], "Unexpected parameters: {\"z\":true}.");
    assert!(v.get("result").is_none());
    let (_, v) = call(json!({"x": "4", "y": "5"})).await;
    assert_eq!(
        v["result"], 9,
        "strings convert as in the original validators"
    );
}

#[tokio::test]
async fn multipart_is_upload() {
    let f = fixture().await;
    let b = "XyZbOuNdArY";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"service_id\"\r\n\r\n0\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"method\"\r\n\r\nupload\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"sid\"\r\n\r\n12\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"script\"; filename=\"startup.sh\"\r\n\
         Content-Type: application/octet-stream\r\n\r\necho hi\r\n--{b}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={b}");
    let r =
        f.c.raw("POST", "/", &[("content-type", &ct)], body.clone())
            .await
            .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json().unwrap(),
        json!({"result": {"sid": "12", "script": {"filename": "startup.sh", "content": "echo hi"}}, "error": null, "id": 1})
    );
    // an UPLOAD method is not reachable as GET
    let (s, _) = get(&f.c, "/?service_id=0&method=upload&id=1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // broken multipart
    let r =
        f.c.raw(
            "POST",
            "/",
            &[("content-type", "multipart/form-data")],
            "junk",
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn panics_do_not_leak_internals() {
    let f = fixture().await;
    let (s, v) = get(&f.c, "/?service_id=0&method=boom&id=5").await;
    assert_eq!(s, StatusCode::OK);
    let e = v["error"].as_str().unwrap();
    assert_eq!(
        e,
        "Error when calling method boom on service 0: internal error"
    );
    assert!(!e.contains("secret") && !e.contains("panicked"));
    assert_eq!(v["id"], "5");
    // the server is still alive
    assert_eq!(f.c.get(0, "echo", &json!({})).await.unwrap(), json!({}));
}

#[tokio::test]
async fn malformed_and_huge_bodies() {
    let f = fixture().await;
    for body in [
        "{",
        "[1,2]",
        "null",
        "\"s\"",
        "{\"service_id\":0,\"method\":\"add\",\"params\":[1],\"id\":1}",
    ] {
        let r = f.c.raw("POST", "/", &[JSON], body).await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.json().unwrap()["error"].is_string());
    }
    let (s, v) = get(&f.c, "/?service_id=0&method=echo&id=1&params=%7Bbad").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"]
        .as_str()
        .unwrap()
        .starts_with("Invalid JSON in params"));
    let huge = vec![b' '; runtime::rpc::MAX_BODY + 10];
    let r = f.c.raw("POST", "/", &[JSON], huge).await;
    match r {
        Ok(r) => assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => panic!("expected 413, got {e}"),
    }
}

#[tokio::test]
async fn requests_are_served_concurrently() {
    let f = fixture().await;
    let start = Instant::now();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let c = f.c.clone();
            tokio::spawn(async move { c.get(0, "slow", &json!({})).await })
        })
        .collect();
    // a quick call is not blocked behind the slow ones
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = Instant::now();
    f.c.get(0, "echo", &json!({})).await.unwrap();
    assert!(
        q.elapsed() < Duration::from_millis(600),
        "quick call waited {:?}",
        q.elapsed()
    );
    for h in slow {
        assert_eq!(h.await.unwrap().unwrap(), json!("slow done"));
    }
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "6 slow calls took {:?}",
        start.elapsed()
    );
}
