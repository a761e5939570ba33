//! Property tests: the request parser and dispatcher never panic, whatever arrives.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use proptest::prelude::*;
use runtime::args::{is_bool, is_dict, is_int, is_string, Args};
use runtime::rpc::{parse_envelope, parse_query, Dispatcher, Methods, Verb};
use serde_json::{json, Value};

fn dispatcher() -> Arc<Dispatcher> {
    let mut m = Methods::default();
    m.expose(Verb::POST, "typed", |p| async move {
        let mut a = Args::new(p);
        let _ = a.req("n", is_int)?;
        let _ = a.opt("b", is_bool, false)?;
        let _ = a.opt("s", is_string, String::new())?;
        let _ = a.opt("d", is_dict, Default::default())?;
        a.finish()?;
        Ok(json!("ok"))
    });
    m.expose(Verb::GET, "echo", |p| async move { Ok(Value::Object(p)) });
    let mut d = Dispatcher::new();
    d.add_methods(0, m);
    Arc::new(d)
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn status_of(
    d: &Arc<Dispatcher>,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    let r = d.clone().handle(b.body(Body::from(body)).unwrap()).await;
    let status = r.status().as_u16();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
    // every answer is a JSON envelope with an `error` or a `result`
    let v: Value = serde_json::from_slice(&bytes).expect("JSON answer");
    assert!(v.get("error").is_some(), "{v}");
    (status, v)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_envelope(&body);
        let s = String::from_utf8_lossy(&body);
        let _ = parse_query(&s);
        let d = dispatcher();
        rt().block_on(async {
            let (st, _) = status_of(&d, "POST", "/", Some("application/json"), body.clone()).await;
            prop_assert!(st == 200 || (400..500).contains(&st));
            let (st, _) = status_of(&d, "POST", "/", Some("multipart/form-data; boundary=x"), body).await;
            prop_assert!(st == 200 || (400..500).contains(&st));
            Ok(())
        })?;
    }

    #[test]
    fn random_envelopes_get_an_answer(sid in arb_json(), method in arb_json(), params in arb_json(), id in arb_json()) {
        let d = dispatcher();
        let body = json!({"service_id": sid, "method": method, "params": params, "id": id}).to_string();
        rt().block_on(async {
            let (st, v) = status_of(&d, "POST", "/", Some("application/json"), body.into_bytes()).await;
            prop_assert!(st == 200 || st == 400 || st == 404, "{st} {v}");
            Ok(())
        })?;
    }

    #[test]
    fn wrong_types_are_validation_errors(n in arb_json(), b in arb_json(), s in arb_json(), dd in arb_json()) {
        let d = dispatcher();
        let body = json!({"service_id": 0, "method": "typed", "id": 1,
                          "params": {"n": n, "b": b, "s": s, "d": dd}}).to_string();
        rt().block_on(async {
            let (st, v) = status_of(&d, "POST", "/", Some("application/json"), body.into_bytes()).await;
            prop_assert_eq!(st, 200);
            match v.get("result") {
                Some(r) => prop_assert_eq!(r, &json!("ok")),
                None => prop_assert!(v["error"].as_str().unwrap().starts_with("Parameter '")),
            }
            Ok(())
        })?;
    }

    #[test]
    fn random_queries_never_panic(q in "[ -~]{0,200}", ct in prop::option::of("[ -~]{0,30}")) {
        let d = dispatcher();
        let uri = format!("/?{}", q.replace(' ', "%20").replace('#', "%23"));
        rt().block_on(async {
            if let Ok(u) = uri.parse::<axum::http::Uri>() {
                let (st, _) = status_of(&d, "GET", &u.to_string(), ct.as_deref(), Vec::new()).await;
                prop_assert!(st == 200 || (400..500).contains(&st));
            }
            Ok(())
        })?;
    }
}

#[test]
fn huge_body_is_refused_without_panic() {
    let d = dispatcher();
    rt().block_on(async {
        let body = vec![b'['; runtime::rpc::MAX_BODY + 1];
        let (st, _) = status_of(&d, "POST", "/", Some("application/json"), body).await;
        assert_eq!(st, 413);
        // deeply nested JSON within the limit
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (st, _) = status_of(&d, "POST", "/", Some("application/json"), body.into_bytes()).await;
        assert_eq!(st, 400);
    });
}
