//! RPC client over (m)TLS: `jsonrpc_get`/`jsonrpc_post` as in the original client, plus a
//! raw request for tests and a persistent connection for benchmarks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::pki::SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {msg}")]
    Tls { addr: String, msg: String },
    #[error("HTTP error talking to {addr}: {msg}")]
    Http { addr: String, msg: String },
    #[error("server answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("RPC error: {0}")]
    Rpc(String),
    #[error("invalid answer: {0}")]
    Protocol(String),
    #[error("request to {0} timed out")]
    Timeout(String),
}

/// Raw HTTP answer.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl RawResponse {
    pub fn json(&self) -> Result<Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&self.body)))
        })
    }
}

#[derive(Clone)]
pub struct RpcClient {
    tls: Arc<rustls::ClientConfig>,
    addr: String,
    pub timeout: Duration,
}

/// A persistent HTTP/1.1 connection (keep-alive).
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    addr: String,
}

impl RpcClient {
    /// `addr` is `host:port`.
    pub fn new(tls: Arc<rustls::ClientConfig>, addr: impl Into<String>) -> Self {
        RpcClient {
            tls,
            addr: addr.into(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens a TLS connection and an HTTP/1.1 session on it.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let addr = self.addr.clone();
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
            .await
            .map_err(|_| ClientError::Timeout(addr.clone()))?
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME).expect("valid name");
        let tls = tokio::time::timeout(
            Duration::from_secs(10),
            TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| ClientError::Timeout(addr.clone()))?
        .map_err(|e| ClientError::Tls {
            addr: addr.clone(),
            msg: e.to_string(),
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http {
                addr: addr.clone(),
                msg: e.to_string(),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender, addr })
    }

    /// One request on a fresh connection (`Connection: close`, as the original client).
    pub async fn raw(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<RawResponse, ClientError> {
        let fut = async {
            let mut c = self.connect().await?;
            let mut h: Vec<(&str, &str)> = headers.to_vec();
            h.push(("connection", "close"));
            c.raw(method, path_and_query, &h, body.into()).await
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(self.addr.clone()))?
    }

    /// GET `/?service_id=…&method=…&id=1[&params=<json>]`.
    pub async fn get(
        &self,
        service_id: u64,
        method: &str,
        params: &Value,
    ) -> Result<Value, ClientError> {
        let r = self
            .raw(
                "GET",
                &get_query(service_id, method, params),
                &[("content-type", "application/json")],
                Bytes::new(),
            )
            .await?;
        check_response(r)
    }

    /// POST with a JSON envelope.
    pub async fn post(
        &self,
        service_id: u64,
        method: &str,
        params: &Value,
    ) -> Result<Value, ClientError> {
        let body = post_body(service_id, method, params);
        let r = self
            .raw("POST", "/", &[("content-type", "application/json")], body)
            .await?;
        check_response(r)
    }

    /// UPLOAD: a `multipart/form-data` POST with plain `fields` and `files`
    /// (`(field name, file name, bytes)`), as the original `jsonrpc_upload`.
    pub async fn upload(
        &self,
        service_id: u64,
        method: &str,
        fields: &[(&str, &str)],
        files: &[(&str, &str, &[u8])],
    ) -> Result<Value, ClientError> {
        let (ct, body) = multipart_body(service_id, method, fields, files);
        let r = self
            .raw("POST", "/", &[("content-type", &ct)], body)
            .await?;
        check_response(r)
    }
}

/// A `multipart/form-data` body and its content type.
pub fn multipart_body(
    service_id: u64,
    method: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> (String, Bytes) {
    let boundary = format!("cps-{}", crate::pki::random_hex(12));
    let mut b: Vec<u8> = Vec::new();
    let sid = service_id.to_string();
    let plain = [("service_id", sid.as_str()), ("method", method)];
    for (k, v) in plain.iter().chain(fields.iter()) {
        b.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    for (k, name, data) in files {
        b.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(b),
    )
}

pub fn get_query(service_id: u64, method: &str, params: &Value) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("service_id", &service_id.to_string());
    q.append_pair("method", method);
    q.append_pair("id", "1");
    if !params.is_null() {
        q.append_pair("params", &params.to_string());
    }
    format!("/?{}", q.finish())
}

pub fn post_body(service_id: u64, method: &str, params: &Value) -> Bytes {
    let params = if params.is_null() {
        json!({})
    } else {
        params.clone()
    };
    Bytes::from(
        json!({"service_id": service_id, "method": method, "params": params, "id": "1"})
            .to_string(),
    )
}

/// Non-200 → error; `error` set → error; else `result`.
pub fn check_response(r: RawResponse) -> Result<Value, ClientError> {
    let v = r.json();
    if r.status != StatusCode::OK {
        let body = match &v {
            Ok(v) => v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
            Err(_) => String::from_utf8_lossy(&r.body).into_owned(),
        };
        return Err(ClientError::Status {
            status: r.status.as_u16(),
            body,
        });
    }
    let v = v?;
    match v.get("error") {
        Some(Value::Null) | None => {}
        Some(Value::String(s)) => return Err(ClientError::Rpc(s.clone())),
        Some(other) => return Err(ClientError::Rpc(other.to_string())),
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| ClientError::Protocol(format!("answer without result: {v}")))
}

impl Connection {
    pub async fn raw(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<RawResponse, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", SERVER_NAME);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).map_err(|e| ClientError::Http {
            addr: self.addr.clone(),
            msg: e.to_string(),
        })?;
        self.sender.ready().await.map_err(|e| ClientError::Http {
            addr: self.addr.clone(),
            msg: e.to_string(),
        })?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http {
                addr: self.addr.clone(),
                msg: e.to_string(),
            })?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http {
                addr: self.addr.clone(),
                msg: e.to_string(),
            })?
            .to_bytes();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    pub async fn get(
        &mut self,
        service_id: u64,
        method: &str,
        params: &Value,
    ) -> Result<Value, ClientError> {
        let q = get_query(service_id, method, params);
        let r = self
            .raw(
                "GET",
                &q,
                &[("content-type", "application/json")],
                Bytes::new(),
            )
            .await?;
        check_response(r)
    }
}
