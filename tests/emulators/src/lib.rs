//! Real cloud emulators for the workspace's tests, each started on a free 127.0.0.1 port.
//!
//! * [`Moto`]: `moto_server` (EC2, EBS direct, S3) with moto's request recorder on, whose
//!   requests come back as [`Recorded`];
//! * [`Keystone`]: a real Keystone (sqlite, fernet tokens) under gunicorn;
//! * [`Glance`]: a real Glance (sqlite, file store, `flavor = keystone`) under gunicorn,
//!   registered in a [`Keystone`].
//!
//! Why a crate: the `register` tests (uploads to EC2 and Glance) and the `runtime` driver
//! tests (the `ec2` and `openstack` cloud drivers) start the same servers the same way, and
//! each had its own copy of this harness. With one copy, a fix to how a server is
//! configured, started, waited for or stopped reaches both. What only one side needs (types
//! of `register` or `runtime`, an AWS SDK client, the fixture-based Nova stand-in) stays in
//! that crate's test modules, so this crate depends on neither.
//!
//! The venvs come from `tests/harness/setup-emulators.sh`, under `$MKIMAGE_EMULATORS`
//! (default `/opt/mkimage-emulators`). A missing emulator fails the test with the fix in the
//! message, unless `MKIMAGE_SKIP_EMULATORS=1`: then the `start` functions return `None` and
//! the test should return (see [`emulator`]). Every server runs in its own process group,
//! which Drop kills ([`Server`]), also when the test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

mod glance;
mod keystone;
mod moto;
mod server;

pub use glance::Glance;
pub use keystone::{Keystone, ADMIN_PASSWORD, REGION};
pub use moto::{url_decode, Moto, Recorded};
pub use server::Server;

/// Where the emulator venvs are: `$MKIMAGE_EMULATORS`, default `/opt/mkimage-emulators`.
pub fn emulators_root() -> PathBuf {
    std::env::var_os("MKIMAGE_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mkimage-emulators"))
}

/// A program of an emulator venv (`<root>/<venv>/bin/<program>`).
///
/// `None` (the test should return) only when it is missing and `MKIMAGE_SKIP_EMULATORS=1`;
/// missing otherwise panics with a message naming `tests/harness/setup-emulators.sh`.
pub fn emulator(venv: &str, program: &str) -> Option<PathBuf> {
    venv_file(venv, &Path::new("bin").join(program))
}

/// A file of an emulator venv, with the missing/skip handling of [`emulator`].
fn venv_file(venv: &str, rel: &Path) -> Option<PathBuf> {
    let p = emulators_root().join(venv).join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("MKIMAGE_SKIP_EMULATORS").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: {} not found and MKIMAGE_SKIP_EMULATORS=1",
            p.display()
        );
        return None;
    }
    panic!(
        "{} not found: run tests/harness/setup-emulators.sh (as root) to install the cloud \
         emulators, point MKIMAGE_EMULATORS at them, or set MKIMAGE_SKIP_EMULATORS=1 to skip \
         this test",
        p.display()
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A temp dir `<name>-XXXX` for one server's configuration, data and log, removed on Drop.
fn work_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .expect("tempdir")
}

/// Runs a set-up command to completion; panics with its output on failure.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
