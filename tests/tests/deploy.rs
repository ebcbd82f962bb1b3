//! The files under deploy/: the systemd unit passes `systemd-analyze
//! verify` (with `/usr/bin/lb` pointed at the binary under test, since
//! verify checks that every command exists) and keeps the properties the
//! README promises; config/host-example.toml passes `lb validate`. The Grafana dashboard is checked against the metrics
//! renderer by a host test in lb-userspace (`metrics::render::tests`).

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, ensure};

fn unit_text() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lb.service");
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

#[test]
fn systemd_unit_keeps_the_data_plane_across_restarts() -> Result<()> {
    let unit = unit_text()?;
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "After=network-online.target",
        "Wants=network-online.target",
        "ExecStartPre=/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf'",
        "ExecStart=/usr/bin/lb run --config /etc/lb/lb.toml",
        "ExecReload=/usr/bin/lb reload",
        "Restart=always",
        "KillMode=process",
        "RuntimeDirectory=lb",
        "WantedBy=multi-user.target",
    ] {
        ensure!(lines.contains(&want), "deploy/lb.service lacks {want:?}");
    }
    Ok(())
}

/// Issue 21: the agent gets descriptors enough (the default 1024 soft limit
/// was exhausted by a trickle attack), and the bpffs it mounts is root's.
#[test]
fn systemd_unit_gives_descriptors_and_a_private_bpffs() -> Result<()> {
    let unit = unit_text()?;
    let nofile: Vec<u64> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("LimitNOFILE="))
        .map(|v| v.parse().with_context(|| format!("LimitNOFILE={v}")))
        .collect::<Result<_>>()?;
    ensure!(
        matches!(nofile[..], [n] if n >= 16_384),
        "deploy/lb.service: one LimitNOFILE of at least 16384 expected, got {nofile:?}"
    );
    let mounts: Vec<&str> = unit
        .lines()
        .filter(|l| l.contains("mount -t bpf"))
        .collect();
    ensure!(
        !mounts.is_empty() && mounts.iter().all(|l| l.contains("-o mode=0700")),
        "deploy/lb.service mounts bpffs without mode=0700: {mounts:?}"
    );
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let lb = std::env::var("LB_BIN").context(
        "LB_BIN is not set: run the tests with `cargo xtask test`, which builds lb and sets it",
    )?;
    let lb = fs::canonicalize(&lb).with_context(|| format!("LB_BIN {lb}"))?;
    let dir = std::env::temp_dir().join(format!("lbm-unit-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let unit = dir.join("lb.service");
    fs::write(
        &unit,
        unit_text()?.replace("/usr/bin/lb", &lb.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .current_dir(&dir)
        .output()
        .context("running systemd-analyze (Debian package systemd)")?;
    let _ = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify deploy/lb.service: {}\n{stderr}",
        out.status
    );
    Ok(())
}

/// The host guide's example config (docs/deployment.md) passes `lb validate`
/// as a user runs it.
#[test]
fn host_example_config_validates() -> Result<()> {
    let lb = std::env::var("LB_BIN").context(
        "LB_BIN is not set: run the tests with `cargo xtask test`, which builds lb and sets it",
    )?;
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/host-example.toml");
    let out = Command::new(&lb)
        .arg("validate")
        .arg(&config)
        .output()
        .with_context(|| format!("running {lb} validate"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains(": ok (2 service(s), 5 backend(s))"),
        "lb validate {}: {}\n{stdout}{}",
        config.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
