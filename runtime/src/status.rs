//! The manager's read-only status page: plain HTTP on 127.0.0.1 only (`STATUS_PORT`), one
//! page (`GET /`) with the service type, the state and its log, the nodes (role, address) and
//! the last lines of the manager log. While the service is changing (PROLOGUE, ADAPTING,
//! EPILOGUE) the page reloads itself every 2 seconds. Every value is HTML-escaped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use crate::manager::{Manager, State};

/// Log lines shown.
pub const LOG_LINES: usize = 30;

/// Binds 127.0.0.1:`port` (0: ephemeral) and serves the page in a background task.
pub async fn serve(manager: Arc<Manager>, port: u16) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding the status page on 127.0.0.1:{port}"))?;
    let addr = l.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let m = manager.clone();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            (header::CACHE_CONTROL, "no-store"),
                        ],
                        page(&m).await,
                    )
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found").into_response() });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::warn!("status page stopped: {e}");
        }
    });
    tracing::info!("status page on http://{addr}/");
    Ok(addr)
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn fmt_time(t: f64) -> String {
    let secs = t as i64;
    let (d, s) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil date from days since 1970-01-01 (Howard Hinnant's algorithm)
    let z = d + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

async fn last_lines(path: &std::path::Path, n: usize) -> String {
    let text = tokio::fs::read(path).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The page.
pub async fn page(m: &Manager) -> String {
    let state = m.state();
    let changing = matches!(state, State::PROLOGUE | State::ADAPTING | State::EPILOGUE);
    let log = last_lines(&m.log_file, LOG_LINES).await;
    let mut h = String::new();
    let e = escape;
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    if changing {
        h.push_str("<meta http-equiv=\"refresh\" content=\"2\">\n");
    }
    let _ = write!(
        h,
        "<title>{} manager: {state}</title>\n<style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1em}}\
         td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:left}}\
         .state{{font-weight:bold;padding:.1em .4em;border-radius:.3em;background:#eee}}\
         .RUNNING{{background:#c8f0c8}}.ADAPTING,.PROLOGUE,.EPILOGUE{{background:#fff0b0}}\
         .ERROR{{background:#f6c0c0}}pre{{background:#f4f4f4;padding:.5em;overflow:auto}}\
         </style></head><body>\n",
        e(&m.service_type)
    );
    let _ = write!(
        h,
        "<h1>Service <span id=\"type\">{}</span></h1>\n<p>State: <span id=\"state\" class=\"state {state}\">{state}</span>{}</p>\n",
        e(&m.service_type),
        if changing {
            " <small id=\"refresh\">(this page reloads every 2 s)</small>"
        } else {
            ""
        }
    );
    let nodes = m.nodes();
    let _ = write!(h, "<h2>Nodes ({})</h2>\n<table id=\"nodes\"><tr><th>id</th><th>role</th><th>address</th><th>cloud</th><th>name</th></tr>\n", nodes.len());
    for n in &nodes {
        let _ = writeln!(
            h,
            "<tr class=\"node\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&n.id),
            e(&n.role),
            e(&n.addr()),
            e(&n.cloud),
            e(&n.name)
        );
    }
    h.push_str("</table>\n<h2>State log</h2>\n<table id=\"state-log\"><tr><th>time</th><th>state</th><th>reason</th></tr>\n");
    for s in m.state_log().iter().rev() {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            fmt_time(s.time),
            s.state,
            e(&s.reason)
        );
    }
    let _ = write!(
        h,
        "</table>\n<h2>Manager log (last {LOG_LINES} lines)</h2>\n<pre id=\"log\">{}</pre>\n</body></html>\n",
        e(&log)
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_dates() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(fmt_time(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(1_764_072_000.0), "2025-11-25 12:00:00 UTC");
    }
}
