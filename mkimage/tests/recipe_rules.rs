//! The recipe rules, one test each: legacy cfg semantics, TOML defaults and checks,
//! overrides, kernel and preflight helpers, the schema.

use mkimage::recipe::{
    default_kernel_package, is_dist_known_unavailable, json_schema, kernel_package, load,
    preflight_dist_message, Arch, Cloud, HostFacts, Hypervisor, Layout, OutputFormat, Overrides,
    Recipe, RecipeError, RecipeInput,
};
use std::path::PathBuf;

fn host() -> HostFacts {
    HostFacts {
        dist: Some("bookworm".into()),
        mirror: Some("http://host-mirror.example/debian".into()),
    }
}

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(name: &str, text: &str) -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    Tmp { _dir: dir, path }
}

fn toml(text: &str) -> Result<Recipe, RecipeError> {
    toml_with(text, &Overrides::default())
}

fn toml_with(text: &str, o: &Overrides) -> Result<Recipe, RecipeError> {
    let t = write("r.toml", text);
    load(&RecipeInput::Toml(t.path.clone()), o, &host())
}

/// A legacy cfg with the given values in a VM-image (nutshell=false, container=false) setup.
fn cfg_text(customizable: &str, nutshell: &str, services: &str) -> String {
    format!(
        "[RECOMMENDED]\ndebian_dist = bookworm\ndebian_mirror = http://mirror.example/debian\narch = amd64\n\n\
         [CUSTOMIZABLE]\n{customizable}\n\n[NUTSHELL]\n{nutshell}\n\n[SERVICES]\n{services}\n"
    )
}

const CUST: &str =
    "cloud = openstack\nhypervisor = kvm\nfilename = conpaas.img\nfilesize = 3072\noptimize = false";
const VM: &str = "cloud = openstack\nnutshell = false\ncontainer = false";

fn legacy(text: &str) -> Result<Recipe, RecipeError> {
    legacy_with(text, &Overrides::default())
}

fn legacy_with(text: &str, o: &Overrides) -> Result<Recipe, RecipeError> {
    let t = write("create-img-script.cfg", text);
    load(&RecipeInput::Legacy(t.path.clone()), o, &host())
}

// ---- legacy cfg ----

#[test]
fn legacy_booleans_are_true_only_for_exact_true() {
    for (value, expected) in [
        ("true", true),
        ("True", false),
        ("TRUE", false),
        ("yes", false),
        ("1", false),
        ("false", false),
    ] {
        let cust = CUST.replace("optimize = false", &format!("optimize = {value}"));
        let r = legacy(&cfg_text(&cust, VM, &format!("mysql_service = {value}"))).unwrap();
        assert_eq!(r.optimize, expected, "{value}");
        assert_eq!(r.services.is_empty(), !expected, "{value}");
        let warned = r.warnings.iter().any(|w| w.contains("not exactly `true`"));
        assert_eq!(warned, !["true", "false"].contains(&value), "{value}");
    }
    // container = True is not a container build.
    let r = legacy(&cfg_text(
        CUST,
        "cloud = openstack\nnutshell = false\ncontainer = True",
        "",
    ))
    .unwrap();
    assert_eq!(r.layout, Layout::Disk);
}

#[test]
fn legacy_ec2_forces_xen_with_warning() {
    let cust = CUST.replace("cloud = openstack", "cloud = ec2");
    let r = legacy(&cfg_text(&cust, VM, "")).unwrap();
    assert_eq!((r.cloud, r.hypervisor), (Cloud::Ec2, Hypervisor::Xen));
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("cloud=ec2 forces hypervisor=xen"));
    // ec2 + xen: no warning.
    let cust = cust.replace("hypervisor = kvm", "hypervisor = xen");
    let r = legacy(&cfg_text(&cust, VM, "")).unwrap();
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert!(r.warnings.is_empty());
}

#[test]
fn legacy_php_implies_scalaris_in_its_file_position() {
    let services =
        "php_service = true\nmysql_service = false\nscalaris_service = false\ncds_service = true";
    let r = legacy(&cfg_text(CUST, VM, services)).unwrap();
    assert_eq!(r.services, ["php", "scalaris", "cds"]);
    // Without a scalaris key it is appended.
    let r = legacy(&cfg_text(
        CUST,
        VM,
        "cds_service = true\nphp_service = true",
    ))
    .unwrap();
    assert_eq!(r.services, ["cds", "php", "scalaris"]);
    // No php, no scalaris.
    let r = legacy(&cfg_text(
        CUST,
        VM,
        "scalaris_service = false\nmysql_service = true",
    ))
    .unwrap();
    assert_eq!(r.services, ["mysql"]);
}

#[test]
fn toml_php_does_not_imply_scalaris() {
    let r = toml("services = [\"php\"]").unwrap();
    assert_eq!(r.services, ["php"]);
    let o = Overrides {
        services: Some(vec!["php".into()]),
        ..Default::default()
    };
    let r = legacy_with(&cfg_text(CUST, VM, "mysql_service = true"), &o).unwrap();
    assert_eq!(r.services, ["php"], "override services are taken as given");
}

#[test]
fn legacy_services_in_file_order() {
    let services = "hadoop_service = true\ncondor_service = true\nmysql_service = true\nhelloworld_service = true";
    let r = legacy(&cfg_text(CUST, VM, services)).unwrap();
    assert_eq!(r.services, ["hadoop", "condor", "mysql", "helloworld"]);
}

#[test]
fn legacy_unknown_values_name_file_line_and_key() {
    let cases = [
        (
            "cloud = openstack",
            "cloud = gce",
            7,
            "cloud",
            "Unknown cloud `gce`",
        ),
        (
            "hypervisor = kvm",
            "hypervisor = hyperv",
            8,
            "hypervisor",
            "Unknown hypervisor",
        ),
        (
            "filesize = 3072",
            "filesize = lots",
            10,
            "filesize",
            "non-numeric size",
        ),
    ];
    for (from, to, line, key, frag) in cases {
        let err = legacy(&cfg_text(&CUST.replace(from, to), VM, "")).unwrap_err();
        assert!(err.file.ends_with("create-img-script.cfg"), "{err}");
        assert_eq!(err.line, Some(line), "{err}");
        assert_eq!(err.key.as_deref(), Some(key), "{err}");
        assert!(err.message.contains(frag), "{err}");
    }
    let err = legacy(&cfg_text(CUST, VM, "").replace("arch = amd64", "arch = sparc")).unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(4), Some("arch")));
    assert!(err.message.starts_with("Unknown arch"));
    let err = legacy(&cfg_text(CUST, VM, "").replace("= bookworm", "= sarge")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("debian_dist"))
    );
    assert!(err.message.starts_with("Unknown Debian distribution"));
}

#[test]
fn legacy_size_comments_tolerated() {
    for v in ["3072 # MB", "3072 #MB", "3072#MB", "3072 ;MB"] {
        let r = legacy(&cfg_text(
            &CUST.replace("filesize = 3072", &format!("filesize = {v}")),
            VM,
            "",
        ))
        .unwrap();
        assert_eq!(r.size_mib, 3072, "{v}");
    }
}

#[test]
fn legacy_old_and_new_dists_parse() {
    for d in [
        "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie",
    ] {
        let r = legacy(&cfg_text(CUST, VM, "").replace("= bookworm", &format!("= {d}"))).unwrap();
        assert_eq!(r.dist, d);
        assert_eq!(
            preflight_dist_message(&r).is_some(),
            is_dist_known_unavailable(d),
            "{d}"
        );
    }
}

#[test]
fn legacy_missing_section_and_key() {
    let text = cfg_text(CUST, VM, "").replace("[NUTSHELL]", "[OTHER]");
    let err = legacy(&text).unwrap_err();
    assert_eq!(err.line, Some(13));
    assert!(err.message.contains("unknown section [OTHER]"), "{err}");

    let text = cfg_text(CUST, VM, "");
    let text = text[..text.find("[SERVICES]").unwrap()].to_string();
    let err = legacy(&text).unwrap_err();
    assert_eq!(err.message, "missing section [SERVICES]");
    assert_eq!((err.line, err.key.as_deref()), (None, None));

    let err = legacy(&cfg_text(&CUST.replace("optimize = false", ""), VM, "")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("optimize"));
    assert_eq!(err.line, Some(6), "line of the [CUSTOMIZABLE] header");
    assert!(err
        .message
        .contains("missing key in section [CUSTOMIZABLE]"));
}

#[test]
fn legacy_unknown_keys_rejected_original_keys_accepted() {
    let nut = format!(
        "{VM}\nhostname = nutshell\nfilename = n.img\nfilesize = 15360\nconpaas_tar_path = /x\n\
         ubuntu_dist = precise\nubuntu_mirror = http://mirror.example/ubuntu\n\
         kvm_ubuntu_kernel_version = 3.5.0-41-generic\nxen_ubuntu_kernel_version = 3.5.0-41-generic"
    );
    let text = cfg_text(CUST, &nut, "")
        + "[SCRIPT_FILE_NAMES]\nhead_script = 000-head\nphp_service_script = 501-php\n";
    let r = legacy(&text).unwrap();
    assert!(r.warnings.is_empty(), "not nutshell mode: {:?}", r.warnings);

    let err = legacy(&cfg_text(CUST, &format!("{VM}\nbogus = 1"), "")).unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(17), Some("bogus")));
    let err = legacy(&cfg_text(CUST, VM, "mysql = true")).unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(19), Some("mysql")));
}

#[test]
fn legacy_container_cloud_is_validated() {
    let nut = "cloud = nimbus\nnutshell = false\ncontainer = true";
    let err = legacy(&cfg_text(CUST, nut, "")).unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(14), Some("cloud")));
    assert!(err.message.starts_with("Unknown cloud `nimbus`"));
    // In VM mode the [NUTSHELL] cloud is not used, so not checked either.
    let nut = "cloud = nimbus\nnutshell = false\ncontainer = false";
    assert!(legacy(&cfg_text(CUST, nut, "")).is_ok());
}

#[test]
fn legacy_nutshell_flags() {
    for (container, embed) in [("true", Layout::Container), ("false", Layout::Disk)] {
        let nut = format!(
            "cloud = openstack\nnutshell = true\ncontainer = {container}\nhostname = nut\nfilename = n.img\nfilesize = 10240 # MB"
        );
        let cust = CUST.replace("cloud = openstack", "cloud = opennebula");
        let r = legacy(&cfg_text(&cust, &nut, "php_service = true")).unwrap();
        assert_eq!(r.layout, Layout::Nutshell);
        assert_eq!(r.cloud, Cloud::Opennebula);
        let n = r.nutshell.unwrap();
        assert_eq!(n.embed, embed);
        assert_eq!(
            (n.hostname.as_str(), n.filename.as_str(), n.size_mib),
            ("nut", "n.img", 10240)
        );
        assert_eq!(
            r.services,
            ["php", "scalaris"],
            "services of the embedded image"
        );
        assert!(r.warnings.iter().any(|w| w.contains("Ubuntu/devstack")));
    }
}

// ---- TOML ----

#[test]
fn toml_defaults_and_defaults_input() {
    let r = load(&RecipeInput::Defaults, &Overrides::default(), &host()).unwrap();
    assert_eq!(r.dist, "bookworm");
    assert_eq!(r.mirror, "http://host-mirror.example/debian");
    assert_eq!(
        (r.arch, r.cloud, r.hypervisor, r.layout),
        (Arch::Amd64, Cloud::Openstack, Hypervisor::Kvm, Layout::Disk)
    );
    assert_eq!(r.size_mib, 2048);
    assert_eq!(r.formats, [OutputFormat::Raw]);
    assert_eq!(r.filename, "conpaas.img");
    assert_eq!(
        r,
        toml("")
            .unwrap_or_else(|e| panic!("{e}"))
            .with_source(r.source.clone())
    );
}

trait WithSource {
    fn with_source(self, s: mkimage::recipe::RecipeSource) -> Self;
}
impl WithSource for Recipe {
    fn with_source(mut self, s: mkimage::recipe::RecipeSource) -> Self {
        self.source = s;
        self
    }
}

#[test]
fn host_dist_fallback_and_missing_mirror() {
    let h = HostFacts {
        dist: Some("noble".into()),
        mirror: Some("http://mirror.example/debian".into()),
    };
    let r = load(&RecipeInput::Defaults, &Overrides::default(), &h).unwrap();
    assert_eq!(r.dist, "bookworm");
    assert_eq!(r.warnings.len(), 1);
    let r = load(
        &RecipeInput::Defaults,
        &Overrides::default(),
        &HostFacts {
            dist: None,
            mirror: h.mirror.clone(),
        },
    )
    .unwrap();
    assert_eq!(r.dist, "bookworm");
    assert!(r.warnings.is_empty());

    let err = load(
        &RecipeInput::Defaults,
        &Overrides::default(),
        &HostFacts::default(),
    )
    .unwrap_err();
    assert_eq!(err.key.as_deref(), Some("mirror"));
    assert!(err.message.contains("/etc/apt/sources.list"), "{err}");
    assert!(err.message.contains("sources.list.d/*.sources"), "{err}");

    let t = write("r.toml", "cloud = \"ec2\"\n");
    let err = load(
        &RecipeInput::Toml(t.path.clone()),
        &Overrides::default(),
        &HostFacts::default(),
    )
    .unwrap_err();
    assert_eq!(err.file, t.path.display().to_string());
    assert_eq!(err.key.as_deref(), Some("mirror"));
    let o = Overrides {
        mirror: Some("http://cli.example/debian".into()),
        ..Default::default()
    };
    let r = load(
        &RecipeInput::Toml(t.path.clone()),
        &o,
        &HostFacts::default(),
    )
    .unwrap();
    assert_eq!(r.mirror, "http://cli.example/debian");
}

#[test]
fn toml_ec2_kvm_warns_only_when_explicit() {
    let r = toml("cloud = \"ec2\"\nhypervisor = \"kvm\"\n").unwrap();
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.warnings.len(), 1);
    assert!(
        r.warnings[0].contains(":2: key `hypervisor`: "),
        "{:?}",
        r.warnings
    );
    assert!(r.warnings[0].contains("cloud=ec2 forces hypervisor=xen"));
    let r = toml("cloud = \"ec2\"\n").unwrap();
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert!(r.warnings.is_empty());
}

#[test]
fn toml_sizes() {
    assert_eq!(toml("size = 4096").unwrap().size_mib, 4096);
    assert_eq!(toml("size = \"3072M\"").unwrap().size_mib, 3072);
    assert_eq!(toml("size = \"2G\"").unwrap().size_mib, 2048);
    assert_eq!(toml("size = \"1.5G\"").unwrap().size_mib, 1536);
    let err = toml("size = 0").unwrap_err();
    assert!(err.message.contains("greater than 0"));
    let err = toml("size = -5").unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(1), Some("size")));
    let err = toml("\nsize = true").unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(2), Some("size")));
    let err = toml("size = 511").unwrap_err();
    assert!(err.message.contains("at least 512 MiB"));
    // A container may be small.
    assert_eq!(
        toml("layout = \"container\"\nsize = 100").unwrap().size_mib,
        100
    );
    // The nutshell outer disk must be bootable too.
    let err = toml("[nutshell]\nsize = 100").unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("nutshell.size"))
    );
}

#[test]
fn toml_formats_follow_layout() {
    let r = toml("layout = \"container\"\n[outputs]\nformats = [\"tar\"]").unwrap();
    assert_eq!(r.formats, [OutputFormat::Tar]);
    let err = toml("layout = \"container\"\n[outputs]\nformats = [\"qcow2\"]").unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(3), Some("outputs.formats"))
    );
    let err = toml("[outputs]\nformats = []").unwrap_err();
    assert!(err.message.contains("at least one"));
    let err = toml("[outputs]\nformats = [\"raw\", \"raw\"]").unwrap_err();
    assert!(err.message.contains("twice"));
    let err = toml("[outputs]\nformats = [\"iso\"]").unwrap_err();
    assert!(err.message.starts_with("Unknown output format `iso`"));
}

#[test]
fn toml_nutshell_table_implies_layout() {
    let r = toml("[nutshell]\nembed = \"vm\"\nhostname = \"nut\"").unwrap();
    assert_eq!(r.layout, Layout::Nutshell);
    let n = r.nutshell.unwrap();
    assert_eq!(
        (
            n.embed,
            n.hostname.as_str(),
            n.filename.as_str(),
            n.size_mib
        ),
        (Layout::Disk, "nut", "nutshell.img", 15360)
    );
    let r = toml("layout = \"nutshell\"").unwrap();
    assert_eq!(r.nutshell, Some(mkimage::recipe::default_nutshell()));
}

#[test]
fn toml_hostname_packages_kernel() {
    let r = toml("hostname = \"web-1\"\npackages = [\"htop\"]\nkernel = \"linux-image-rt-amd64\"")
        .unwrap();
    assert_eq!(r.hostname, "web-1");
    assert_eq!(r.packages, ["htop"]);
    assert_eq!(kernel_package(&r), "linux-image-rt-amd64");
    let err = toml("packages = [\n\"ok\",\n\"Not Ok\"]").unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(3), Some("packages")));
}

#[test]
fn toml_i386_trixie_has_no_kernel() {
    let err = toml("arch = \"i386\"\ndist = \"trixie\"").unwrap_err();
    assert_eq!((err.line, err.key.as_deref()), (Some(1), Some("arch")));
    assert!(toml("arch = \"i386\"\ndist = \"trixie\"\nlayout = \"container\"").is_ok());
    let r = toml("arch = \"i386\"").unwrap();
    assert_eq!(default_kernel_package(&r), "linux-image-686");
}

// ---- overrides ----

#[test]
fn overrides_win() {
    let o = Overrides {
        cloud: Some("opennebula".into()),
        hypervisor: Some("xen".into()),
        size: Some("4G".into()),
        dist: Some("trixie".into()),
        output: Some("out.img".into()),
        services: Some(vec!["mysql".into(), "helloworld".into()]),
        layout: Some("disk".into()),
        formats: Some(vec!["raw".into(), "vdi".into()]),
        mirror: Some("http://cli.example/debian/".into()),
        optimize: Some(true),
    };
    let r = toml_with(
        "cloud = \"ec2\"\nsize = 1024\nservices = [\"php\"]\n[outputs]\nfilename = \"a.img\"",
        &o,
    )
    .unwrap();
    assert_eq!(r.cloud, Cloud::Opennebula);
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.size_mib, 4096);
    assert_eq!(r.dist, "trixie");
    assert_eq!(r.filename, "out.img");
    assert_eq!(r.services, ["mysql", "helloworld"]);
    assert_eq!(r.formats, [OutputFormat::Raw, OutputFormat::Vdi]);
    assert_eq!(r.mirror, "http://cli.example/debian");
    assert!(r.optimize);

    // Legacy too.
    let r = legacy_with(&cfg_text(CUST, VM, "php_service = true"), &o).unwrap();
    assert_eq!(r.cloud, Cloud::Opennebula);
    assert_eq!(r.services, ["mysql", "helloworld"]);
}

#[test]
fn overrides_are_validated() {
    let cases: Vec<(Overrides, &str, &str)> = vec![
        (
            Overrides {
                cloud: Some("aws".into()),
                ..Default::default()
            },
            "--cloud",
            "Unknown cloud `aws`",
        ),
        (
            Overrides {
                hypervisor: Some("kvm2".into()),
                ..Default::default()
            },
            "--hypervisor",
            "Unknown hypervisor",
        ),
        (
            Overrides {
                size: Some("huge".into()),
                ..Default::default()
            },
            "--size",
            "invalid size",
        ),
        (
            Overrides {
                size: Some("100M".into()),
                ..Default::default()
            },
            "--size",
            "too small",
        ),
        (
            Overrides {
                dist: Some("potato".into()),
                ..Default::default()
            },
            "--dist",
            "Unknown Debian distribution",
        ),
        (
            Overrides {
                output: Some("".into()),
                ..Default::default()
            },
            "--output",
            "invalid output file name",
        ),
        (
            Overrides {
                services: Some(vec!["nginx".into()]),
                ..Default::default()
            },
            "--services",
            "Unknown service `nginx`",
        ),
        (
            Overrides {
                layout: Some("iso".into()),
                ..Default::default()
            },
            "--layout",
            "Unknown layout",
        ),
        (
            Overrides {
                formats: Some(vec!["tar".into()]),
                ..Default::default()
            },
            "--format",
            "does not fit layout `disk`",
        ),
        (
            Overrides {
                mirror: Some("mirror".into()),
                ..Default::default()
            },
            "--mirror",
            "invalid mirror URL",
        ),
    ];
    for (o, flag, frag) in cases {
        let err = toml_with("", &o).unwrap_err();
        assert_eq!(err.file, "command line", "{err}");
        assert_eq!(err.line, None, "{err}");
        assert_eq!(err.key.as_deref(), Some(flag), "{err}");
        assert!(err.message.contains(frag), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("command line: key `{flag}`: ")));
    }
}

#[test]
fn override_ec2_forces_xen() {
    let o = Overrides {
        cloud: Some("ec2".into()),
        ..Default::default()
    };
    let r = toml_with("hypervisor = \"kvm\"", &o).unwrap();
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert_eq!(r.warnings.len(), 1);
    let r = toml_with("", &o).unwrap();
    assert_eq!(r.hypervisor, Hypervisor::Xen);
    assert!(r.warnings.is_empty());
}

#[test]
fn overrides_for_nutshell_name_the_outer_image() {
    let o = Overrides {
        size: Some("20G".into()),
        output: Some("outer.img".into()),
        ..Default::default()
    };
    let r = toml_with("[nutshell]\nembed = \"container\"", &o).unwrap();
    let n = r.nutshell.unwrap();
    assert_eq!((n.size_mib, n.filename.as_str()), (20480, "outer.img"));
    assert_eq!((r.size_mib, r.filename.as_str()), (2048, "conpaas.img"));

    // Switching layout drops the nutshell settings; switching to it adds defaults.
    let o = Overrides {
        layout: Some("disk".into()),
        ..Default::default()
    };
    let r = toml_with("[nutshell]\nembed = \"vm\"", &o).unwrap();
    assert_eq!((r.layout, r.nutshell), (Layout::Disk, None));
    let o = Overrides {
        layout: Some("nutshell".into()),
        ..Default::default()
    };
    let r = toml_with("", &o).unwrap();
    assert_eq!(r.nutshell, Some(mkimage::recipe::default_nutshell()));
}

// ---- helpers ----

fn recipe(dist: &str, arch: Arch, cloud: Cloud, hypervisor: Hypervisor) -> Recipe {
    let mut r = load(&RecipeInput::Defaults, &Overrides::default(), &host()).unwrap();
    r.dist = dist.into();
    r.arch = arch;
    r.cloud = cloud;
    r.hypervisor = hypervisor;
    r
}

#[test]
fn kernel_packages() {
    use Arch::*;
    use Cloud::*;
    use Hypervisor::*;
    let cases = [
        ("bookworm", Amd64, Openstack, Kvm, "linux-image-cloud-amd64"),
        ("trixie", Amd64, Ec2, Xen, "linux-image-cloud-amd64"),
        ("bookworm", Amd64, Opennebula, Kvm, "linux-image-amd64"),
        ("bookworm", Amd64, Vbox, Kvm, "linux-image-amd64"),
        ("bookworm", I386, Openstack, Kvm, "linux-image-686"),
        ("squeeze", Amd64, Ec2, Xen, "linux-image-xen-amd64"),
        ("squeeze", I386, Opennebula, Xen, "linux-image-xen-686"),
        ("squeeze", Amd64, Openstack, Kvm, "linux-image-amd64"),
        ("wheezy", Amd64, Ec2, Xen, "linux-image-amd64"),
        ("jessie", I386, Openstack, Kvm, "linux-image-686"),
    ];
    for (dist, arch, cloud, hv, expected) in cases {
        let r = recipe(dist, arch, cloud, hv);
        assert_eq!(
            default_kernel_package(&r),
            expected,
            "{dist} {arch:?} {cloud:?} {hv:?}"
        );
        assert_eq!(kernel_package(&r), expected);
    }
}

#[test]
fn unavailable_dists_and_preflight_message() {
    for d in ["squeeze", "wheezy", "jessie", "stretch", "buster"] {
        assert!(is_dist_known_unavailable(d), "{d}");
        let r = recipe(d, Arch::Amd64, Cloud::Openstack, Hypervisor::Kvm);
        let msg = preflight_dist_message(&r).unwrap();
        assert!(
            msg.contains(d) && msg.contains("http://host-mirror.example/debian"),
            "{msg}"
        );
        assert!(msg.contains("bookworm"), "{msg}");
    }
    for d in ["bullseye", "bookworm", "trixie"] {
        assert!(!is_dist_known_unavailable(d));
        let r = recipe(d, Arch::Amd64, Cloud::Openstack, Hypervisor::Kvm);
        assert_eq!(preflight_dist_message(&r), None);
    }
}

#[test]
fn schema_describes_the_toml_format() {
    let s: serde_json::Value = serde_json::from_str(&json_schema()).unwrap();
    let props = s["properties"].as_object().unwrap();
    let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "arch",
            "cloud",
            "dist",
            "hostname",
            "hypervisor",
            "kernel",
            "layout",
            "mirror",
            "nutshell",
            "optimize",
            "outputs",
            "packages",
            "services",
            "size"
        ]
    );
    assert_eq!(s["additionalProperties"], false);
    assert!(s.get("required").is_none(), "every key is optional");
    assert_eq!(s["properties"]["dist"]["type"], "string", "no null in TOML");
    assert!(!json_schema().contains("null"));
    let text = json_schema();
    for needle in [
        "openstack",
        "opennebula",
        "qcow2",
        "container",
        "\"vm\"",
        "filename",
        "formats",
        "embed",
    ] {
        assert!(text.contains(needle), "schema lacks {needle}");
    }
}

#[test]
fn legacy_container_ec2_cloud_forces_xen() {
    let nut = "cloud = ec2\nnutshell = false\ncontainer = true";
    let r = legacy(&cfg_text(CUST, nut, "")).unwrap();
    assert_eq!((r.cloud, r.hypervisor), (Cloud::Ec2, Hypervisor::Xen));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    // CUSTOMIZABLE ec2 is checked before the container cloud replaces it (as the original).
    let cust = CUST.replace("cloud = openstack", "cloud = ec2");
    let nut = "cloud = openstack\nnutshell = false\ncontainer = true";
    let r = legacy(&cfg_text(&cust, nut, "")).unwrap();
    assert_eq!((r.cloud, r.hypervisor), (Cloud::Openstack, Hypervisor::Xen));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
}

#[test]
fn empty_services_override_means_none() {
    let o = Overrides {
        services: Some(vec!["".into()]),
        ..Default::default()
    };
    let r = toml_with("services = [\"mysql\"]", &o).unwrap();
    assert!(r.services.is_empty());
}
