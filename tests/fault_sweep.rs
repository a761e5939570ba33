//! The fault sweep: for every stage of a full build (helloworld, optimize, so every
//! stage type runs), a build that fails in that stage, and builds stopped in it by
//! SIGINT, SIGTERM and SIGKILL at a random moment (then `mkimage gc`). After each:
//! nothing of ours mounted or attached, no process of the build alive, no partial
//! output, no work directory, no half-written cache entry; and a rerun succeeds.
//!
//! `--rebuild-from STAGE` makes the stage run even though the cache holds it.
//! Random delays come from a seed printed at the start; set `FAULT_SWEEP_SEED` to
//! replay a run, `FAULT_SWEEP_STAGES=kernel,optimize` to sweep only some stages.

use e2e::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STAGES: [&str; 12] = [
    "debootstrap",
    "system",
    "kernel",
    "core",
    "service-helloworld",
    "optimize",
    "cloud",
    "finalize",
    "bootloader",
    "resize",
    "assemble",
    // Not a stage: the step that converts, hashes and renames the output.
    "output",
];

/// xorshift64*: enough randomness for kill times, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.next() % (max + 1))
    }
}

fn build(sb: &Sandbox, stage: &str) -> Command {
    let mut c = sb.build();
    c.arg("--recipe")
        .arg(fixture("recipes/good/minimal.toml"))
        .args(["--services", "helloworld", "--optimize", "true"])
        .args(["--size", "1536M", "--output", "sweep.img"]);
    if stage != "output" {
        c.args(["--rebuild-from", stage]);
    }
    c
}

/// The longest a stage may run before the kill, past its start: long enough to land
/// inside mmdebstrap or apt for the slow stages.
fn kill_window_ms(stage: &str) -> u64 {
    match stage {
        "debootstrap" => 15_000,
        "kernel" | "optimize" | "core" => 6_000,
        _ => 2_500,
    }
}

fn journals(state: &Path) -> Vec<String> {
    files_in(&state.join("journal"))
        .into_iter()
        .filter(|f| f.ends_with(".journal"))
        .collect()
}

/// Processes whose environment carries this build's journal marker.
fn marked_processes(id: &str) -> Vec<String> {
    let needle = format!("MKIMAGE_JOURNAL={id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            format!("{pid} {}", comm.trim())
        })
        .collect()
}

fn cache_temps_of(pid: u32) -> Vec<String> {
    let dir = mkimage::build::default_cache_dir();
    files_in(&dir)
        .into_iter()
        .filter(|f| f.starts_with(".tmp-") && f.contains(&format!("-{pid}-")))
        .collect()
}

/// Everything a stopped build must not leave behind.
fn assert_nothing_left(sb: &Sandbox, pid: u32, what: &str) {
    assert_clean(sb.path());
    let left: Vec<String> = files_in(&sb.out())
        .into_iter()
        .filter(|f| !f.ends_with(".build.log"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{what}: output left");
    assert_eq!(
        files_in(&sb.state().join("work")),
        Vec::<String>::new(),
        "{what}: work directory left"
    );
    assert_eq!(
        journals(&sb.state()),
        Vec::<String>::new(),
        "{what}: journal left"
    );
    assert_eq!(
        cache_temps_of(pid),
        Vec::<String>::new(),
        "{what}: half-written cache entry left"
    );
}

/// Starts a build paused in `stage`, waits for the stage to start, then signals it
/// at a random moment. Returns the exit status and stderr.
fn interrupt(
    sb: &Sandbox,
    stage: &str,
    sig: &str,
    rng: &mut Rng,
) -> (std::process::ExitStatus, String, u32) {
    let mut child = build(sb, stage)
        .env("MKIMAGE_TEST_PAUSE_STAGE", stage)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    // The stage's start line, or for `output` the pause marker.
    let start_marker = if stage == "output" {
        "mkimage-test: paused in output".to_string()
    } else {
        format!("] {stage}: ")
    };
    let t = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(line) if line.contains(&start_marker) && !line.contains("cache hit") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{stage}/{sig}: the stage never started ({e:?})")
            }
        }
    }
    let delay = rng.millis(kill_window_ms(stage));
    std::thread::sleep(delay);
    eprintln!(
        "{stage}/{sig}: signal {:.1} s after the stage started ({:.1} s into the build)",
        delay.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    (status, err, pid)
}

#[test]
fn every_stage_fails_and_is_interrupted_cleanly() {
    let _g = heavy();
    let seed = std::env::var("FAULT_SWEEP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fault sweep seed {seed} (FAULT_SWEEP_SEED={seed} replays the kill times)");
    let mut rng = Rng(seed);
    let only: Option<Vec<String>> = std::env::var("FAULT_SWEEP_STAGES")
        .ok()
        .map(|s| s.split(',').map(str::to_owned).collect());

    // Warm the cache so that each case runs only from its stage on.
    let warm = Sandbox::new();
    let out = run(&mut build(&warm, "output"));
    assert!(out.status.success(), "warm-up build failed");
    drop(warm);

    let started = Instant::now();
    for stage in STAGES {
        if only.as_ref().is_some_and(|o| !o.iter().any(|s| s == stage)) {
            continue;
        }
        // 1. An injected failure.
        let sb = Sandbox::new();
        let mut c = build(&sb, stage);
        c.env("MKIMAGE_TEST_FAIL_STAGE", stage);
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stage}/fail: {err}");
        assert!(err.contains("injected failure"), "{stage}/fail: {err}");
        assert_nothing_left(&sb, pid, &format!("{stage}/fail"));

        // 2. SIGINT and SIGTERM: the build unwinds by itself and exits 130.
        for sig in ["INT", "TERM"] {
            let sb = Sandbox::new();
            let (status, err, pid) = interrupt(&sb, stage, sig, &mut rng);
            assert_eq!(status.code(), Some(130), "{stage}/{sig}: {err}");
            assert!(err.contains("interrupted"), "{stage}/{sig}: {err}");
            assert_nothing_left(&sb, pid, &format!("{stage}/{sig}"));
        }

        // 3. SIGKILL: nothing can run in the build; its journal tells `gc` what to
        //    release, and the next build warns about it.
        let sb = Sandbox::new();
        let (status, err, pid) = interrupt(&sb, stage, "KILL", &mut rng);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{stage}/KILL: {err}");
        let left = journals(&sb.state());
        assert_eq!(left.len(), 1, "{stage}/KILL: the journal must survive");
        let id = left[0].trim_end_matches(".journal").to_owned();
        let plan = run(mkimage()
            .args(["gc", "--dry-run"])
            .env("MKIMAGE_STATE_DIR", sb.state()));
        assert!(plan.status.success());
        assert!(String::from_utf8_lossy(&plan.stdout).contains(&format!("build {id}")));
        let gc = run(mkimage().arg("gc").env("MKIMAGE_STATE_DIR", sb.state()));
        assert!(gc.status.success(), "{stage}/KILL: gc failed");
        assert_eq!(
            marked_processes(&id),
            Vec::<String>::new(),
            "{stage}/KILL: processes of the killed build survive gc"
        );
        assert_nothing_left(&sb, pid, &format!("{stage}/KILL + gc"));
        let again = run(mkimage().arg("gc").env("MKIMAGE_STATE_DIR", sb.state()));
        assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to collect"));

        // 4. The next build in the same state dir succeeds.
        let out = run(&mut build(&sb, "output"));
        assert!(
            out.status.success(),
            "{stage}: rerun after the faults failed"
        );
        assert!(sb.out().join("sweep.img").exists());
        assert_clean(sb.path());
        eprintln!(
            "{stage}: fail, INT, TERM, KILL+gc, rerun: clean ({:.0} s so far)",
            started.elapsed().as_secs_f64()
        );
    }
}

/// A build that finds a dead build's journal warns about it before starting.
#[test]
fn a_build_warns_about_a_dead_builds_journal() {
    let sb = Sandbox::new();
    let dir = sb.state().join("journal");
    std::fs::create_dir_all(&dir).unwrap();
    let work = sb.state().join("work/deadbeef0000");
    std::fs::create_dir_all(work.join("rootfs/etc")).unwrap();
    std::fs::write(
        dir.join("deadbeef0000.journal"),
        format!(
            "{{\"op\":\"begin\",\"id\":\"deadbeef0000\",\"pid\":0,\"start_time\":1,\"command\":\"mkimage build\",\"started\":\"2026-01-01T00:00:00Z\"}}\n\
             {{\"op\":\"acquire\",\"n\":1,\"kind\":\"dir\",\"path\":\"{}\"}}\n",
            work.display()
        ),
    )
    .unwrap();
    // `--dry-run` only plans, so use a recipe that fails preflight fast: the warning
    // comes first either way.
    let out = run(sb
        .build()
        .args(["--recipe"])
        .arg(fixture("recipes/good/minimal.toml"))
        .args(["--mirror", "http://127.0.0.1:9/debian"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("run `mkimage gc`"), "{err}");
    let gc = run(mkimage().arg("gc").env("MKIMAGE_STATE_DIR", sb.state()));
    assert!(gc.status.success());
    assert!(String::from_utf8_lossy(&gc.stdout).contains("removed"));
    assert!(!work.exists());
    assert!(journals(&sb.state()).is_empty());
}
