//! Contextualization data for booting an image locally, the way clouds hand it to
//! instances: an OpenStack config drive (ISO 9660 labelled `config-2`) or an EC2
//! instance metadata service (IMDSv2, with session tokens) reached by the guest at
//! 169.254.169.254 through a qemu guest forward.

use crate::host::Cmd;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What an instance learns about itself.
#[derive(Debug, Clone)]
pub struct InstanceData {
    pub instance_id: String,
    pub hostname: String,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<Vec<u8>>,
}

impl InstanceData {
    pub fn new(hostname: &str) -> InstanceData {
        InstanceData {
            instance_id: format!("i-{}", &uuid::Uuid::new_v4().simple().to_string()[..17]),
            hostname: hostname.to_owned(),
            ssh_keys: vec![],
            user_data: None,
        }
    }

    /// Reads `--context PATH`: a file is the user-data; a directory holds
    /// `user_data` (or `user-data`) and optionally `meta_data.json` / `ssh_key.pub`.
    pub fn from_path(path: &Path, hostname: &str) -> anyhow::Result<InstanceData> {
        let mut d = InstanceData::new(hostname);
        if path.is_file() {
            d.user_data = Some(std::fs::read(path)?);
            return Ok(d);
        }
        if !path.is_dir() {
            anyhow::bail!("{}: no such context file or directory", path.display());
        }
        for n in ["user_data", "user-data"] {
            if path.join(n).is_file() {
                d.user_data = Some(std::fs::read(path.join(n))?);
            }
        }
        if let Ok(t) = std::fs::read_to_string(path.join("meta_data.json")) {
            let v: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| anyhow::anyhow!("{}/meta_data.json: {e}", path.display()))?;
            if let Some(u) = v["uuid"].as_str() {
                d.instance_id = u.to_owned();
            }
            if let Some(h) = v["hostname"].as_str() {
                d.hostname = h.to_owned();
            }
            if let Some(keys) = v["public_keys"].as_object() {
                d.ssh_keys
                    .extend(keys.values().filter_map(|k| k.as_str()).map(str::to_owned));
            }
        }
        if let Ok(k) = std::fs::read_to_string(path.join("ssh_key.pub")) {
            d.ssh_keys.push(k.trim().to_owned());
        }
        Ok(d)
    }

    fn meta_data_json(&self) -> serde_json::Value {
        let keys: serde_json::Map<String, serde_json::Value> = self
            .ssh_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("key{i}"), serde_json::Value::String(k.clone())))
            .collect();
        serde_json::json!({
            "uuid": self.instance_id,
            "hostname": self.hostname,
            "name": self.hostname,
            "public_keys": keys,
        })
    }
}

/// Writes an OpenStack config drive image (ISO 9660, label `config-2`).
pub fn make_config_drive(data: &InstanceData, out: &Path, work: &Path) -> anyhow::Result<()> {
    let tree = work.join("config-drive");
    let latest = tree.join("openstack/latest");
    std::fs::create_dir_all(&latest)?;
    std::fs::write(
        latest.join("meta_data.json"),
        serde_json::to_vec_pretty(&data.meta_data_json())?,
    )?;
    if let Some(u) = &data.user_data {
        std::fs::write(latest.join("user_data"), u)?;
    }
    Cmd::new("genisoimage")
        .args(["-quiet", "-V", "config-2", "-r", "-J", "-o"])
        .arg(out)
        .arg(&tree)
        .run()?;
    Ok(())
}

/// An EC2-style instance metadata service (IMDSv2) on 127.0.0.1, stopped on drop.
/// GETs without a session token are refused, as on EC2 with IMDSv2 required.
pub struct Imds {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TOKEN: &str = "mkimage-imds-session-token";

impl Imds {
    pub fn start(data: InstanceData) -> std::io::Result<Imds> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let data = Arc::new(data);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let d = data.clone();
                    std::thread::spawn(move || {
                        let _ = serve_imds(c, &d);
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
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_imds(mut c: TcpStream, d: &InstanceData) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(c.try_clone()?);
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut token_ok = false;
        let mut length = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "x-aws-ec2-metadata-token" => token_ok = v == TOKEN,
                "content-length" => length = v.parse().unwrap_or(0),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let (status, payload): (&str, Vec<u8>) = match (method, path) {
            ("PUT", "/latest/api/token") => ("200 OK", TOKEN.into()),
            (_, _) if !token_ok => ("401 Unauthorized", Vec::new()),
            ("GET", "/latest/meta-data/instance-id") => ("200 OK", d.instance_id.clone().into()),
            ("GET", "/latest/meta-data/local-hostname") | ("GET", "/latest/meta-data/hostname") => {
                ("200 OK", d.hostname.clone().into())
            }
            ("GET", "/latest/meta-data/public-keys/0/openssh-key") if !d.ssh_keys.is_empty() => {
                ("200 OK", d.ssh_keys[0].clone().into())
            }
            ("GET", "/latest/meta-data/public-keys/") if !d.ssh_keys.is_empty() => {
                ("200 OK", b"0=mkimage".to_vec())
            }
            ("GET", "/latest/user-data") if d.user_data.is_some() => {
                ("200 OK", d.user_data.clone().unwrap_or_default())
            }
            _ => ("404 Not Found", Vec::new()),
        };
        write!(
            c,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
            payload.len()
        )?;
        c.write_all(&payload)?;
        if close {
            return Ok(());
        }
    }
}

/// Copies between stdin/stdout and a TCP address: qemu runs this (`mkimage relay`)
/// for every guest connection to a guest-forwarded address.
pub fn relay(addr: &str) -> std::io::Result<()> {
    let sock = TcpStream::connect(addr)?;
    let mut to_sock = sock.try_clone()?;
    let mut from_sock = sock;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_sock);
        let _ = to_sock.shutdown(std::net::Shutdown::Write);
    });
    // Flush every chunk: stdout is line-buffered, and an answer that does not end
    // in a newline (a token, a TLS record) would otherwise wait for the next one.
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    loop {
        let n = match from_sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    drop(out);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(port: u16, req: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn imds_requires_a_session_token() {
        let mut d = InstanceData::new("h1");
        d.user_data = Some(b"#!/bin/sh\necho hi\n".to_vec());
        d.ssh_keys = vec!["ssh-ed25519 AAAA test".into()];
        let imds = Imds::start(d.clone()).unwrap();
        let p = imds.port();
        let no_token = http(
            p,
            "GET /latest/user-data HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
        let tok = http(p, "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n");
        assert!(tok.ends_with(TOKEN));
        let ud = http(
            p,
            &format!("GET /latest/user-data HTTP/1.1\r\nX-aws-ec2-metadata-token: {TOKEN}\r\nConnection: close\r\n\r\n"),
        );
        assert!(ud.ends_with("echo hi\n"));
        let id = http(
            p,
            &format!("GET /latest/meta-data/instance-id HTTP/1.1\r\nX-aws-ec2-metadata-token: {TOKEN}\r\nConnection: close\r\n\r\n"),
        );
        assert!(id.ends_with(&d.instance_id));
    }

    #[test]
    fn config_drive_is_an_iso_labelled_config_2() {
        let w = tempfile::tempdir().unwrap();
        let mut d = InstanceData::new("h2");
        d.user_data = Some(b"#!/bin/sh\n".to_vec());
        let iso = w.path().join("cd.iso");
        make_config_drive(&d, &iso, w.path()).unwrap();
        let out = std::process::Command::new("blkid")
            .args(["-p", "-s", "LABEL", "-o", "value"])
            .arg(&iso)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config-2");
    }
}
