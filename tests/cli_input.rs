//! Bad input: every file in fixtures/*/bad is refused with exit code 2, an error
//! naming the file, line and key, and nothing written.

use e2e::*;
use std::path::Path;

/// The `# expect:` line at the top of a bad fixture.
fn expectation(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("# expect:"))
        .unwrap_or_else(|| panic!("{} has no `# expect:` first line", path.display()))
        .trim()
        .to_owned()
}

fn check_bad(dir: &str, flag: &str) {
    let mut n = 0;
    for e in std::fs::read_dir(fixture(dir)).unwrap().flatten() {
        let path = e.path();
        let sb = Sandbox::new();
        let out = run(sb.build().arg(flag).arg(&path));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: expected exit code 2",
            path.display()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            err.contains(&name),
            "{name}: error does not name the file: {err}"
        );
        let want = expectation(&path);
        // The expectation reads `line N: key `K`: message`; each part must appear.
        for part in want.split(": ") {
            let needle = match part.strip_prefix("line ") {
                Some(n) => format!("{name}:{n}: "),
                None => part.to_owned(),
            };
            assert!(
                err.contains(&needle),
                "{name}: error lacks `{needle}`: {err}"
            );
        }
        assert!(!sb.out().exists(), "{name}: output dir was created");
        assert!(!sb.state().exists(), "{name}: state dir was created");
        n += 1;
    }
    assert!(n >= 7, "too few bad fixtures in {dir}");
}

#[test]
fn bad_legacy_cfgs_are_refused_with_file_line_key() {
    check_bad("cfg/bad", "--config");
}

#[test]
fn bad_recipes_are_refused_with_file_line_key() {
    check_bad("recipes/bad", "--recipe");
}

#[test]
fn bad_overrides_name_the_flag() {
    let sb = Sandbox::new();
    let out = run(sb.build().args(["--cloud", "azure"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("command line") && err.contains("--cloud"),
        "{err}"
    );
    assert!(!sb.out().exists());
}

#[test]
fn the_original_default_cfg_plans_with_its_rules() {
    let out = run(mkimage()
        .arg("plan")
        .arg("--config")
        .arg(fixture("cfg/good/ec2-kvm.cfg")));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning:") && text.to_lowercase().contains("xen"),
        "{text}"
    );
    assert!(
        text.contains("menu.lst"),
        "ec2 plan has no PV-GRUB menu: {text}"
    );
}

#[test]
fn a_dist_the_mirror_no_longer_carries_plans_but_fails_at_preflight() {
    let cfg = fixture("cfg/good/jessie.cfg");
    let plan = run(mkimage().arg("plan").arg("--config").arg(&cfg));
    assert!(plan.status.success(), "jessie must plan");
    assert!(String::from_utf8_lossy(&plan.stdout).contains("jessie"));
    // Build against the host's own mirror, which carries only current releases.
    let mirror = mkimage::recipe::HostFacts::detect()
        .mirror
        .expect("host has an apt mirror");
    let sb = Sandbox::new();
    let t = std::time::Instant::now();
    let out = run(sb
        .build()
        .arg("--config")
        .arg(&cfg)
        .arg("--mirror")
        .arg(&mirror));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("preflight") && err.contains("jessie") && err.contains(&mirror),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 30, "preflight should fail fast");
    assert!(!sb.state().join("work").exists() || files_in(&sb.state().join("work")).is_empty());
    assert!(files_in(&sb.out()).iter().all(|f| !f.ends_with(".img")));
}

#[test]
fn schema_is_json_and_verify_rejects_malformed_digests() {
    let out = run(mkimage().arg("schema"));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["properties"]["cloud"].is_object() || v.to_string().contains("cloud"));
    let f = tempfile::NamedTempFile::new().unwrap();
    let out = run(mkimage().arg("verify").arg(f.path()).args(["--md5", "xyz"]));
    assert_eq!(out.status.code(), Some(2));
}

/// The original's four `[NUTSHELL]` flag cases each plan the build they stand for
/// (the builds themselves are run by build_boot, agent_vm and nutshell).
#[test]
fn the_four_legacy_nutshell_flag_cases_plan_their_layouts() {
    for (cfg, expect, embedded) in [
        ("cfg/good/vm.cfg", "(Disk layout", None),
        ("cfg/good/container.cfg", "(Container layout", None),
        (
            "cfg/good/nutshell-container.cfg",
            "Plan for nutshell.img (Nutshell layout",
            Some("embedded container image"),
        ),
        (
            "cfg/good/nutshell-vm.cfg",
            "Plan for nutshell.img (Nutshell layout",
            Some("embedded VM image"),
        ),
    ] {
        let out = run(mkimage().arg("plan").arg("--config").arg(fixture(cfg)));
        assert!(out.status.success(), "{cfg}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(expect), "{cfg}: {text}");
        match embedded {
            Some(e) => {
                assert!(text.contains(e), "{cfg}: {text}");
                assert!(text.contains("nutshell     ["), "{cfg}: {text}");
            }
            None => assert!(!text.contains("embedded"), "{cfg}: {text}"),
        }
    }
}
