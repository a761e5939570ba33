//! A stand-in for Nova, for the `openstack` driver test: a small HTTP server on 127.0.0.1
//! answering Nova calls from the recorded fixtures in `fixtures/nova/`, and recording what it
//! was sent. Nova itself cannot run on a test machine (it needs placement, neutron and a
//! message queue); Keystone, which it sits behind, is real and comes from the workspace's
//! `emulators` crate (`tests/emulators/`).
//!
//! This stays here rather than in that crate: only these tests use it, and it is served with
//! axum, a dependency of `runtime` that the register tests do not need.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// One recorded exchange of `fixtures/nova/*.json`.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub file: String,
    pub method: String,
    /// Path below the compute endpoint; `{name}` segments match any segment.
    pub path: String,
    pub status: u16,
    pub body: Value,
}

/// A request the fixture server got.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub token: Option<String>,
    pub body: Value,
}

/// `fixtures/nova/` of the workspace.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/nova")
}

/// Every `*.json` of [`fixtures_dir`], in file-name order.
pub fn load_fixtures() -> Vec<Fixture> {
    let mut files: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .expect("fixtures/nova")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Fixture {
                file: p.file_name().unwrap().to_string_lossy().into_owned(),
                method: v["request"]["method"].as_str().unwrap().to_string(),
                path: v["request"]["path"].as_str().unwrap().to_string(),
                status: v["response"]["status"].as_u64().unwrap() as u16,
                body: v["response"]["body"].clone(),
            }
        })
        .collect()
}

fn path_matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let q: Vec<&str> = path.trim_matches('/').split('/').collect();
    p.len() == q.len()
        && p.iter()
            .zip(&q)
            .all(|(a, b)| (a.starts_with('{') && a.ends_with('}')) || a == b)
}

struct NovaState {
    fixtures: Vec<Fixture>,
    seen: Vec<Seen>,
}

/// Serves the Nova fixtures under `/v2.1` on 127.0.0.1. Fixtures with the same method and
/// path are answered in file-name order, the last one from then on (a server that is
/// `BUILD` first and then `ACTIVE`). Requests without `X-Auth-Token` get 401.
pub struct NovaFixtures {
    /// The compute endpoint: `http://127.0.0.1:PORT/v2.1`.
    pub url: String,
    state: Arc<Mutex<NovaState>>,
    task: tokio::task::JoinHandle<()>,
}

impl NovaFixtures {
    /// Starts serving on a free 127.0.0.1 port, in a task aborted on Drop.
    pub async fn start() -> NovaFixtures {
        let state = Arc::new(Mutex::new(NovaState {
            fixtures: load_fixtures(),
            seen: Vec::new(),
        }));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let st = st.clone();
            async move { answer(st, req).await }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v2.1", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        NovaFixtures { url, state, task }
    }

    /// The requests received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Drop for NovaFixtures {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    st: Arc<Mutex<NovaState>>,
    req: axum::extract::Request,
) -> axum::response::Response<axum::body::Body> {
    use axum::response::IntoResponse;
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let token = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut s = st.lock().unwrap();
    let Some(rel) = path.strip_prefix("/v2.1") else {
        return (axum::http::StatusCode::NOT_FOUND, "not under /v2.1").into_response();
    };
    let rel = rel.to_string();
    let n_before = s
        .seen
        .iter()
        .filter(|x| x.method == method && x.path == path)
        .count();
    s.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query,
        token: token.clone(),
        body,
    });
    if token.is_none() {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": 401, "message": "no X-Auth-Token"}})),
        )
            .into_response();
    }
    let mut matching: Vec<&Fixture> = s
        .fixtures
        .iter()
        .filter(|f| f.method == method && path_matches(&f.path, &rel))
        .collect();
    // A literal path (`/servers/detail`) wins over a pattern (`/servers/{server_id}`).
    if matching.iter().any(|f| f.path == rel) {
        matching.retain(|f| f.path == rel);
    }
    let Some(f) = matching.get(n_before.min(matching.len().saturating_sub(1))) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({"itemNotFound": {"code": 404,
                "message": format!("no fixture for {method} {rel}")}})),
        )
            .into_response();
    };
    let status = axum::http::StatusCode::from_u16(f.status).unwrap();
    if f.body.is_null() {
        status.into_response()
    } else {
        (status, axum::Json(f.body.clone())).into_response()
    }
}
