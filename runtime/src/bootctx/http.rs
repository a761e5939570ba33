//! A minimal synchronous HTTP/1.1 client for the link-local metadata services.
//!
//! Plain `http://` only (metadata services do not speak TLS), one request per connection
//! (`Connection: close`), bodies read to the end and capped at [`MAX_BODY`]. Handles
//! `Content-Length`, chunked transfer coding and close-delimited bodies.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response accepted (user-data on EC2 is limited to 16 KiB; this is generous).
pub const MAX_BODY: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a request produced no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing answered (resolution, connect, or the connection broke before a status line).
    #[error("{0}")]
    Unreachable(String),
    /// Something answered, but not with valid HTTP/1.x.
    #[error("invalid HTTP answer: {0}")]
    Protocol(String),
    #[error("bad URL '{0}': {1}")]
    Url(String, String),
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(10),
        }
    }
}

/// Sends `method url` with `headers` and an empty body; returns status and body.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    t: Timeouts,
) -> Result<Response, HttpError> {
    let u = url::Url::parse(url).map_err(|e| HttpError::Url(url.into(), e.to_string()))?;
    if u.scheme() != "http" {
        return Err(HttpError::Url(
            url.into(),
            "only http:// is supported".into(),
        ));
    }
    let host = u
        .host_str()
        .ok_or_else(|| HttpError::Url(url.into(), "no host".into()))?;
    let port = u.port_or_known_default().unwrap_or(80);
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Unreachable(format!("resolving {host}: {e}")))?
        .collect();
    let mut last = format!("{host}:{port}: no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, t.connect) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    let mut s = stream.ok_or(HttpError::Unreachable(last))?;
    let unreachable = |e: std::io::Error| HttpError::Unreachable(format!("{host}:{port}: {e}"));
    s.set_read_timeout(Some(t.io)).map_err(unreachable)?;
    s.set_write_timeout(Some(t.io)).map_err(unreachable)?;

    let mut path = u.path().to_string();
    if let Some(q) = u.query() {
        path.push('?');
        path.push_str(q);
    }
    let host_hdr = match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host_hdr}\r\nUser-Agent: cps-context\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(unreachable)?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY + 64 * 1024 {
                    return Err(HttpError::Protocol("answer too large".into()));
                }
                // A complete Content-Length body lets us stop without waiting for EOF.
                if let Some(done) = complete_len(&raw) {
                    raw.truncate(done);
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if raw.is_empty() => return Err(unreachable(e)),
            Err(e) => return Err(HttpError::Protocol(format!("reading: {e}"))),
        }
    }
    if raw.is_empty() {
        return Err(HttpError::Unreachable(format!(
            "{host}:{port}: connection closed without an answer"
        )));
    }
    parse_response(&raw, method == "HEAD")
}

fn find_head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text =
        std::str::from_utf8(head).map_err(|_| HttpError::Protocol("non-UTF-8 head".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Protocol(format!("status line '{status_line}'")));
    }
    let status = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Protocol(format!("status line '{status_line}'")))?;
    let mut h = Head {
        status,
        content_length: None,
        chunked: false,
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            h.content_length = Some(
                v.parse()
                    .map_err(|_| HttpError::Protocol(format!("Content-Length '{v}'")))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding")
            && v.to_ascii_lowercase().contains("chunked")
        {
            h.chunked = true;
        }
    }
    Ok(h)
}

/// Total length of the message if it is Content-Length delimited and complete.
fn complete_len(raw: &[u8]) -> Option<usize> {
    let end = find_head_end(raw)?;
    let h = parse_head(&raw[..end - 4]).ok()?;
    if h.chunked {
        return None;
    }
    let total = end + h.content_length?;
    (raw.len() >= total).then_some(total)
}

fn parse_response(raw: &[u8], head_only: bool) -> Result<Response, HttpError> {
    let end = find_head_end(raw).ok_or_else(|| HttpError::Protocol("truncated head".into()))?;
    let h = parse_head(&raw[..end - 4])?;
    let rest = &raw[end..];
    let body = if head_only || h.status == 204 || h.status == 304 || (100..200).contains(&h.status)
    {
        Vec::new()
    } else if h.chunked {
        dechunk(rest)?
    } else if let Some(n) = h.content_length {
        if rest.len() < n {
            return Err(HttpError::Protocol(format!(
                "body truncated ({} of {n} bytes)",
                rest.len()
            )));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status: h.status,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| HttpError::Protocol("truncated chunk size".into()))?;
        let line =
            std::str::from_utf8(&b[..nl]).map_err(|_| HttpError::Protocol("chunk size".into()))?;
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Protocol(format!("chunk size '{size_hex}'")))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 || out.len() + size > MAX_BODY {
            return Err(HttpError::Protocol("truncated or oversized chunk".into()));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope", false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n", false).is_err());
        assert_eq!(
            complete_len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"),
            Some(40)
        );
    }
}
