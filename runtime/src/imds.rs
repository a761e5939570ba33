//! An EC2-style instance metadata service (IMDSv2 required) for one node of the `qemu` cloud
//! driver with `CONTEXT = ec2`. It listens on 127.0.0.1; the guest reaches it at
//! 169.254.169.254:80 through a qemu guest forward (`cps relay`).
//!
//! `PUT /latest/api/token` hands out a session token; every `GET` must carry it in
//! `X-aws-ec2-metadata-token`, else it is answered 401, as on an instance whose metadata
//! options say `HttpTokens=required`. Every request is appended to a log file (method, path,
//! status), so a test can see which source the guest really used.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the metadata service tells one instance.
#[derive(Clone, Debug, Default)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub hostname: String,
    pub local_ipv4: String,
    pub ssh_keys: Vec<String>,
    pub user_data: Vec<u8>,
}

/// The running service; stopped when dropped.
pub struct Imds {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    md: InstanceMetadata,
    token: String,
    log: Option<Mutex<std::fs::File>>,
}

impl Imds {
    /// Starts the service on a free port of 127.0.0.1; requests are logged to `log`.
    pub fn start(md: InstanceMetadata, log: Option<&Path>) -> std::io::Result<Imds> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let log = match log {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
            None => None,
        };
        let shared = Arc::new(Shared {
            md,
            token: crate::pki::random_hex(24),
            log,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let sh = shared.clone();
                    std::thread::spawn(move || {
                        let _ = serve(c, &sh);
                    });
                }
            }
        });
        Ok(Imds {
            port,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(sh: &Shared, method: &str, path: &str, token_ok: bool) -> (u16, Vec<u8>) {
    let md = &sh.md;
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("PUT", "/latest/api/token") => (200, sh.token.clone().into_bytes()),
        ("GET", _) if !token_ok => (401, Vec::new()),
        ("GET", "/latest/meta-data/instance-id") => (200, md.instance_id.clone().into()),
        ("GET", "/latest/meta-data/local-hostname" | "/latest/meta-data/hostname") => {
            (200, md.hostname.clone().into())
        }
        ("GET", "/latest/meta-data/local-ipv4") => (200, md.local_ipv4.clone().into()),
        ("GET", "/latest/meta-data/public-keys/") if !md.ssh_keys.is_empty() => {
            (200, b"0=cps".to_vec())
        }
        ("GET", "/latest/meta-data/public-keys/0/openssh-key") if !md.ssh_keys.is_empty() => {
            (200, md.ssh_keys.join("\n").into_bytes())
        }
        ("GET", "/latest/user-data") if !md.user_data.is_empty() => (200, md.user_data.clone()),
        ("GET", _) => (404, Vec::new()),
        _ => (405, Vec::new()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    }
}

/// Serves the requests of one connection (keep-alive, as curl uses it).
fn serve(c: TcpStream, sh: &Shared) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = c.try_clone()?;
    let mut reader = BufReader::new(c);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (mut token_ok, mut length, mut close) = (false, 0usize, false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "x-aws-ec2-metadata-token" => token_ok = v == sh.token,
                "content-length" => length = v.parse().unwrap_or(0),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        let (status, payload) = answer(sh, &method, &path, token_ok);
        if let Some(l) = &sh.log {
            if let Ok(mut f) = l.lock() {
                let _ = writeln!(f, "{method} {path} {status}");
            }
        }
        write!(
            w,
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
            reason(status),
            payload.len()
        )?;
        w.write_all(&payload)?;
        w.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// The log file of a node's metadata service.
pub fn log_path(node_dir: &Path) -> PathBuf {
    node_dir.join("imds.log")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootctx::http::{request, Timeouts};

    #[test]
    fn gets_need_the_session_token() {
        let dir = tempfile::tempdir().unwrap();
        let md = InstanceMetadata {
            instance_id: "node-1".into(),
            hostname: "iaas1".into(),
            local_ipv4: "169.254.0.15".into(),
            ssh_keys: vec![],
            user_data: b"#!/bin/sh\necho hi\n".to_vec(),
        };
        let imds = Imds::start(md, Some(&log_path(dir.path()))).unwrap();
        let base = format!("http://{}", imds.addr());
        let t = Timeouts::default();
        let r = request("GET", &format!("{base}/latest/user-data"), &[], t).unwrap();
        assert_eq!(r.status, 401);
        let tok = request(
            "PUT",
            &format!("{base}/latest/api/token"),
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
            t,
        )
        .unwrap();
        assert_eq!(tok.status, 200);
        let tok = String::from_utf8(tok.body).unwrap();
        let h = [("X-aws-ec2-metadata-token", tok.as_str())];
        let r = request("GET", &format!("{base}/latest/user-data"), &h, t).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"#!/bin/sh\necho hi\n"[..])
        );
        let r = request("GET", &format!("{base}/latest/meta-data/local-ipv4"), &h, t).unwrap();
        assert_eq!(r.body, b"169.254.0.15");
        let r = request(
            "GET",
            &format!("{base}/latest/meta-data/public-ipv4"),
            &h,
            t,
        )
        .unwrap();
        assert_eq!(r.status, 404);
        drop(imds);
        let log = std::fs::read_to_string(log_path(dir.path())).unwrap();
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            [
                "GET /latest/user-data 401",
                "PUT /latest/api/token 200",
                "GET /latest/user-data 200",
                "GET /latest/meta-data/local-ipv4 200",
                "GET /latest/meta-data/public-ipv4 404",
            ]
        );
    }
}
