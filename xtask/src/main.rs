//! `cargo xtask`: everything a user or CI does with the project, from a fresh
//! machine: install the BPF toolchain, build the eBPF object and the `lb`
//! binary with it embedded, run, test every tier, the lab and the demo.
//!
//! The BPF toolchain recipe (why Debian's rustc, why bpf-linker from
//! crates.io built against LLVM 22) is in docs/architecture.md.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test the XDP load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (Debian packages, bpf-linker); idempotent
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/lb-ebpf)
    BuildEbpf,
    /// Build the eBPF object and the `lb` binary with it embedded
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run `lb` with the given arguments (e.g. `-- run --config config/foobar.toml`)
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every test tier: host, kernel (BPF_PROG_TEST_RUN), end-to-end (lab), lints
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Create or remove the lab namespaces (`lb lab up|down`)
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show the load balancer working: lab, NAT and DSR, real HTTP requests
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Benchmarks: Mpps vs a bare forwarder, ns/packet, HTTP vs HAProxy; writes BENCHMARKS.md
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Build { release } => build(&root, release).map(|_| ()),
        Task::Run { release, args } => {
            let lb = build(&root, release)?;
            run(Command::new(lb).args(args))
        }
        Task::Test { args } => test(&root, &args),
        Task::Lab { args } => lb_verb(&root, "lab", &args),
        Task::Demo { args } => {
            let mut demo: Vec<OsString> = vec!["demo".into()];
            demo.extend(args);
            lb_verb(&root, "lab", &demo)
        }
        Task::Bench { args } => {
            // The report names the command the user ran, not the binary
            // built here (lb's harness/bench reads LB_BENCH_COMMAND).
            let mut typed = String::from("cargo xtask bench");
            for a in &args {
                typed.push(' ');
                typed.push_str(&a.to_string_lossy());
            }
            let lb = build(&root, true)?;
            run(Command::new(lb)
                .arg("bench")
                .args(&args)
                .env("LB_BENCH_COMMAND", typed))
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = env::var_os("CARGO_MANIFEST_DIR").context("run this through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask lives inside the workspace")
}

/// Runs a command, echoing it, and fails with its exit status.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

// ---- setup ----

/// Debian packages: the Rust toolchain with prebuilt `core` for BPF, LLVM 22
/// for bpf-linker, and the tools the lab, tests and benchmarks call.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none",
    ),
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("iputils-ping", "/usr/bin/ping"),
    ("wrk", "/usr/bin/wrk"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("curl", "/usr/bin/curl"),
    // The HTTPS tests show the certificate chain (tests/tests/https.rs).
    ("openssl", "/usr/bin/openssl"),
    // The router and the LBs of the multi-LB lab speak BGP and BFD (harness/lab/ha.rs;
    // the agent drives its LB's BIRD through `[announce]`).
    ("bird2", "/usr/sbin/bird"),
    // A C compiler for the `ring` crate under rustls (the lab's HTTPS).
    ("gcc", "/usr/bin/gcc"),
    // The status page's browser test (tests/tests/monitoring.rs).
    ("chromium", "/usr/bin/chromium"),
    // `systemd-analyze verify` of deploy/lb.service (tests/tests/deploy.rs).
    ("systemd", "/usr/bin/systemd-analyze"),
    // The lab's database tier: real MariaDB servers with GTID replication
    // (lab db1..db3, tests/tests/db.rs) and the client for their setup.
    ("mariadb-server", "/usr/sbin/mariadbd"),
    ("mariadb-client", "/usr/bin/mariadb"),
    // `[coordination]`'s store: a real etcd cluster in the coordination
    // tests (tests/tests/coordination.rs, harness/etcd.rs). The agent speaks
    // etcd's JSON gateway, so no protoc is needed to build lb.
    ("etcd-server", "/usr/bin/etcd"),
];

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!("xtask setup: Debian packages present");
    } else {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if bpf_linker().is_some() {
        eprintln!("xtask setup: bpf-linker present");
    } else {
        // Built against Debian's LLVM 22; without LLVM_PREFIX the link fails
        // with "unable to find library -lLLVM".
        eprintln!("xtask setup: installing bpf-linker (about a minute)");
        let path = prepend_path("/usr/lib/llvm-22/bin")?;
        run(Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path))?;
    }
    Ok(())
}

fn cargo_home_bin() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin"))
}

fn bpf_linker() -> Option<PathBuf> {
    let in_cargo_home = cargo_home_bin()
        .map(|b| b.join("bpf-linker"))
        .filter(|p| p.exists());
    in_cargo_home.or_else(|| {
        env::split_paths(&env::var_os("PATH")?)
            .map(|d| d.join("bpf-linker"))
            .find(|p| p.exists())
    })
}

fn prepend_path(dir: impl Into<PathBuf>) -> anyhow::Result<OsString> {
    let mut dirs = vec![dir.into()];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).context("building PATH")
}

// ---- build ----

/// How the eBPF crate is compiled. Debian's rustc ships `core` prebuilt for
/// bpfel-unknown-none; a nightly with rust-src can build it instead.
enum BpfToolchain {
    /// `LB_BPF_RUSTC` / `LB_BPF_CARGO` (defaults: Debian's /usr/bin ones).
    Prebuilt { rustc: PathBuf, cargo: PathBuf },
    /// `LB_BPF_TOOLCHAIN=nightly`: rustup nightly with `-Z build-std=core`.
    Nightly,
}

fn bpf_toolchain() -> anyhow::Result<BpfToolchain> {
    if env::var("LB_BPF_TOOLCHAIN").as_deref() == Ok("nightly") {
        return Ok(BpfToolchain::Nightly);
    }
    let rustc =
        env::var_os("LB_BPF_RUSTC").map_or_else(|| PathBuf::from("/usr/bin/rustc"), PathBuf::from);
    let cargo =
        env::var_os("LB_BPF_CARGO").map_or_else(|| PathBuf::from("/usr/bin/cargo"), PathBuf::from);
    let overridden = env::var_os("LB_BPF_RUSTC").is_some();
    if !overridden
        && (!rustc.exists()
            || bpf_linker().is_none()
            || !Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists())
    {
        setup()?;
    }
    Ok(BpfToolchain::Prebuilt { rustc, cargo })
}

fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    let toolchain = bpf_toolchain()?;
    let mut cmd = match &toolchain {
        BpfToolchain::Prebuilt { cargo, .. } => Command::new(cargo),
        BpfToolchain::Nightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c
        }
    };
    // The BPF build must not see the host build's wrappers or toolchain pin:
    // a separate toolchain, a separate target dir, nothing shared.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--package",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        // BTF for the loader; BPF v3 for atomic fetch-add (round-robin counter).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\x1f"),
        )
        // aya-ebpf enables asm_experimental_arch on bpf.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", prepend_path(cargo_home_bin().unwrap_or_default())?);
    match toolchain {
        BpfToolchain::Prebuilt { rustc, .. } => {
            cmd.env("RUSTC", rustc);
        }
        BpfToolchain::Nightly => {
            cmd.args(["-Z", "build-std=core"]);
        }
    }
    run(&mut cmd).context("building the eBPF object (cargo xtask setup installs the toolchain)")?;
    eprintln!("xtask: eBPF object at {}", ebpf_object(root).display());
    Ok(())
}

/// Builds the object and `lb` with it embedded; returns the binary's path.
fn build(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    build_ebpf(root)?;
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--package", "lb-userspace", "--bin", "lb"])
        .env("LB_EBPF_OBJECT", ebpf_object(root));
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("lb"))
}

fn lb_verb(root: &Path, verb: &str, args: &[OsString]) -> anyhow::Result<()> {
    let lb = build(root, true)?;
    run(Command::new(lb).arg(verb).args(args))
}

// ---- test ----

fn test(root: &Path, args: &[OsString]) -> anyhow::Result<()> {
    // Every tool the tiers call (Chromium, wrk, systemd-analyze, …), not
    // only the BPF toolchain the build checks for: installs what is missing.
    setup()?;
    let lb = build(root, false)?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask test: host, kernel (BPF_PROG_TEST_RUN) and end-to-end tiers");
    run(Command::new(&cargo)
        .current_dir(root)
        .arg("test")
        .args(args)
        .env("LB_EBPF_OBJECT", ebpf_object(root))
        .env("LB_BIN", &lb))?;
    if args.is_empty() {
        eprintln!("xtask test: lints");
        run(Command::new(&cargo)
            .current_dir(root)
            .args(["fmt", "--all", "--check"]))?;
        run(Command::new(&cargo)
            .current_dir(root)
            .args(["clippy", "--all-targets", "--", "-D", "warnings"])
            .env("LB_EBPF_OBJECT", ebpf_object(root)))?;
    }
    Ok(())
}
