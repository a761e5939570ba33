//! Every fixture under `fixtures/`: good ones load with the expected values, bad ones
//! fail with an error that names the file, the line and the key given in their
//! `# expect:` first line.

use mkimage::recipe::{
    load, Arch, Cloud, HostFacts, Hypervisor, Layout, OutputFormat, Overrides, RecipeInput,
    RecipeSource,
};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn host() -> HostFacts {
    HostFacts {
        dist: Some("bookworm".into()),
        mirror: Some("http://host-mirror.example/debian".into()),
    }
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {dir}");
    v
}

fn input(path: &Path) -> RecipeInput {
    if path.extension().is_some_and(|e| e == "toml") {
        RecipeInput::Toml(path.to_path_buf())
    } else {
        RecipeInput::Legacy(path.to_path_buf())
    }
}

fn load_ok(rel: &str) -> mkimage::recipe::Recipe {
    let path = fixtures().join(rel);
    load(&input(&path), &Overrides::default(), &host()).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `# expect: line N: key `K`: FRAGMENT` or `# expect: FRAGMENT`.
fn expectation(path: &Path) -> (Option<usize>, Option<String>, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.lines().next().unwrap();
    let rest = first
        .strip_prefix("# expect: ")
        .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", path.display()));
    let Some(rest) = rest.strip_prefix("line ") else {
        return (None, None, rest.to_string());
    };
    let (line, rest) = rest.split_once(": ").unwrap();
    let (key, frag) = match rest.strip_prefix("key `") {
        Some(r) => {
            let (k, f) = r.split_once("`: ").unwrap();
            (Some(k.to_string()), f.to_string())
        }
        None => (None, rest.to_string()),
    };
    (Some(line.parse().unwrap()), key, frag)
}

fn check_bad(path: &Path) {
    let (line, key, frag) = expectation(path);
    let err = load(&input(path), &Overrides::default(), &host())
        .err()
        .unwrap_or_else(|| panic!("{} loaded but should fail", path.display()));
    eprintln!("{err}");
    let name = path.display().to_string();
    assert_eq!(err.file, name, "{err}");
    assert_eq!(err.line, line, "{name}: {err}");
    assert_eq!(err.key, key, "{name}: {err}");
    assert!(
        err.message.contains(&frag),
        "{name}: `{err}` lacks `{frag}`"
    );
    let shown = err.to_string();
    let mut prefix = name.clone();
    if let Some(l) = line {
        prefix += &format!(":{l}");
    }
    if let Some(k) = &key {
        prefix += &format!(": key `{k}`");
    }
    assert!(
        shown.starts_with(&prefix),
        "{shown} does not start with {prefix}"
    );
}

#[test]
fn bad_cfg_fixtures_fail_at_the_right_place() {
    let all = files("cfg/bad", "cfg");
    assert!(all.len() >= 7);
    for path in all {
        check_bad(&path);
    }
}

#[test]
fn bad_toml_fixtures_fail_at_the_right_place() {
    let all = files("recipes/bad", "toml");
    assert!(all.len() >= 7);
    for path in all {
        check_bad(&path);
    }
}

#[test]
fn all_good_fixtures_load() {
    for path in files("cfg/good", "cfg")
        .into_iter()
        .chain(files("recipes/good", "toml"))
    {
        load(&input(&path), &Overrides::default(), &host())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn original_default_cfg() {
    let r = load_ok("cfg/good/create-img-script.cfg");
    assert!(matches!(r.source, RecipeSource::Legacy(_)));
    assert_eq!(r.dist, "jessie");
    assert_eq!(r.mirror, "http://mirror.example/debian");
    assert_eq!(r.arch, Arch::Amd64);
    // The shipped default builds a container image; the cloud comes from [NUTSHELL].
    assert_eq!(r.layout, Layout::Container);
    assert_eq!(r.cloud, Cloud::Openstack);
    assert_eq!(r.hypervisor, Hypervisor::Kvm);
    assert_eq!(r.size_mib, 3072);
    assert!(r.optimize);
    assert_eq!(r.filename, "conpaas.img");
    assert_eq!(r.hostname, "conpaas");
    assert_eq!(r.services, ["php", "mysql", "xtreemfs", "scalaris"]);
    assert_eq!(r.formats, [OutputFormat::Raw]);
    assert_eq!(r.nutshell, None);
    assert_eq!(r.kernel, None);
    assert!(mkimage::recipe::preflight_dist_message(&r).is_some());
}

#[test]
fn vm_cfg() {
    let r = load_ok("cfg/good/vm.cfg");
    assert_eq!(r.layout, Layout::Disk);
    assert_eq!(r.dist, "bookworm");
    assert_eq!(r.cloud, Cloud::Openstack);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(mkimage::recipe::preflight_dist_message(&r), None);
}

#[test]
fn ec2_kvm_cfg_forces_xen_with_warning() {
    let r = load_ok("cfg/good/ec2-kvm.cfg");
    assert_eq!(r.cloud, Cloud::Ec2);
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("cloud=ec2 forces hypervisor=xen"));
    assert!(r.warnings[0].contains("ec2-kvm.cfg:"));
}

#[test]
fn container_cfg_takes_cloud_from_nutshell_section() {
    let r = load_ok("cfg/good/container.cfg");
    assert_eq!(r.layout, Layout::Container);
    assert_eq!(r.cloud, Cloud::Opennebula);
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.nutshell, None);
}

#[test]
fn nutshell_container_cfg() {
    let r = load_ok("cfg/good/nutshell-container.cfg");
    assert_eq!(r.layout, Layout::Nutshell);
    assert_eq!(r.cloud, Cloud::Vbox);
    let n = r.nutshell.as_ref().unwrap();
    assert_eq!(n.embed, Layout::Container);
    assert_eq!(n.hostname, "mynutshell");
    assert_eq!(n.filename, "nutshell.img");
    assert_eq!(n.size_mib, 15360);
    // The embedded image keeps the CUSTOMIZABLE name and size.
    assert_eq!(r.filename, "conpaas.img");
    assert_eq!(r.size_mib, 3072);
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Vdi]);
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("Ubuntu/devstack") && w.contains("ubuntu_dist")));
}

#[test]
fn nutshell_vm_cfg() {
    let r = load_ok("cfg/good/nutshell-vm.cfg");
    assert_eq!(r.layout, Layout::Nutshell);
    assert_eq!(r.cloud, Cloud::Opennebula);
    let n = r.nutshell.as_ref().unwrap();
    assert_eq!(n.embed, Layout::Disk);
    assert_eq!(n.size_mib, 20480);
    assert_eq!(r.formats, [OutputFormat::Raw]);
}

#[test]
fn with_comments_cfg() {
    let r = load_ok("cfg/good/with-comments.cfg");
    assert_eq!(r.dist, "bookworm");
    assert_eq!(r.mirror, "http://mirror.example/debian");
    assert_eq!(r.size_mib, 4096);
    assert_eq!(r.filename, "custom.img");
    assert_eq!(r.cloud, Cloud::Opennebula);
    // `True` is not the exact string `true`.
    assert!(!r.optimize);
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("`True` is not exactly `true`")));
    // File order, not the original's list order.
    assert_eq!(r.services, ["xtreemfs", "mysql", "helloworld"]);
}

#[test]
fn jessie_cfg_parses_but_fails_preflight() {
    let r = load_ok("cfg/good/jessie.cfg");
    assert_eq!(r.dist, "jessie");
    assert!(r.services.is_empty());
    let msg = mkimage::recipe::preflight_dist_message(&r).unwrap();
    assert!(msg.contains("jessie") && msg.contains("http://mirror.example/debian"));
    assert_eq!(
        mkimage::recipe::default_kernel_package(&r),
        "linux-image-amd64"
    );
}

#[test]
fn minimal_toml_is_all_defaults() {
    let r = load_ok("recipes/good/minimal.toml");
    assert!(matches!(r.source, RecipeSource::Toml(_)));
    assert_eq!(r.dist, "bookworm");
    assert_eq!(r.mirror, "http://host-mirror.example/debian");
    assert_eq!(r.arch, Arch::Amd64);
    assert_eq!(r.cloud, Cloud::Openstack);
    assert_eq!(r.hypervisor, Hypervisor::Kvm);
    assert_eq!(r.layout, Layout::Disk);
    assert_eq!(r.size_mib, 2048);
    assert!(!r.optimize);
    assert!(r.services.is_empty());
    assert_eq!(r.hostname, "conpaas");
    assert!(r.packages.is_empty());
    assert_eq!(r.kernel, None);
    assert_eq!(r.filename, "conpaas.img");
    assert_eq!(r.formats, [OutputFormat::Raw]);
    assert_eq!(r.nutshell, None);
    assert!(r.warnings.is_empty());
    assert_eq!(
        mkimage::recipe::default_kernel_package(&r),
        "linux-image-cloud-amd64"
    );
}

#[test]
fn helloworld_tomls() {
    let r = load_ok("recipes/good/helloworld-openstack.toml");
    assert_eq!(r.services, ["helloworld"]);
    assert_eq!(r.size_mib, 2048);
    assert_eq!(r.filename, "helloworld-openstack.img");
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Qcow2]);
    assert_eq!(r.mirror, "http://mirror.example/debian");

    let r = load_ok("recipes/good/helloworld-ec2.toml");
    assert_eq!(r.cloud, Cloud::Ec2);
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.size_mib, 3072);
    assert!(r.optimize);
    assert!(r.warnings.is_empty());
}

#[test]
fn mysql_and_php_tomls() {
    let r = load_ok("recipes/good/mysql.toml");
    assert_eq!(r.dist, "trixie");
    assert_eq!(r.mirror, "http://mirror.example/debian");
    assert_eq!(r.services, ["mysql"]);
    assert_eq!(r.packages, ["less", "vim-tiny"]);
    assert_eq!(r.kernel.as_deref(), Some("linux-image-amd64"));
    assert_eq!(mkimage::recipe::kernel_package(&r), "linux-image-amd64");
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Vmdk]);

    let r = load_ok("recipes/good/php.toml");
    assert_eq!(r.size_mib, 1536);
    assert_eq!(r.services, ["php", "scalaris"]);
}

#[test]
fn container_and_nutshell_tomls() {
    let r = load_ok("recipes/good/container.toml");
    assert_eq!(r.layout, Layout::Container);
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Tar]);

    let r = load_ok("recipes/good/nutshell.toml");
    assert_eq!(r.layout, Layout::Nutshell);
    let n = r.nutshell.as_ref().unwrap();
    assert_eq!(n.embed, Layout::Container);
    assert_eq!(n.size_mib, 15360);
    assert_eq!(r.size_mib, 2048);
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Vdi]);
}

#[test]
fn host_trees() {
    let root = fixtures().join("host");
    let h = HostFacts::detect_in(&root.join("bookworm"));
    assert_eq!(h.dist.as_deref(), Some("bookworm"));
    assert_eq!(h.mirror.as_deref(), Some("http://mirror.example/debian"));
    let h = HostFacts::detect_in(&root.join("legacy-list"));
    assert_eq!(h.dist.as_deref(), Some("bookworm"));
    assert_eq!(h.mirror.as_deref(), Some("http://mirror.example/debian"));
    let h = HostFacts::detect_in(&root.join("ubuntu"));
    assert_eq!(h, HostFacts::default());
    // A recipe without a mirror then fails, naming the apt files read.
    let err = load(&RecipeInput::Defaults, &Overrides::default(), &h).unwrap_err();
    assert!(
        err.to_string().contains("/etc/apt/sources.list.d/*.list"),
        "{err}"
    );
}

#[test]
fn detect_on_this_host_does_not_panic() {
    let h = HostFacts::detect();
    if let Some(m) = &h.mirror {
        assert!(m.contains("://"), "{m}");
        assert!(h.dist.is_some());
    }
}
