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
    /// Build the eBPF objects (target/ebpf/bpfel-unknown-none/release/:
    /// lb-ebpf, the data plane's; lb-decap, the backends' decapsulator's;
    /// lb-pktgen and lb-bench, the tools')
    BuildEbpf,
    /// Build the eBPF objects and the developer's `lb` (the product plus the
    /// harness: `lb lab`, `lb bench`) with them embedded
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build `lb` (release) and run it with the given arguments
    /// (`cargo xtask run -- run --config FILE [--netns NAME]`); without
    /// arguments, print how to run it on a host or in the lab
    Run {
        /// A debug build instead (faster to build, slower to forward)
        #[arg(long)]
        debug: bool,
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
    /// Build the Debian package (cargo-deb): /usr/bin/lb (the product alone,
    /// without the harness), the systemd unit, /etc/lb/lb.toml, man pages
    /// and shell completions
    Package {
        /// Package the debug build instead of the release one (the package
        /// test does: no release build needed)
        #[arg(long)]
        debug: bool,
        /// Directory for the .deb (default target/debian)
        #[arg(long)]
        output: Option<PathBuf>,
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
        Task::Run { debug, args } => {
            if args.is_empty() {
                eprint!("{RUN_USAGE}");
                std::process::exit(2);
            }
            let lb = build(&root, !debug)?;
            run(Command::new(lb).args(args))
        }
        Task::Test { args } => test(&root, &args),
        Task::Package { debug, output } => package(&root, !debug, output).map(|_| ()),
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

/// What `cargo xtask run` without arguments prints: the two places `lb`
/// runs (a host, the lab's namespace) and the config each one takes.
const RUN_USAGE: &str = "\
usage: cargo xtask run [--debug] -- run --config FILE [--netns NAME]
  (builds target/release/lb and runs it as root with the arguments after `--`)

  on this host (interfaces, VIPs and backends of your own; see docs/deployment.md):
    cp config/host-example.toml /etc/lb/lb.toml    # then edit interfaces, VIPs, backends
    cargo xtask run -- doctor --config /etc/lb/lb.toml
    cargo xtask run -- run --config /etc/lb/lb.toml

  in the lab (the demo's namespaces; config/foobar.toml names their interfaces):
    cargo xtask lab up
    cargo xtask run -- run --netns foobar-lb --config config/foobar.toml \\
        --socket /run/lb-lab/foobar/lb.sock --pin-dir /sys/fs/bpf/lb-lab-foobar

  any other command: cargo xtask run -- --help
";

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
    // What the backend saw, next to `lb capture` (tests/tests/capture.rs).
    ("tcpdump", "/usr/bin/tcpdump"),
    // The Debian package's test inspects it (tests/tests/package.rs).
    ("lintian", "/usr/bin/lintian"),
    // The lab's database tier: real MariaDB servers with GTID replication
    // (lab db1..db3, tests/tests/db.rs) and the client for their setup.
    ("mariadb-server", "/usr/sbin/mariadbd"),
    ("mariadb-client", "/usr/bin/mariadb"),
    // The lab's DNS servers behind the `dns` service (harness/lab/dns.rs,
    // tests/tests/backends.rs): authoritative NSD, one per web namespace.
    ("nsd", "/usr/sbin/nsd"),
    // `[coordination]`'s store: a real etcd cluster in the coordination
    // tests (tests/tests/coordination.rs, harness/etcd.rs). The agent speaks
    // etcd's JSON gateway, so no protoc is needed to build lb.
    ("etcd-server", "/usr/bin/etcd"),
    // A real server that reads PROXY protocol v2 (tests/tests/proxy_nginx.rs).
    // Its package does not start it where policy-rc.d forbids, as here; the
    // test runs its own in a namespace.
    ("nginx-light", "/usr/sbin/nginx"),
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
    bpffs()?;
    if cargo_deb().is_some() {
        eprintln!("xtask setup: cargo-deb present");
    } else {
        eprintln!("xtask setup: installing cargo-deb (a few minutes)");
        run(Command::new("cargo").args(["install", "--locked", "cargo-deb"]))?;
    }
    Ok(())
}

/// The host's bpffs at /sys/fs/bpf: the agent pins its data plane there,
/// and the end-to-end tests start agents whose pins must outlive them. Most
/// hosts mount it at boot (systemd); a bare container may not, and an agent
/// started under `ip netns exec` (a private mount namespace) refuses to
/// mount one that would vanish with it. So the setup mounts it here, in the
/// host's mount namespace, root-only (`mode=0700`, as the agent's own
/// mount), once.
fn bpffs() -> anyhow::Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fs) = (fields.next(), fields.next(), fields.next());
        dir == Some("/sys/fs/bpf") && fs == Some("bpf")
    });
    if mounted {
        eprintln!("xtask setup: bpffs mounted at /sys/fs/bpf");
        return Ok(());
    }
    eprintln!("xtask setup: mounting a bpffs at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"]))
}

/// `cargo-deb`, which `cargo xtask package` builds the Debian package with.
fn cargo_deb() -> Option<PathBuf> {
    tool_in_cargo_home_or_path("cargo-deb")
}

fn cargo_home_bin() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin"))
}

fn bpf_linker() -> Option<PathBuf> {
    tool_in_cargo_home_or_path("bpf-linker")
}

fn tool_in_cargo_home_or_path(tool: &str) -> Option<PathBuf> {
    let in_cargo_home = cargo_home_bin()
        .map(|b| b.join(tool))
        .filter(|p| p.exists());
    in_cargo_home.or_else(|| {
        env::split_paths(&env::var_os("PATH")?)
            .map(|d| d.join(tool))
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

/// The data plane's object; the decapsulator's (lb-decap, lb-ebpf's second
/// binary) and the tools' (lb-pktgen, lb-bench) are built next to it, where
/// lb-userspace's build.rs finds them.
fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/ebpf/bpfel-unknown-none/release/lb-ebpf")
}

/// Builds the data plane's object (lb-ebpf) and the tools' (lb-ebpf-tools),
/// one cargo run each: built together, cargo would unify lb-common's
/// features and hand the data plane's crate the tools' layouts too.
fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    for package in ["lb-ebpf", "lb-ebpf-tools"] {
        build_ebpf_package(root, package)?;
    }
    eprintln!(
        "xtask: eBPF objects in {}",
        ebpf_object(root).with_file_name("").display()
    );
    Ok(())
}

fn build_ebpf_package(root: &Path, package: &str) -> anyhow::Result<()> {
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
        .args(["build", "--release", "--package", package])
        .args(["--target", "bpfel-unknown-none"])
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
    run(&mut cmd).with_context(|| {
        format!("building the eBPF object {package} (cargo xtask setup installs the toolchain)")
    })
}

/// Which `lb`: the product alone (what the Debian package installs), or the
/// developer's, with the harness (`lab`, `bench`, the tests' kit: lb-userspace's
/// `harness` feature).
#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    Product,
    Developer,
}

/// Builds the objects and the developer's `lb` with them embedded; returns
/// the binary's path.
fn build(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    build_lb(root, release, Flavour::Developer)
}

/// Builds the objects and `lb` of `flavour`. Both are target/PROFILE/lb (cargo
/// keeps both builds, so switching only relinks): the last one built wins.
fn build_lb(root: &Path, release: bool, flavour: Flavour) -> anyhow::Result<PathBuf> {
    build_ebpf(root)?;
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--package", "lb-userspace", "--bin", "lb"])
        .env("LB_EBPF_OBJECT", ebpf_object(root));
    if flavour == Flavour::Developer {
        cmd.args(["--features", "harness"]);
    }
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
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo_test = Command::new(&cargo);
    // The package test (tests/tests/package.rs) installs the Debian package
    // of the debug product build (LB_DEB); built only for runs that may
    // include it, since a filtered run would not use it. First: the
    // developer's `lb` the other tests run is built after it, into the same
    // target/debug/lb.
    if args.is_empty() || args.iter().any(|a| a.to_string_lossy().contains("package")) {
        let dir = root.join("target/package-debug/debian");
        cargo_test.env("LB_DEB", package(root, false, Some(dir))?);
    }
    let lb = build(root, false)?;
    cargo_test
        .current_dir(root)
        .arg("test")
        .args(args)
        .env("LB_EBPF_OBJECT", ebpf_object(root))
        .env("LB_BIN", &lb);
    eprintln!("xtask test: host, kernel (BPF_PROG_TEST_RUN) and end-to-end tiers");
    run(&mut cargo_test)?;
    if args.is_empty() {
        eprintln!("xtask test: lints");
        run(Command::new(&cargo)
            .current_dir(root)
            .args(["fmt", "--all", "--check"]))?;
        run(Command::new(&cargo)
            .current_dir(root)
            .args(["clippy", "--all-targets", "--", "-D", "warnings"])
            .env("LB_EBPF_OBJECT", ebpf_object(root)))?;
        // The product alone (the workspace's run has the tests' `harness`
        // feature): what the package builds, linted as such.
        run(Command::new(&cargo)
            .current_dir(root)
            .args(["clippy", "--package", "lb-userspace", "--lib", "--bins"])
            .args(["--", "-D", "warnings"])
            .env("LB_EBPF_OBJECT", ebpf_object(root)))?;
    }
    Ok(())
}

// ---- package ----

/// Builds the product's `lb` (release, or debug; without the harness), its
/// man pages and completions (from the clap definitions: `lb
/// generate-assets`), and the Debian package with
/// cargo-deb (`[package.metadata.deb]` in lb-userspace/Cargo.toml lists the
/// files). Returns the .deb's path.
///
/// cargo-deb refuses the dev profile, so a debug package stages the debug
/// binary as `release/lb` of a target dir of its own (target/package-debug)
/// and points cargo-deb there: the same package, from a debug build,
/// without a release build. Staged as a link or copy, so the developer's
/// build that later takes target/debug/lb leaves it alone.
fn package(root: &Path, release: bool, output: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let cargo_deb = match cargo_deb() {
        Some(c) => c,
        None => {
            setup()?;
            cargo_deb().context("cargo-deb is not installed after `cargo xtask setup`")?
        }
    };
    let built = build_lb(root, release, Flavour::Product)?;
    let target_dir = if release {
        root.join("target")
    } else {
        root.join("target/package-debug")
    };
    let profile_dir = target_dir.join("release");
    if !release {
        std::fs::create_dir_all(&profile_dir)
            .with_context(|| format!("creating {}", profile_dir.display()))?;
        let staged = profile_dir.join("lb");
        let _ = std::fs::remove_file(&staged);
        std::fs::hard_link(&built, &staged)
            .or_else(|_| std::fs::copy(&built, &staged).map(drop))
            .with_context(|| format!("staging {} as {}", built.display(), staged.display()))?;
    }
    let assets = profile_dir.join("lb-assets");
    if assets.exists() {
        std::fs::remove_dir_all(&assets)
            .with_context(|| format!("removing {}", assets.display()))?;
    }
    run(Command::new(&built)
        .arg("generate-assets")
        .arg("--out")
        .arg(&assets))?;
    // Debian policy: man pages gzip-compressed, with no timestamp (-n).
    let man = assets.join("man");
    let mut gzip = Command::new("gzip");
    gzip.args(["-9", "-n", "-f"]);
    for page in std::fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
        gzip.arg(page?.path());
    }
    run(&mut gzip)?;
    let output = output.unwrap_or_else(|| root.join("target/debian"));
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let mut cmd = Command::new(cargo_deb);
    cmd.current_dir(root)
        .args(["--package", "lb-userspace", "--no-build", "--output"])
        .arg(&output)
        // cargo-deb reads `target/release/` in the assets as this dir's.
        .env("CARGO_TARGET_DIR", &target_dir);
    if !release {
        // The test's package: stripped like the release one, compressed
        // faster.
        cmd.args(["--strip", "--fast"]);
    }
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{} failed ({})", describe(&cmd), out.status);
    }
    // cargo-deb prints the package's path on stdout.
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    eprintln!("xtask: Debian package at {}", deb.display());
    Ok(deb)
}
