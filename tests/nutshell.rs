//! The Nutshell with an embedded container: one run builds the helloworld services
//! image as a container tree and the Nutshell around it; booted under QEMU, the
//! Nutshell's manager (started by its own unit) takes the owner's one-time token from
//! user-data, publishes its CA on the console, and — asked over mutual TLS through a
//! host-forwarded port — starts two agents as systemd-nspawn containers *inside the
//! Nutshell*, which both answer `get_helloworld`.

use e2e::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn cps(args: &[&str]) -> Output {
    Command::new(bin("cps")).args(args).output().unwrap()
}

/// The PEM the Nutshell printed on its console, once it is complete.
fn console_ca(serial: &Path) -> Option<String> {
    let text = String::from_utf8_lossy(&std::fs::read(serial).ok()?).replace('\r', "");
    let start = text.find("cps-nutshell: manager CA certificate follows")?;
    let rest = &text[start..];
    let begin = rest.find("-----BEGIN CERTIFICATE-----")?;
    let end = rest.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    (begin < end).then(|| format!("{}\n", &rest[begin..end]))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {} s waiting for {what}",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("{what}: after {:.1} s", t.elapsed().as_secs_f64());
}

/// A booted Nutshell as its owner sees it: forwarded manager and enrolment ports, a
/// config drive with the user-data, and the owner's certificate once enrolled.
struct Owner {
    serial: std::path::PathBuf,
    opts: mkimage::boot::BootOptions,
    token: String,
    enrol_port: u16,
    mgr_url: String,
    user: std::path::PathBuf,
}

impl Owner {
    fn new(sb: &Sandbox, img: &Path, user_data: &str, token: &str, memory_mib: u32) -> Owner {
        let ctx = sb.path().join("context");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("user_data"), user_data).unwrap();
        let data = mkimage::context::InstanceData::from_path(&ctx, "nutshell").unwrap();
        let iso = sb.path().join("config-2.iso");
        mkimage::context::make_config_drive(&data, &iso, sb.path()).unwrap();
        let serial = sb.path().join("nutshell.serial.log");
        let mut opts = mkimage::boot::BootOptions::new(img, &serial);
        let (mgr_port, enrol_port) = (
            mkimage::boot::free_port().unwrap(),
            mkimage::boot::free_port().unwrap(),
        );
        opts.forwards = vec![(mgr_port, 443), (enrol_port, 4443)];
        opts.extra_drives = vec![iso];
        opts.memory_mib = memory_mib;
        opts.timeout = Duration::from_secs(600);
        Owner {
            serial,
            opts,
            token: token.to_owned(),
            enrol_port,
            mgr_url: format!("https://127.0.0.1:{mgr_port}"),
            user: sb.path().join("user"),
        }
    }

    fn client(&self, args: &[&str]) -> Output {
        let user = self.user.display().to_string();
        let mut a = vec!["client", "--manager", &self.mgr_url, "--cert-dir", &user];
        a.extend_from_slice(args);
        cps(&a)
    }

    fn state(&self) -> String {
        String::from_utf8_lossy(&self.client(&["info"]).stdout).into_owned()
    }

    /// Takes the CA from the console, enrols with the token, starts the service.
    fn enrol_and_start(&self) {
        let mut ca = None;
        wait_until("the CA on the console", Duration::from_secs(300), || {
            ca = console_ca(&self.serial);
            ca.is_some()
        });
        std::fs::create_dir_all(&self.user).unwrap();
        let ca_path = self.user.join("console-ca.pem").display().to_string();
        std::fs::write(&ca_path, ca.unwrap()).unwrap();
        let url = format!("https://127.0.0.1:{}/enroll", self.enrol_port);
        let user = self.user.display().to_string();
        wait_until("the owner's enrolment", Duration::from_secs(120), || {
            let o = cps(&[
                "enroll",
                "--url",
                &url,
                "--token",
                &self.token,
                "--node-id",
                "user",
                "--cert-dir",
                &user,
                "--ca",
                &ca_path,
            ]);
            o.status.success()
        });
        let o = self.client(&["startup"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        wait_until("RUNNING", Duration::from_secs(120), || {
            self.state().contains("RUNNING")
        });
    }
}

#[test]
fn nutshell_with_embedded_container_runs_two_agents_inside() {
    let _g = heavy();
    let sb = Sandbox::new();
    let recipe = fixture("recipes/good/minimal.toml");
    let args = [
        "--services",
        "helloworld",
        "--layout",
        "nutshell",
        "--size",
        "3G",
    ];

    // The plan nests the embedded image's stages under the Nutshell's.
    let plan = run(mkimage()
        .arg("plan")
        .arg("--recipe")
        .arg(&recipe)
        .args(args));
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(
        plan.contains("embedded container image conpaas.img"),
        "{plan}"
    );
    assert!(plan.contains("the Nutshell nutshell.img"), "{plan}");
    assert!(plan.contains("nutshell     ["), "{plan}");

    let t = Instant::now();
    let out = run(sb.build().arg("--recipe").arg(&recipe).args(args));
    assert!(out.status.success(), "nutshell build failed");
    eprintln!("nutshell build: {:.1} s", t.elapsed().as_secs_f64());
    let img = sb.out().join("nutshell.img");
    assert!(img.exists());
    assert_clean(sb.path());
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sb.out().join("nutshell.img.manifest.json")).unwrap(),
    )
    .unwrap();
    let stages: Vec<&str> = m["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        stages.contains(&"embedded/service-helloworld"),
        "{stages:?}"
    );
    assert!(stages.contains(&"nutshell"), "{stages:?}");
    assert!(m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_str().unwrap().starts_with("systemd-container=")));

    // Contextualization: only a one-time token travels in user-data.
    let token = format!("{:x}", std::process::id() as u64 * 7919 + 12345);
    let owner = Owner::new(
        &sb,
        &img,
        &format!("#!/bin/sh\nmkdir -p /etc/cps\necho {token} > /etc/cps/nutshell-user-token\n"),
        &token,
        1536,
    );
    let mut answers = String::new();
    let report = mkimage::boot::boot_test_with(&owner.opts, |_qemu| {
        let t = Instant::now();
        owner.enrol_and_start();
        let o = owner.client(&["add-nodes", "2"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        wait_until("two agents in containers", Duration::from_secs(400), || {
            let s = owner.state();
            s.contains("RUNNING") && !s.contains("ADAPTING")
        });
        answers = String::from_utf8_lossy(&owner.client(&["hello"]).stdout).into_owned();
        let list = String::from_utf8_lossy(&owner.client(&["list"]).stdout).into_owned();
        eprintln!("{answers}\n{list}");
        eprintln!(
            "from ready to two container agents answering: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        true
    })
    .unwrap();
    eprintln!(
        "nutshell ready after {:.1} s under {}",
        report.seconds_to_ready, report.accel
    );
    assert_eq!(
        answers.matches("Received helloworld from").count(),
        2,
        "{answers}"
    );
    assert_clean(sb.path());
}

/// User-data for the VM Nutshell: the owner's token, plus a watcher that reports the
/// nested qemu processes (command line, and the backing file of their disk) on the
/// console, so the host can see what runs inside.
fn vm_user_data(token: &str) -> String {
    format!(
        r#"#!/bin/sh
mkdir -p /etc/cps
echo {token} > /etc/cps/nutshell-user-token
(
  while sleep 3; do
    for d in /proc/[0-9]*; do
      case "$(cat $d/comm 2>/dev/null)" in
        qemu-system-x86*) ;;
        *) continue ;;
      esac
      echo "nested-qemu: $(tr '\0' ' ' < $d/cmdline)"
      for f in $(tr '\0' '\n' < $d/cmdline | sed -n 's/^file=\([^,]*qcow2\),.*/\1/p'); do
        echo "nested-disk: $f backing $(qemu-img info -U --output=json "$f" | tr -d ' \n' | sed -n 's/.*"backing-filename":"\([^"]*\)".*/\1/p')"
      done
    done > /dev/ttyS0
  done
) > /dev/null 2>&1 &
"#
    )
}

/// The Nutshell with an embedded VM image: its manager's `qemu` driver boots an
/// agent as a nested VM from a copy-on-write overlay of the embedded disk, with a
/// config drive. Nested TCG inside TCG is far too slow to wait for the agent here:
/// this test checks that the nested VM runs as it should; the ignored test
/// `nested_agent_vm_answers` waits for the agent too (run it by hand).
#[test]
fn nutshell_with_embedded_vm_starts_a_nested_agent_vm() {
    nutshell_vm(false);
}

#[test]
#[ignore = "nested software emulation: the agent takes many minutes to answer (run by hand)"]
fn nested_agent_vm_answers() {
    nutshell_vm(true);
}

fn nutshell_vm(wait_for_agent: bool) {
    let _g = heavy();
    let sb = Sandbox::new();
    let recipe = sb.path().join("nutshell-vm.toml");
    std::fs::write(
        &recipe,
        "services = [\"helloworld\"]\n[nutshell]\nembed = \"vm\"\nsize = \"4G\"\n",
    )
    .unwrap();
    let plan = run(mkimage().arg("plan").arg("--recipe").arg(&recipe));
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(plan.contains("embedded VM image conpaas.img"), "{plan}");
    let t = Instant::now();
    let out = run(sb.build().arg("--recipe").arg(&recipe));
    assert!(out.status.success(), "nutshell build failed");
    eprintln!("VM nutshell build: {:.1} s", t.elapsed().as_secs_f64());
    let img = sb.out().join("nutshell.img");
    assert_clean(sb.path());

    let token = format!("{:x}", std::process::id() as u64 * 104729 + 777);
    let owner = Owner::new(&sb, &img, &vm_user_data(&token), &token, 2048);
    let serial = owner.serial.clone();
    let client = |args: &[&str]| owner.client(args);
    let state = || owner.state();
    let mut nested = String::new();
    let mut answers = String::new();
    mkimage::boot::boot_test_with(&owner.opts, |_qemu| {
        owner.enrol_and_start();
        assert!(client(&["add-nodes", "1"]).status.success());
        wait_until(
            "the nested agent VM on the console",
            Duration::from_secs(300),
            || {
                let s = state();
                if s.contains("ERROR") {
                    let log = String::from_utf8_lossy(&client(&["log"]).stdout).into_owned();
                    panic!("the Nutshell's manager failed:\n{s}\n{log}");
                }
                let text = String::from_utf8_lossy(&std::fs::read(&serial).unwrap()).into_owned();
                nested = text
                    .lines()
                    .filter(|l| l.starts_with("nested-"))
                    .map(|l| l.trim_end().to_owned())
                    .collect::<Vec<_>>()
                    .join("\n");
                nested.contains("nested-qemu:")
                    && nested.contains("backing /var/lib/cps/nutshell/agent.img")
            },
        );
        if wait_for_agent {
            let t = Instant::now();
            wait_until(
                "the nested agent answering",
                Duration::from_secs(3600),
                || {
                    let s = state();
                    s.contains("RUNNING") && !s.contains("ADAPTING")
                },
            );
            answers = String::from_utf8_lossy(&client(&["hello"]).stdout).into_owned();
            eprintln!(
                "nested agent VM answered {:.0} s after add_nodes",
                t.elapsed().as_secs_f64()
            );
        }
        true
    })
    .unwrap();
    eprintln!("{nested}");
    let qemu_line = nested
        .lines()
        .find(|l| l.starts_with("nested-qemu:"))
        .unwrap();
    assert!(qemu_line.contains("disk.qcow2,format=qcow2"), "{qemu_line}");
    assert!(qemu_line.contains("config.iso,format=raw"), "{qemu_line}");
    if wait_for_agent {
        assert_eq!(
            answers.matches("Received helloworld from").count(),
            1,
            "{answers}"
        );
    }
    assert_clean(sb.path());
}
