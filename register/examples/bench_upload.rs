//! Benchmark (not a test): what the EBS direct path uploads for a sparse image, and
//! the wall time of EBS direct vs S3 against a local moto_server.
//!
//! cargo run --release -p register --example bench_upload -- [SIZE_MIB DATA_MIB MOTO_SIZE_MIB MOTO_DATA_MIB]
//! Defaults: a 3072 MiB image with 500 MiB of data is scanned with AWS's 512 KiB and
//! moto's 512 B EBS block sizes; the uploads to moto use a 512 MiB image with 8 MiB of
//! data, because moto's 512-byte blocks make one request per 512 bytes.

#[path = "../tests/common/mod.rs"]
mod common;

use common::MotoExt;
use register::{NoProgress, RegisterError, Via};
use std::io::Read;
use std::path::Path;
use std::time::Instant;

const MIB: u64 = 1 << 20;

/// Sparse image of `size_mib` with `data_mib` 1 MiB data extents spread evenly.
fn sparse_image(path: &Path, size_mib: u64, data_mib: u64) {
    let stride = size_mib / data_mib.max(1);
    let regions: Vec<(u64, usize)> = (0..data_mib)
        .map(|i| (i * stride * MIB, MIB as usize))
        .collect();
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib * MIB).unwrap();
    let chunk = common::pattern(MIB as usize, 42);
    for (off, _) in regions {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&chunk).unwrap();
    }
}

/// Non-zero blocks of `block` bytes.
fn nonzero(path: &Path, block: usize) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0;
    loop {
        let mut got = 0;
        while got < buf.len() {
            let r = f.read(&mut buf[got..]).unwrap();
            if r == 0 {
                break;
            }
            got += r;
        }
        if got == 0 {
            break;
        }
        n += buf[..got]
            .chunks(block)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64;
        if got < buf.len() {
            break;
        }
    }
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a: Vec<u64> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("numbers in MiB"))
        .collect();
    let get = |i: usize, d: u64| a.get(i).copied().unwrap_or(d);
    let (size, data, msize, mdata) = (get(0, 3072), get(1, 500), get(2, 512), get(3, 8));
    let dir = tempfile::tempdir().unwrap();

    let big = dir.path().join("big.img");
    sparse_image(&big, size, data);
    println!("image: {size} MiB, {data} MiB of data");
    for bs in [524_288usize, 512] {
        let t = Instant::now();
        let n = nonzero(&big, bs);
        let up = n * bs as u64;
        println!(
            "  EBS block {bs:>6} B: {n} non-zero blocks, {:.1} MiB uploaded = {:.1}% of the image (scan {:.2} s)",
            up as f64 / MIB as f64,
            100.0 * up as f64 / (size * MIB) as f64,
            t.elapsed().as_secs_f64()
        );
    }
    std::fs::remove_file(&big).unwrap();

    let small = dir.path().join("moto.img");
    sparse_image(&small, msize, mdata);
    let moto = common::Moto::start()
        .await
        .expect("moto_server (MKIMAGE_SKIP_EMULATORS=1 and it is missing)");
    let base = moto.ec2_options();
    let c = register::ec2::clients(&base).await.unwrap();
    c.s3.create_bucket().bucket("bench").send().await.unwrap();
    println!("moto: image {msize} MiB with {mdata} MiB of data");

    let info = common::image_info(&small, "bench-ebs", "bench-1");
    let t = Instant::now();
    let r = register::register_ec2(&info, &base, &NoProgress)
        .await
        .expect("EBS direct");
    let ebs_s = t.elapsed().as_secs_f64();
    println!(
        "  EBS direct: {:.2} s, {} blocks of {} B uploaded ({:.1} MiB), {} skipped",
        ebs_s,
        r.blocks_uploaded,
        r.block_size.unwrap_or(0),
        r.bytes_uploaded as f64 / MIB as f64,
        r.blocks_skipped
    );

    let info = common::image_info(&small, "bench-s3", "bench-2");
    let opts = register::Ec2Options {
        via: Via::S3 {
            bucket: "bench".into(),
        },
        parallelism: 4,
        ..base.clone()
    };
    let t = Instant::now();
    let e = register::register_ec2(&info, &opts, &NoProgress)
        .await
        .expect_err("moto has no ImportSnapshot");
    let s3_s = t.elapsed().as_secs_f64();
    assert!(
        matches!(e.root(), RegisterError::NotImplemented { .. }),
        "{e}"
    );
    println!("  S3 multipart (whole file, {msize} MiB) + ImportSnapshot call: {s3_s:.2} s");
}
