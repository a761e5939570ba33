//! The manager's status page in a real browser (headless Chromium): hostile text shown as
//! text, ADAPTING while nodes are being added (one of them never answers, so the state lasts
//! BOOT_TIMEOUT), then RUNNING with the nodes listed. Screenshots are kept under the target
//! directory.
//!
//! Chromium is required (Debian package `chromium`); `MKIMAGE_SKIP_BROWSER=1` skips the test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtime::manager::State;
use runtime::testkit::TestManager;
use serde_json::json;

const CPS: &str = env!("CARGO_BIN_EXE_cps");

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|b| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(b))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

/// Runs headless Chromium with `args` + `url` in its own process group, killed (the whole
/// group) after 60 s or when done; returns stdout.
fn browse(bin: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .process_group(0);
    let child = cmd.spawn().expect("start chromium");
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(60));
    // helpers chromium forked (zygote, GPU, utility) go too
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let out = out
        .expect("chromium finished within 60 s")
        .expect("chromium ran");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_adapting_then_running_in_chromium() {
    let Some(bin) = chromium() else {
        if std::env::var("MKIMAGE_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("chromium not found; skipped (MKIMAGE_SKIP_BROWSER=1)");
            return;
        }
        panic!(
            "chromium is not installed: the status page test needs headless Chromium \
             (apt-get install chromium), or set MKIMAGE_SKIP_BROWSER=1 to skip it"
        );
    };
    let m = TestManager::start(
        "helloworld",
        CPS,
        "STARTING_NODES = 0\nSTATUS_PORT = 0\nLOCAL_DEAD_NODES = 1\nBOOT_TIMEOUT = 15",
    )
    .await
    .unwrap();
    let port = m.status_port.expect("status port in ports.json");
    let url = format!("http://127.0.0.1:{port}/");
    let art = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&art).unwrap();
    let profile = tempfile::tempdir().unwrap();

    // hostile text reaches the page (state log reason and log lines) as text only
    // (An unknown cloud is refused before any state change; the refusal is logged.)
    let refused = m
        .post(
            "startup",
            json!({"cloud": "<b id=\"xss\">x</b><script>document.title='owned'</script>"}),
        )
        .await;
    assert!(refused.is_err());
    assert_eq!(m.state(), State::INIT);
    let dom = {
        let (b, p, u) = (bin.clone(), profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || browse(&b, &p, &["--dump-dom"], &u))
            .await
            .unwrap()
    };
    assert!(dom.contains(r#"class="state INIT""#), "{dom}");
    assert!(
        dom.contains("Unknown cloud '&lt;b id=\"xss\"&gt;x&lt;/b&gt;&lt;script&gt;"),
        "escaped: {dom}"
    );
    assert!(
        !dom.contains("<b id=\"xss\">")
            && !dom.contains("<script>")
            && dom.contains("<title>helloworld manager: INIT</title>"),
        "{dom}"
    );

    m.post("startup", json!({})).await.unwrap();
    m.wait_state(State::RUNNING).await.unwrap();
    // the first new node never answers: ADAPTING lasts until it is replaced
    m.post("add_nodes", json!({"nodes": {"node": 2}}))
        .await
        .unwrap();
    assert_eq!(m.state(), State::ADAPTING);
    let dom = {
        let (b, p, u) = (bin.clone(), profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || browse(&b, &p, &["--dump-dom"], &u))
            .await
            .unwrap()
    };
    assert_eq!(
        m.state(),
        State::ADAPTING,
        "still adapting after the page was read"
    );
    assert!(
        dom.contains(r#"<span id="state" class="state ADAPTING">ADAPTING</span>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"http-equiv="refresh""#),
        "reloads itself: {dom}"
    );
    assert!(
        dom.contains("Adding 2 node(s)") || dom.contains("ADAPTING"),
        "{dom}"
    );
    let shot = art.join("status-adapting.png");
    let _ = std::fs::remove_file(&shot);
    {
        let (b, p, u) = (bin.clone(), profile.path().to_path_buf(), url.clone());
        let s = format!("--screenshot={}", shot.display());
        tokio::task::spawn_blocking(move || browse(&b, &p, &[&s, "--window-size=1024,768"], &u))
            .await
            .unwrap();
    }

    m.wait_state(State::RUNNING).await.unwrap();
    let start = Instant::now();
    let dom = {
        let (b, p, u) = (bin.clone(), profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || browse(&b, &p, &["--dump-dom"], &u))
            .await
            .unwrap()
    };
    assert!(
        dom.contains(r#"<span id="state" class="state RUNNING">RUNNING</span>"#),
        "{dom}"
    );
    assert!(
        !dom.contains(r#"http-equiv="refresh""#),
        "no reload when RUNNING"
    );
    assert!(
        dom.contains(r#"<span id="type">helloworld</span>"#),
        "{dom}"
    );
    let nodes: Vec<_> = m.running.manager.nodes();
    assert_eq!(nodes.len(), 2);
    for n in &nodes {
        let row = format!(
            "<tr class=\"node\"><td>{}</td><td>node</td><td>127.0.0.1:{}</td>",
            n.id, n.port
        );
        assert!(dom.contains(&row), "{row} in {dom}");
    }
    assert!(!dom.contains("<td>iaas1</td>"), "the dead node is gone");
    for s in ["INIT", "PROLOGUE", "ADAPTING", "RUNNING"] {
        assert!(dom.contains(&format!("<td>{s}</td>")), "state log has {s}");
    }
    assert!(
        dom.contains("never answered; deleting it"),
        "log tail: {dom}"
    );

    let shot = art.join("status-running.png");
    let _ = std::fs::remove_file(&shot);
    {
        let (b, p, u) = (bin.clone(), profile.path().to_path_buf(), url.clone());
        let s = format!("--screenshot={}", shot.display());
        tokio::task::spawn_blocking(move || browse(&b, &p, &[&s, "--window-size=1024,900"], &u))
            .await
            .unwrap();
    }
    for f in ["status-adapting.png", "status-running.png"] {
        let p = art.join(f);
        let png = std::fs::read(&p).unwrap_or_default();
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG"),
            "{} is a non-empty PNG",
            p.display()
        );
        println!("screenshot: {}", p.display());
    }
    eprintln!("browser part after RUNNING took {:?}", start.elapsed());

    // only 127.0.0.1, plain HTTP, read-only
    let c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(c.is_ok());
    let resp = http_request(
        port,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp = http_request(
        port,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

async fn http_request(port: u16, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
