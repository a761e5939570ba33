//! `moto_server` with its request recorder on, and the recorded requests.
//!
//! The recorder lets a test check what a client sent (actions, headers, bodies), not only
//! the state moto ends up in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::{emulator, free_port, work_dir, Server};

/// A running `moto_server` (EC2, EBS direct, S3) on 127.0.0.1, recording every request.
pub struct Moto {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The port it listens on.
    pub port: u16,
    recording: PathBuf,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts `moto_server` on a free port with the request recorder on and waits until it
    /// answers. `None` when skipped (see [`emulator`]).
    pub async fn start() -> Option<Moto> {
        let bin = emulator("venv-moto", "moto_server")?;
        let dir = work_dir("moto");
        let port = free_port();
        let recording = dir.path().join("recording.jsonl");
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_ENABLE_RECORDING", "true")
            .env("MOTO_RECORDER_FILEPATH", &recording);
        let mut server = Server::spawn("moto_server", cmd, dir.path().join("moto.log"));
        let url = format!("http://127.0.0.1:{port}");
        server
            .wait_http(&format!("{url}/moto-api/"), Duration::from_secs(60))
            .await;
        Some(Moto {
            url,
            port,
            recording,
            _server: server,
            _dir: dir,
        })
    }

    /// Every request recorded so far (moto's `/moto-api/recorder/download-recording`).
    pub async fn recorded(&self) -> Vec<Recorded> {
        let text = reqwest::get(format!("{}/moto-api/recorder/download-recording", self.url))
            .await
            .expect("download-recording")
            .text()
            .await
            .expect("recording text");
        parse_recording(&text)
    }

    /// Empties the recording.
    pub async fn reset_recording(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/reset-recording", self.url))
            .send()
            .await
            .expect("reset-recording");
        assert!(r.status().is_success(), "reset-recording: {}", r.status());
    }

    /// The recorder's file (JSON lines).
    pub fn recording_path(&self) -> &Path {
        &self.recording
    }
}

/// One request moto's recorder saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// The full URL, query included.
    pub url: String,
    /// Request headers as recorded.
    pub headers: BTreeMap<String, String>,
    /// The request body, base64-decoded when moto stored it encoded.
    pub body: Vec<u8>,
}

impl Recorded {
    /// The URL's path, without scheme, host and query.
    pub fn path(&self) -> &str {
        let after_scheme = self.url.split("://").nth(1).unwrap_or(&self.url);
        let p = after_scheme
            .find('/')
            .map(|i| &after_scheme[i..])
            .unwrap_or("/");
        p.split('?').next().unwrap_or(p)
    }

    /// Header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The form parameters of an AWS query-protocol request (EC2).
    pub fn form(&self) -> BTreeMap<String, String> {
        let s = String::from_utf8_lossy(&self.body);
        s.split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (url_decode(k), url_decode(v))
            })
            .collect()
    }

    /// The EC2 query action (`Action=`), if any.
    pub fn action(&self) -> Option<String> {
        self.form().get("Action").cloned()
    }
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The recorder's JSON lines as requests.
fn parse_recording(text: &str) -> Vec<Recorded> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("recording line is JSON");
            let body = match (v.get("body"), v.get("body_encoded")) {
                (Some(Value::String(b)), Some(Value::Bool(true))) => {
                    B64.decode(b).expect("base64 body")
                }
                (Some(Value::String(b)), _) => b.clone().into_bytes(),
                _ => vec![],
            };
            Recorded {
                method: v["method"].as_str().unwrap_or("").to_string(),
                url: v["url"].as_str().unwrap_or("").to_string(),
                headers: v["headers"]
                    .as_object()
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
                body,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_lines_become_requests() {
        let text = concat!(
            r#"{"module": "moto.ec2", "method": "POST", "url": "http://127.0.0.1:5000/?x=1", "#,
            r#""headers": {"Content-Type": "application/x-www-form-urlencoded"}, "#,
            r#""body": "Action=RegisterImage&Name=a+b%2Fc", "body_encoded": false}"#,
            "\n\n",
            r#"{"method": "PUT", "url": "http://127.0.0.1:5000/snapshots/snap-1/blocks/3", "#,
            r#""headers": {}, "body": "AAEC", "body_encoded": true}"#,
            "\n"
        );
        let rec = parse_recording(text);
        assert_eq!(rec.len(), 2);
        assert_eq!(rec[0].path(), "/");
        assert_eq!(rec[0].action().as_deref(), Some("RegisterImage"));
        assert_eq!(rec[0].form()["Name"], "a b/c");
        assert_eq!(
            rec[0].header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(rec[1].method, "PUT");
        assert_eq!(rec[1].path(), "/snapshots/snap-1/blocks/3");
        assert_eq!(rec[1].body, vec![0, 1, 2]);
        assert_eq!(rec[1].action(), None);
    }

    #[test]
    fn url_decode_plus_and_percent() {
        assert_eq!(url_decode("a+b%3Dc%2"), "a b=c%2");
        assert_eq!(url_decode("%41%42"), "AB");
    }
}
