//! `mkimage service new`: a copy of the workspace's sources gets a new service `demo`, whose
//! generated test then passes there (`cargo test -p runtime --test service_demo`).
//!
//! The copy lives in `<target>/scaffold-test/ws` (recreated each run, a stable path so the
//! build of the copy's `runtime` crate replaces the previous one); it builds into
//! `<target>/scaffold-test`, seeded once with hard links to this target directory's
//! dependencies so only the workspace crates compile (`runtime` for the generated tests,
//! `register` and `mkimage` for the built-in recipe check; about a minute and a half).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MKIMAGE: &str = env!("CARGO_BIN_EXE_mkimage");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Copies the sources of `from` to `to`: everything but `target/`, `.git` and other
/// dot-directories at the top.
fn copy_sources(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "target" || n.starts_with('.') && from == workspace() && n != ".ci" {
            continue;
        }
        let ty = e.file_type().unwrap();
        let dest = to.join(&name);
        if ty.is_dir() {
            copy_sources(&e.path(), &dest);
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn mkimage(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(MKIMAGE)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run mkimage")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn new_service_is_generated_registered_and_its_test_passes() {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let base = target.join("scaffold-test");
    let ws = base.join("ws");
    let _ = std::fs::remove_dir_all(&ws);
    copy_sources(&workspace(), &ws);
    assert!(!ws.join(".git").exists() && ws.join("Cargo.lock").exists());

    // found from a subdirectory of the workspace
    let o = mkimage(&["service", "new", "demo"], &ws.join("runtime/src"));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("cargo test -p runtime --test service_demo"),
        "{stdout}"
    );
    assert!(stdout.contains("runtime/src/services/demo.rs"), "{stdout}");

    // the three spellings where expected
    let svc = read(&ws.join("runtime/src/services/demo.rs"));
    for s in [
        "name: \"demo\"",
        "pub struct DemoAgent",
        "pub struct DemoManager",
        "async fn get_demo(",
        "\"DEMO_MESSAGE\"",
    ] {
        assert!(svc.contains(s), "{s} in demo.rs");
    }
    let agent_cfg = read(&ws.join("config/agent/demo-agent.cfg"));
    assert!(
        agent_cfg.contains("# Demo service annex")
            && agent_cfg
                .contains("DEMO_MESSAGE = {{ DEMO_MESSAGE | default(value=\"hello from demo\") }}"),
        "{agent_cfg}"
    );
    let mgr_cfg = read(&ws.join("config/manager/demo-manager.cfg"));
    assert!(
        mgr_cfg.contains("DEMO_MESSAGE = hello from demo"),
        "{mgr_cfg}"
    );
    let recipe = read(&ws.join("recipes/demo.toml"));
    assert!(
        recipe.contains("name = \"demo\"") && recipe.contains("The Demo service"),
        "{recipe}"
    );
    let test = read(&ws.join("runtime/tests/service_demo.rs"));
    assert!(test.contains("fn demo_service_answers_on_agents_and_manager"));
    assert!(test.contains("Demo on iaas1") && test.contains("DEMO test"));
    // one registration line above each marker
    let reg = read(&ws.join("runtime/src/services/mod.rs"));
    assert!(
        reg.contains("    generic,\n    demo,\n    // BLUEPRINT_INSERT_SERVICE"),
        "{reg}"
    );
    let recipes = read(&ws.join("mkimage/src/service.rs"));
    assert!(recipes.contains(
        "    (\"demo\", include_str!(\"../../recipes/demo.toml\")),\n    // BLUEPRINT_INSERT_RECIPE"
    ));

    // refusals: existing service, invalid names; nothing changes
    let before = read(&ws.join("runtime/src/services/mod.rs"));
    for (args, msg) in [
        (
            vec!["service", "new", "demo"],
            "service 'demo' exists already",
        ),
        (vec!["service", "new", "Demo"], "exists already"),
        (
            vec!["service", "new", "helloworld"],
            "service 'helloworld' exists already",
        ),
        (
            vec!["service", "new", "9lives"],
            "invalid service name '9lives'",
        ),
        (vec!["service", "new", "foo-bar"], "invalid service name"),
        (vec!["service", "new", "../x"], "invalid service name"),
        (vec!["service", "new", "default"], "is reserved"),
    ] {
        let o = mkimage(&args, &ws);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    assert_eq!(read(&ws.join("runtime/src/services/mod.rs")), before);
    let o = mkimage(&["service", "new", "other"], Path::new("/"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no mkimage workspace"));
    // --workspace from elsewhere
    let o = mkimage(
        &[
            "service",
            "new",
            "second",
            "--workspace",
            ws.to_str().unwrap(),
        ],
        Path::new("/"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // the generated test passes in the copy
    let build = base.join("debug");
    if !build.join("deps").exists() {
        std::fs::create_dir_all(&build).unwrap();
        let src = target.join("debug");
        let st = Command::new("cp")
            .arg("-al")
            .args(["deps", "build", ".fingerprint"].map(|d| src.join(d)))
            .arg(&build)
            .status()
            .unwrap();
        assert!(st.success(), "seeding {} with hard links", build.display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let start = Instant::now();
    let o = Command::new(cargo)
        .args([
            "test",
            "-p",
            "runtime",
            "--test",
            "service_demo",
            "--test",
            "service_second",
        ])
        .current_dir(&ws)
        .env("CARGO_TARGET_DIR", &base)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("cargo test in the copy: {:?}", start.elapsed());
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("test demo_service_answers_on_agents_and_manager ... ok")
            && out.contains("test second_service_answers_on_agents_and_manager ... ok"),
        "{out}"
    );
    // the recipes are built in: the copy's mkimage compiles them and its recipe test
    // (every built-in recipe parses and is named after its file) covers them
    let o = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "-p", "mkimage", "--lib", "service::"])
        .current_dir(&ws)
        .env("CARGO_TARGET_DIR", &base)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("both cargo runs in the copy: {:?}", start.elapsed());
    assert!(
        o.status.success()
            && out.contains("every_builtin_recipe_parses_and_is_named_after_its_file ... ok"),
        "{out}"
    );
}
