//! Checks before a build touches anything: privileges, host tools, and whether the
//! mirror carries the requested release — so a doomed build fails in a second, not
//! after ten minutes of work.

use crate::recipe::Recipe;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PreflightError(pub String);

pub fn check(recipe: &Recipe) -> Result<(), PreflightError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(PreflightError(
            "building an image needs root (debootstrap and chroot); run it with sudo".into(),
        ));
    }
    let missing: Vec<String> = crate::host::fsutil::BUILD_TOOLS
        .iter()
        .filter(|(tool, _)| crate::host::fsutil::which(tool).is_none())
        .map(|(tool, pkg)| format!("{tool} (package {pkg})"))
        .collect();
    if !missing.is_empty() {
        return Err(PreflightError(format!(
            "host tools missing: {}; install them with: apt-get install {}",
            missing.join(", "),
            crate::host::fsutil::BUILD_TOOLS
                .iter()
                .filter(|(t, _)| crate::host::fsutil::which(t).is_none())
                .map(|(_, p)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        )));
    }
    check_mirror_has_dist(&recipe.mirror, &recipe.dist)
}

/// Asks the mirror for `dists/DIST/Release` (HEAD over plain HTTP).
pub fn check_mirror_has_dist(mirror: &str, dist: &str) -> Result<(), PreflightError> {
    let Some(rest) = mirror.strip_prefix("http://") else {
        // Only plain HTTP is probed here; other schemes are left to apt.
        return Ok(());
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let url = format!("{}/dists/{dist}/Release", mirror.trim_end_matches('/'));
    let unreachable = |why: String| {
        PreflightError(format!(
            "the mirror {mirror} cannot be reached ({why}) while checking {url}"
        ))
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(10))
        .map_err(|e| unreachable(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok();
    let req_path = format!("{}/dists/{dist}/Release", path.trim_end_matches('/'));
    let host = hostport.split(':').next().unwrap_or(hostport);
    write!(s, "HEAD {req_path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mkimage\r\nConnection: close\r\n\r\n")
        .map_err(|e| unreachable(e.to_string()))?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).map_err(|e| unreachable(e.to_string()))?;
    let head = String::from_utf8_lossy(&buf[..n]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            unreachable(format!(
                "unexpected answer {:?}",
                head.lines().next().unwrap_or("")
            ))
        })?;
    match status {
        200..=399 => Ok(()),
        404 | 410 => Err(PreflightError(format!(
            "the mirror {mirror} does not carry the Debian release `{dist}` ({url} answers {status}); \
             releases before bullseye are only on archive mirrors: set `mirror` (or debian_mirror) to one, or choose a current dist"
        ))),
        s => Err(unreachable(format!("HTTP {s}"))),
    }
}

/// Every extra repository a service recipe declares must answer before the build
/// starts: a service whose packages cannot be had fails here, naming the service
/// and the repository, not after ten minutes of work.
pub fn check_repositories(planned: &[crate::plan::Planned]) -> Result<(), PreflightError> {
    for p in planned {
        let crate::stage::Stage::Service(s) = &p.stage else {
            continue;
        };
        for repo in &s.recipe.repositories {
            let url = crate::service::release_url(repo);
            let out = std::process::Command::new("curl")
                .args([
                    "-fsSI",
                    "--max-time",
                    "15",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(&url)
                .output();
            let why = match out {
                Ok(o) if o.status.success() => continue,
                Ok(o) => {
                    let code = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    if err.is_empty() {
                        format!("HTTP {code}")
                    } else {
                        err
                    }
                }
                Err(e) => format!("cannot run curl: {e} (install the Debian package `curl`)"),
            };
            return Err(PreflightError(format!(
                "service `{}` needs the repository `{}` ({}), which cannot be reached: {why}; \
                 nothing was built. Its packages are not in Debian's archive: make the repository \
                 reachable (or mirror it and point recipes/{}.toml at the mirror), or drop the service",
                s.recipe.name, repo.name, repo.uri, s.recipe.name
            )));
        }
    }
    Ok(())
}
