//! Test helpers of the register tests.
//!
//! The cloud emulators themselves (moto with its request recorder, Keystone, Glance) are the
//! workspace's `emulators` crate (`tests/emulators/`), shared with the runtime driver tests;
//! they are re-exported here. What stays is what only these tests need: sparse test images,
//! and helpers built on `register`'s types ([`MotoExt::ec2_options`], [`image_info`],
//! [`CountingProgress`]), which the shared crate must not depend on.
// Each test binary (and the bench example) uses a part of this module.
#![allow(dead_code, unused_imports)]

pub use emulators::{Glance, Keystone, Moto, Recorded, ADMIN_PASSWORD, REGION};

use std::fs;
use std::path::Path;
use std::time::Duration;

/// What the register tests need of a [`Moto`] beyond the shared harness.
pub trait MotoExt {
    /// Options that point the library at this server.
    fn ec2_options(&self) -> register::Ec2Options;
}

impl MotoExt for Moto {
    fn ec2_options(&self) -> register::Ec2Options {
        register::Ec2Options {
            endpoint_url: Some(self.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some(register::StaticCredentials {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
                session_token: None,
            }),
            poll_interval: Duration::from_millis(100),
            wait_timeout: Duration::from_secs(60),
            max_attempts: Some(1),
            ..register::Ec2Options::default()
        }
    }
}

// ---------------------------------------------------------------- images

/// Deterministic non-zero bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// A sparse test image: `size` bytes, with data written at `(offset, len)` regions.
pub fn make_image(path: &Path, size: u64, regions: &[(u64, usize)]) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in regions.iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(&pattern(*len, 0x9e37_79b9 + i as u64)).unwrap();
    }
    drop(f);
    fs::read(path).unwrap()
}

/// (index, data) of the non-zero `block`-sized blocks (last one zero-padded).
pub fn nonzero_blocks(data: &[u8], block: usize) -> Vec<(usize, Vec<u8>)> {
    data.chunks(block)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, c)| {
            let mut v = c.to_vec();
            v.resize(block, 0);
            (i, v)
        })
        .collect()
}

/// An [`register::ImageInfo`] for a raw x86_64 image at `path`.
pub fn image_info(path: &Path, name: &str, build_id: &str) -> register::ImageInfo {
    register::ImageInfo {
        path: path.to_path_buf(),
        name: name.into(),
        description: Some(format!("test image {name}")),
        arch: "x86_64".into(),
        disk_format: "raw".into(),
        md5: None,
        sha256: None,
        build_id: build_id.into(),
    }
}

/// A [`register::Progress`] that adds up what it is told.
#[derive(Default)]
pub struct CountingProgress {
    pub started: std::sync::Mutex<Vec<(String, u64)>>,
    pub advanced: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
}

impl register::Progress for CountingProgress {
    fn start(&self, what: &str, total_bytes: u64) {
        self.started
            .lock()
            .unwrap()
            .push((what.to_string(), total_bytes));
    }
    fn advance(&self, bytes: u64) {
        self.advanced
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
    fn finish(&self) {
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
