//! `lb doctor` and `lb run`'s host checks on a real host: namespaces set up
//! as docs/deployment.md says (no warning, no error), then set up wrong in
//! each way the guide lists, one at a time, each giving its finding; `lb
//! run` refuses the fatal ones before it attaches anything and starts with
//! a logged warning on the others.
//!
//! ```text
//!   client: eth0 198.18.0.2 ── front 198.18.0.1  [lb: VIP on lo]  back 198.19.0.1 ── eth0 198.19.0.11 :web
//! ```

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use lb_tests::{lb_bin, unique_prefix};
use lb_userspace::harness::netns::{self, Netns, VethEnd};

struct Host {
    lb: Netns,
    client: Netns,
    web: Netns,
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
}

const CONFIG: &str = r#"
[dataplane]
interfaces = ["front", "back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
backends = [{ name = "web1", address = "198.19.0.11:80" }]

[[service]]
name = "www-dsr"
vip = "198.18.0.10:443"
forwarding = "dsr"
backends = [{ name = "web1", address = "198.19.0.11:443" }]
"#;

impl Host {
    /// The guide's host: forwarding on, rp_filter loose, the VIP on lo, the
    /// peers' TX checksum offload off and GRO on, equal MTUs, the backend's
    /// neighbour entry resolved.
    fn new() -> Result<Host> {
        let p = unique_prefix("lbdoc");
        let lb = Netns::create(&format!("{p}l"))?;
        let client = Netns::create(&format!("{p}c"))?;
        let web = Netns::create(&format!("{p}w"))?;
        netns::add_veth(
            &VethEnd::new(lb.name(), "front"),
            &VethEnd::new(client.name(), "eth0"),
        )?;
        netns::add_veth(
            &VethEnd::new(lb.name(), "back"),
            &VethEnd::new(web.name(), "eth0"),
        )?;
        netns::add_addr(lb.name(), "front", "198.18.0.1/24")?;
        netns::add_addr(lb.name(), "back", "198.19.0.1/24")?;
        netns::add_addr(lb.name(), "lo", "198.18.0.10/32")?;
        netns::add_addr(client.name(), "eth0", "198.18.0.2/24")?;
        netns::add_addr(web.name(), "eth0", "198.19.0.11/24")?;
        netns::sysctl(lb.name(), "net/ipv4/ip_forward", "1")?;
        // Loose on the interfaces, `all` off (the kernel takes the larger).
        netns::sysctl(lb.name(), "net/ipv4/conf/all/rp_filter", "0")?;
        for dev in ["front", "back"] {
            netns::sysctl(lb.name(), &format!("net/ipv4/conf/{dev}/rp_filter"), "2")?;
        }
        netns::tune_veth(client.name(), "eth0")?;
        netns::tune_veth(web.name(), "eth0")?;
        netns::ns_run(lb.name(), &["ping", "-c1", "-W2", "198.19.0.11"])?;
        let dir = std::env::temp_dir().join(format!("{p}-doctor"));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("lb.toml");
        std::fs::write(&config, CONFIG)?;
        Ok(Host {
            lb,
            client,
            web,
            dir,
            config,
        })
    }

    fn ip(&self, ns: &Netns, args: &[&str]) -> Result<()> {
        netns::ip(ns.name(), args).map(drop)
    }

    fn doctor_with(&self, config: &std::path::Path, pin_dir: &str) -> Result<(Output, Problems)> {
        let out = Command::new(lb_bin())
            .args([
                "doctor",
                "--json",
                "--netns",
                self.lb.name(),
                "--pin-dir",
                pin_dir,
            ])
            .arg("--config")
            .arg(config)
            .output()
            .context("running lb doctor")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(&stdout).with_context(|| {
            format!(
                "lb doctor --json: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let problems = report["findings"]
            .as_array()
            .context("findings")?
            .iter()
            .filter(|f| f["severity"] != "ok")
            .map(|f| {
                (
                    f["severity"].as_str().unwrap_or("?").to_owned(),
                    f["check"].as_str().unwrap_or("?").to_owned(),
                    f["subject"].as_str().unwrap_or("?").to_owned(),
                    f["fix"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        Ok((out, Problems(problems)))
    }

    fn doctor(&self) -> Result<(Output, Problems)> {
        self.doctor_with(&self.config, "/sys/fs/bpf/lb")
    }

    /// `lb doctor` finds exactly one problem: `check` (`severity`) about
    /// `subject`, with a fix that names `fix`; it fails only on an error.
    fn expect_only(&self, severity: &str, check: &str, subject: &str, fix: &str) -> Result<()> {
        let (out, problems) = self.doctor()?;
        problems.expect_only(severity, check, subject, fix)?;
        ensure!(
            out.status.success() == (severity != "error"),
            "lb doctor exited {} with a {severity}",
            out.status
        );
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (severity, check, subject, fix) of each finding that is not ok.
struct Problems(Vec<(String, String, String, String)>);

impl Problems {
    fn expect_only(&self, severity: &str, check: &str, subject: &str, fix: &str) -> Result<()> {
        let found = &self.0;
        ensure!(
            found.len() == 1
                && found[0].0 == severity
                && found[0].1 == check
                && found[0].2.contains(subject)
                && found[0].3.contains(fix),
            "expected only {severity} {check} {subject} (fix: {fix}), got {found:#?}"
        );
        Ok(())
    }
}

#[test]
fn doctor_finds_each_thing_set_up_wrong() -> Result<()> {
    let host = Host::new()?;
    let (out, problems) = host.doctor()?;
    ensure!(
        out.status.success() && problems.0.is_empty(),
        "the guide's host: {:#?}",
        problems.0
    );

    // Forwarding off: the one error of the sysctls.
    netns::sysctl(host.lb.name(), "net/ipv4/conf/back/forwarding", "0")?;
    host.expect_only("error", "forwarding", "back", "forwarding=1")?;
    netns::sysctl(host.lb.name(), "net/ipv4/conf/back/forwarding", "1")?;

    // Strict reverse-path filtering.
    netns::sysctl(host.lb.name(), "net/ipv4/conf/front/rp_filter", "1")?;
    host.expect_only("warning", "rp-filter", "front", "rp_filter=2")?;
    netns::sysctl(host.lb.name(), "net/ipv4/conf/front/rp_filter", "2")?;

    // The VIP not on lo.
    host.ip(&host.lb, &["addr", "del", "198.18.0.10/32", "dev", "lo"])?;
    host.expect_only(
        "warning",
        "vip-on-lo",
        "198.18.0.10",
        "ip addr add 198.18.0.10/32 dev lo",
    )?;
    host.ip(&host.lb, &["addr", "add", "198.18.0.10/32", "dev", "lo"])?;

    // The checksum trap: the client's veth computes only partial checksums.
    netns::ns_run(host.client.name(), &["ethtool", "-K", "eth0", "tx", "on"])?;
    host.expect_only(
        "warning",
        "checksum-offload",
        "front",
        &format!(
            "ethtool -K eth0 tx off (in namespace {}",
            host.client.name()
        ),
    )?;
    netns::ns_run(host.client.name(), &["ethtool", "-K", "eth0", "tx", "off"])?;

    // The web's veth without GRO: frames redirected into `back` vanish.
    netns::ns_run(host.web.name(), &["ethtool", "-K", "eth0", "gro", "off"])?;
    host.expect_only("warning", "veth-gro", "back", "ethtool -K eth0 gro on")?;
    netns::ns_run(host.web.name(), &["ethtool", "-K", "eth0", "gro", "on"])?;

    // MTUs that differ along the path.
    host.ip(&host.lb, &["link", "set", "back", "mtu", "1400"])?;
    host.expect_only("warning", "mtu", "back", "ip link set back mtu 1500")?;
    host.ip(&host.lb, &["link", "set", "back", "mtu", "1500"])?;

    // No neighbour entry for the backend (both services name it).
    host.ip(&host.lb, &["neigh", "flush", "dev", "back"])?;
    let (_, problems) = host.doctor()?;
    ensure!(
        problems.0.len() == 2
            && problems
                .0
                .iter()
                .all(|p| p.1 == "neighbour" && p.3.contains("ping -c1 198.19.0.11")),
        "{:#?}",
        problems.0
    );
    netns::ns_run(host.lb.name(), &["ping", "-c1", "-W2", "198.19.0.11"])?;

    // Pins on something that is not a bpffs.
    let not_bpffs = host.dir.join("pins/lb");
    let (_, problems) = host.doctor_with(&host.config, &not_bpffs.display().to_string())?;
    problems.expect_only("warning", "bpffs", "pins", "mount -t bpf bpf")?;

    // An interface without native XDP (a bridge) in native mode, and one
    // that does not exist: errors.
    host.ip(&host.lb, &["link", "add", "br9", "type", "bridge"])?;
    host.ip(&host.lb, &["link", "set", "br9", "up"])?;
    let bad = host.dir.join("bad.toml");
    std::fs::write(
        &bad,
        CONFIG.replace(
            "[\"front\", \"back\"]",
            "[\"front\", \"back\", \"br9\", \"nope0\"]",
        ),
    )?;
    let (out, problems) = host.doctor_with(&bad, "/sys/fs/bpf/lb")?;
    ensure!(!out.status.success(), "lb doctor must fail on errors");
    for (check, subject) in [("xdp-mode", "br9"), ("interface", "nope0")] {
        ensure!(
            problems
                .0
                .iter()
                .any(|p| p.0 == "error" && p.1 == check && p.2 == subject),
            "no {check} error for {subject}: {:#?}",
            problems.0
        );
    }
    Ok(())
}

/// `lb run` refuses a host with an error before it touches the data plane
/// (nothing attached, nothing pinned), and starts on a host with only
/// warnings, logging each with its fix.
#[test]
fn lb_run_refuses_errors_and_warns_on_the_rest() -> Result<()> {
    let host = Host::new()?;
    let pin_dir = format!("/sys/fs/bpf/{}", host.lb.name());
    let socket = host.dir.join("lb.sock");
    let run = |config: &std::path::Path| {
        let mut cmd = Command::new(lb_bin());
        cmd.args(["run", "--netns", host.lb.name(), "--pin-dir", &pin_dir])
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(config);
        cmd
    };

    netns::sysctl(host.lb.name(), "net/ipv4/conf/back/forwarding", "0")?;
    let out = run(&host.config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("the host is not ready")
            && stderr.contains("forwarding back"),
        "lb run must refuse forwarding off: {}\n{stderr}",
        out.status
    );
    let links = netns::ip(host.lb.name(), &["-d", "link", "show", "front"])?;
    ensure!(!links.contains("xdp"), "nothing attached: {links}");
    ensure!(
        !std::path::Path::new(&pin_dir).exists(),
        "nothing pinned under {pin_dir}"
    );
    netns::sysctl(host.lb.name(), "net/ipv4/conf/back/forwarding", "1")?;

    // A warning only: the agent starts, and the log says what to fix.
    netns::ns_run(host.client.name(), &["ethtool", "-K", "eth0", "tx", "on"])?;
    let mut agent = run(&host.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting lb run")?;
    // Read on a thread, so a silent agent cannot hang the test.
    let stdout = agent.stdout.take().context("stdout")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("lb: ready") {
                let _ = ready_tx.send(());
            }
        }
    });
    let result = ready_rx
        .recv_timeout(Duration::from_secs(20))
        .context("the agent did not print `lb: ready` within 20 s");
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(agent.id())?).context("pid")?,
        rustix::process::Signal::TERM,
    );
    let output = agent.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let teardown = Command::new(lb_bin())
        .args(["teardown", "--pin-dir", &pin_dir])
        .output()?;
    result.with_context(|| format!("agent stderr:\n{stderr}"))?;
    ensure!(
        teardown.status.success(),
        "lb teardown: {}",
        String::from_utf8_lossy(&teardown.stderr)
    );
    ensure!(
        stderr.contains("host check: front: peer eth0 has TX checksum offload on")
            && stderr.contains("ethtool -K eth0 tx off"),
        "the warning and its fix in the log:\n{stderr}"
    );
    Ok(())
}
