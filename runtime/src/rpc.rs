//! The ConPaaS RPC protocol (server side), wire-compatible with the original
//! `core/https/server.py`:
//!
//! * one path `/` (404 otherwise); a `Content-Type` header is required (415);
//! * `GET` with a JSON content type: `service_id`, `method`, `id` and JSON `params` in the query
//!   (last value wins for repeated keys);
//! * `POST` with a JSON content type: envelope `{"service_id", "method", "params", "id"}`;
//! * `POST` `multipart/form-data`: dispatched as `UPLOAD` (plain fields as strings, file fields
//!   as `{"filename", "content"}` objects, plus `"base64"` of the exact bytes when they are not
//!   UTF-8), echo id 1;
//! * other verbs: 405;
//! * a method is callable only with its declared verb;
//! * answers: `{"result": …, "error": null, "id": …}` or `{"error": "…", "id": …}` (HTTP 200).
//!
//! Differences from the original: a missing `id` is answered with an error (HTTP 400) instead of
//! a dropped connection; dispatch errors (400/404/405/413/415) carry the same message in a JSON
//! body; a handler that panics is answered with a generic message (no backtrace); requests are
//! served concurrently.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Largest accepted request body.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    GET,
    POST,
    UPLOAD,
}

/// An error reported by a handler: answered as `{"error": msg, "id": id}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcError(pub String);

impl RpcError {
    pub fn new(msg: impl Into<String>) -> Self {
        RpcError(msg.into())
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<anyhow::Error> for RpcError {
    fn from(e: anyhow::Error) -> Self {
        RpcError(format!("{e:#}"))
    }
}

pub type Params = Map<String, Value>;
pub type RpcResult = Result<Value, RpcError>;
pub type BoxFut = Pin<Box<dyn Future<Output = RpcResult> + Send>>;
pub type Handler = Arc<dyn Fn(Params) -> BoxFut + Send + Sync>;

/// The methods of one service, keyed by verb and name.
#[derive(Default, Clone)]
pub struct Methods {
    map: HashMap<(Verb, String), Handler>,
}

impl Methods {
    /// Registers `f` as method `name`, callable with `verb` only.
    pub fn expose<F, Fut>(&mut self, verb: Verb, name: &str, f: F)
    where
        F: Fn(Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RpcResult> + Send + 'static,
    {
        let h: Handler = Arc::new(move |p| Box::pin(f(p)));
        self.map.insert((verb, name.to_string()), h);
    }

    pub fn get(&self, verb: Verb, name: &str) -> Option<&Handler> {
        self.map.get(&(verb, name.to_string()))
    }

    pub fn has_verb(&self, verb: Verb) -> bool {
        self.map.keys().any(|(v, _)| *v == verb)
    }

    pub fn names(&self) -> Vec<(Verb, String)> {
        let mut v: Vec<_> = self.map.keys().cloned().collect();
        v.sort_by(|a, b| a.1.cmp(&b.1));
        v
    }
}

/// A service whose methods can be exposed (the Rust counterpart of `@expose`).
pub trait Exposed: Send + Sync + 'static {
    fn expose(self: Arc<Self>, methods: &mut Methods);
}

/// Registers methods of `self` (an `Arc`): `expose!(methods, this, { GET check_process, POST startup })`.
/// Each method must be `async fn name(&self, params: Params) -> RpcResult`.
#[macro_export]
macro_rules! expose {
    ($methods:expr, $this:expr, { $($verb:ident $name:ident),* $(,)? }) => {{
        $( {
            let this = ::std::sync::Arc::clone(&$this);
            $methods.expose($crate::rpc::Verb::$verb, stringify!($name), move |p| {
                let this = ::std::sync::Arc::clone(&this);
                async move { this.$name(p).await }
            });
        } )*
    }};
}

/// Services by id.
#[derive(Default, Clone)]
pub struct Dispatcher {
    services: HashMap<u64, Methods>,
}

impl Dispatcher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_service(&mut self, id: u64, svc: Arc<dyn Exposed>) {
        let mut m = Methods::default();
        svc.expose(&mut m);
        self.services.insert(id, m);
    }

    pub fn add_methods(&mut self, id: u64, m: Methods) {
        self.services.insert(id, m);
    }
}

fn envelope_error(status: StatusCode, msg: &str, id: Value) -> Response {
    (status, axum::Json(json!({"error": msg, "id": id}))).into_response()
}

fn content_type(req: &Request) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn is_json_type(ct: &str) -> bool {
    matches!(
        ct,
        "application/json-rpc" | "application/json" | "application/jsonrequest"
    )
}

/// The parsed request, before dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub verb: Verb,
    pub service_id: Option<Value>,
    pub method: Option<Value>,
    pub params: Params,
    pub id: Option<Value>,
}

/// Decodes a GET query string. Errors are (status, message).
pub fn parse_query(query: &str) -> Result<Call, (StatusCode, String)> {
    let mut q: HashMap<String, String> = HashMap::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        q.insert(k.into_owned(), v.into_owned());
    }
    let params = match q.get("params") {
        None => Map::new(),
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            Ok(Value::Null) => Map::new(),
            Ok(_) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "params must be a JSON object".into(),
                ))
            }
            Err(e) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("Invalid JSON in params: {e}"),
                ))
            }
        },
    };
    Ok(Call {
        verb: Verb::GET,
        service_id: q.get("service_id").map(|s| Value::String(s.clone())),
        method: q.get("method").map(|s| Value::String(s.clone())),
        params,
        id: q.get("id").map(|s| Value::String(s.clone())),
    })
}

/// Decodes a POST JSON envelope.
pub fn parse_envelope(body: &[u8]) -> Result<Call, (StatusCode, String)> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("Invalid JSON request: {e}"),
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err((
            StatusCode::BAD_REQUEST,
            "Request must be a JSON object".into(),
        ));
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "params must be a JSON object".into(),
            ))
        }
    };
    Ok(Call {
        verb: Verb::POST,
        service_id: obj.remove("service_id"),
        method: obj.remove("method"),
        params,
        id: obj.remove("id"),
    })
}

fn service_id_of(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Dispatcher {
    /// Dispatches a decoded call and builds the answer.
    pub async fn dispatch(&self, call: Call) -> Response {
        let id = call.id.clone().unwrap_or(Value::Null);
        let Some(sid) = call.service_id.as_ref() else {
            return envelope_error(StatusCode::BAD_REQUEST, "Did not specify service", id);
        };
        let sid = service_id_of(sid);
        let svc = match sid.and_then(|s| self.services.get(&s)) {
            Some(m) if m.has_verb(call.verb) => m,
            _ => return envelope_error(StatusCode::NOT_FOUND, "Service not found", id),
        };
        let Some(method) = call.method.as_ref() else {
            return envelope_error(StatusCode::BAD_REQUEST, "Did not specify method", id);
        };
        let Some(name) = method.as_str() else {
            return envelope_error(StatusCode::NOT_FOUND, "Method not found", id);
        };
        let Some(handler) = svc.get(call.verb, name) else {
            return envelope_error(StatusCode::NOT_FOUND, "Method not found", id);
        };
        let id = match (call.verb, call.id) {
            (Verb::UPLOAD, _) => json!(1),
            (_, Some(id)) => id,
            (_, None) => {
                return envelope_error(StatusCode::BAD_REQUEST, "Did not specify id", Value::Null)
            }
        };
        // Run in its own task so that a panic is contained and answered.
        let fut = handler(call.params);
        match tokio::spawn(fut).await {
            Ok(Ok(result)) => {
                axum::Json(json!({"result": result, "error": null, "id": id})).into_response()
            }
            Ok(Err(e)) => axum::Json(json!({"error": e.0, "id": id})).into_response(),
            Err(join) => {
                let sid = sid.unwrap_or_default();
                tracing::error!("method {name} on service {sid} failed: {join}");
                axum::Json(json!({
                    "error": format!("Error when calling method {name} on service {sid}: internal error"),
                    "id": id
                }))
                .into_response()
            }
        }
    }

    /// Handles one HTTP request (any path, any verb).
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        if req.uri().path() != "/" {
            return envelope_error(StatusCode::NOT_FOUND, "Not found", Value::Null);
        }
        let Some(ct) = content_type(&req) else {
            return envelope_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type required",
                Value::Null,
            );
        };
        let call = match *req.method() {
            Method::GET => {
                if !is_json_type(&ct) {
                    return envelope_error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "Unsupported Content-Type",
                        Value::Null,
                    );
                }
                parse_query(req.uri().query().unwrap_or(""))
            }
            Method::POST if is_json_type(&ct) => {
                match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
                    Ok(b) => parse_envelope(&b),
                    Err(_) => Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Request body too large".into(),
                    )),
                }
            }
            Method::POST if ct == "multipart/form-data" => parse_multipart(req).await,
            Method::POST => {
                return envelope_error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Unsupported Content-Type",
                    Value::Null,
                )
            }
            _ => {
                return envelope_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method not allowed",
                    Value::Null,
                )
            }
        };
        match call {
            Ok(call) => self.dispatch(call).await,
            Err((status, msg)) => envelope_error(status, &msg, Value::Null),
        }
    }

    /// An axum router serving the protocol on every path (non-`/` paths get 404).
    pub fn router(self) -> axum::Router {
        let d = Arc::new(self);
        axum::Router::new()
            .fallback(move |req: Request| {
                let d = d.clone();
                async move { d.handle(req).await }
            })
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
    }
}

async fn parse_multipart(req: Request) -> Result<Call, (StatusCode, String)> {
    let mut mp = axum::extract::Multipart::from_request(req, &())
        .await
        .map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("Invalid multipart body: {e}"),
            )
        })?;
    let mut fields = Map::new();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err((
                    e.status(),
                    format!("Invalid multipart body: {}", e.body_text()),
                ))
            }
        };
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|e| {
            (
                e.status(),
                format!("Invalid multipart body: {}", e.body_text()),
            )
        })?;
        let value = match filename {
            // Text files as they are; binary ones (archives) also base64-encoded, intact.
            Some(f) => match std::str::from_utf8(&data) {
                Ok(text) => json!({"filename": f, "content": text}),
                Err(_) => json!({
                    "filename": f,
                    "content": String::from_utf8_lossy(&data),
                    "base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data),
                }),
            },
            None => Value::String(String::from_utf8_lossy(&data).into_owned()),
        };
        fields.insert(name, value);
    }
    let service_id = fields.remove("service_id");
    let method = fields.remove("method");
    Ok(Call {
        verb: Verb::UPLOAD,
        service_id,
        method,
        params: fields,
        id: Some(json!(1)),
    })
}

/// Serves `router` over TLS on `listener` until the process ends. Each connection is served in
/// its own task; handshake failures are logged and the connection dropped.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!("TLS handshake with {peer} timed out");
                        return;
                    }
                };
            let svc = hyper_util::service::TowerToHyperService::new(router);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("connection with {peer}: {e}");
            }
        });
    }
}
