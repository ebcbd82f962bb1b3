//! `lb`: the XDP load balancer's agent and CLI.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

#[cfg(feature = "harness")]
use lb_userspace::harness::{bench, lab};
use lb_userspace::{
    agent, config,
    control::{self, BackendChange, FirewallChange, Request, VipChange},
    dataplane::Dataplane,
    host, logging, pktgen,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP L4 load balancer: agent and control CLI"
)]
struct Cli {
    /// Log lines on stderr: human-readable, or one JSON object per line
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Human)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data plane, attach it and keep it in sync with the config
    Run(agent::RunArgs),
    /// Show services, backends (health, admin state, weight, flows) and counters
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Change backends live: add, remove, enable, disable, drain, weight;
    /// kept across restarts and reloads until `reset`
    Backend {
        #[command(subcommand)]
        change: BackendChange,
        #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Firewall rules live: `deny|allow add|remove PREFIX [--service NAME]`,
    /// `show` (with per-rule counters); kept across restarts and reloads
    /// until `reset`
    Firewall {
        #[command(subcommand)]
        change: FirewallChange,
        #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// This LB's BGP announcement (`[announce]`): `withdraw [VIP]` drains
    /// the LB (or one VIP) for maintenance, `announce [VIP]` brings it back
    Vip {
        #[command(subcommand)]
        change: VipChange,
        #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Which service and backend a flow gets, and why, from the live maps
    /// (e.g. `lb explain 198.18.0.2:40000 198.18.0.10:80/tcp`)
    Explain {
        /// The client: IPV4:PORT
        client: String,
        /// The service side: VIP:PORT/PROTO (tcp or udp)
        service: String,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Database pools: `promote POOL MEMBER [--force]`
    Db {
        #[command(subcommand)]
        command: lb_userspace::db::DbCommand,
        #[arg(long, global = true, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Re-read the config file (like SIGHUP); an invalid one is rejected whole
    Reload {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Live events of packets the data plane does not forward: verdict,
    /// 5-tuple, service id (switched on while it runs; one tracer at a time)
    Trace(lb_userspace::trace::TraceArgs),
    /// Frames the data plane forwards (with --drops, also those it does
    /// not) as they leave XDP, filtered, as pcap (`-w - | tcpdump -r -`)
    Capture(lb_userspace::capture::CaptureArgs),
    /// Detach the pinned data plane and remove its pins (stopping the agent
    /// alone leaves it forwarding)
    Teardown {
        #[arg(long, default_value = host::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's config: with `[announce]`, every VIP is withdrawn
        /// from BGP first, so routers stop sending traffic here before the
        /// data plane goes. Without it, the announcement the agent of this
        /// pin dir recorded (under /run/lb-announce) is withdrawn
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the host against a config: XDP mode of each interface,
    /// forwarding and rp_filter, VIPs on lo, veth offloads, MTU, bpffs,
    /// backends' neighbour entries; each finding with its fix
    Doctor(lb_userspace::doctor::DoctorArgs),
    /// Check a config file without touching the kernel
    Validate {
        /// The TOML config to check
        file: PathBuf,
    },
    /// The seed's infrastructure in network namespaces (client, lb, web1..3)
    /// (a developer's build only: the `harness` feature)
    #[cfg(feature = "harness")]
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Serve HTTP and UDP as a lab web server (used inside lab namespaces)
    #[cfg(feature = "harness")]
    #[command(hide = true)]
    LabServe(lab::ServeArgs),
    /// The decapsulator for the backends of IPIP and GUE services:
    /// `attach IFACE --from LB_ADDR[,..] [--port GUE_PORT]`, `detach IFACE`,
    /// `status [IFACE]`
    #[command(subcommand)]
    Decap(lb_userspace::decap::DecapCommand),
    /// Generate traffic with XDP live frames (BPF_PROG_RUN)
    Pktgen(pktgen::PktgenArgs),
    /// Benchmarks in network namespaces: Mpps vs a bare forwarder, ns/packet, HTTP vs HAProxy; writes BENCHMARKS.md
    /// (a developer's build only: the `harness` feature)
    #[cfg(feature = "harness")]
    Bench(bench::BenchArgs),
    /// Write the man pages (DIR/man/lb.1, lb-SUBCOMMAND.1) and shell
    /// completions (DIR/completions: bash, zsh, fish) from these clap
    /// definitions; `cargo xtask package` puts them in the Debian package
    #[command(hide = true)]
    GenerateAssets {
        /// The directory to write into
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr (stdout carries `lb: ready` and command output);
    // RUST_LOG filters them. `log` records from dependencies are bridged.
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match dispatch(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without the
            // backtrace anyhow's Debug adds when RUST_BACKTRACE is set.
            eprintln!("lb: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One request to the agent; an error reply becomes an error exit.
fn ask(socket: &std::path::Path, req: &Request) -> anyhow::Result<control::Response> {
    let reply = control::request(socket, req)?;
    if !reply.ok {
        anyhow::bail!("{}", reply.message);
    }
    Ok(reply)
}

/// `lb backend drain --wait`: polls the status until the backend holds no
/// active flow, printing the count whenever it changes.
fn wait_drained(
    socket: &std::path::Path,
    service: &str,
    backend: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now()
        .checked_add(timeout)
        .context("--timeout is too long")?;
    let mut last = None;
    loop {
        let status = ask(socket, &Request::Status)?
            .status
            .context("the agent sent no status")?;
        let active = status
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.backends.iter().find(|b| b.name == backend))
            .map(|b| b.active)
            .with_context(|| format!("{service}/{backend} is no longer in the status"))?;
        if last != Some(active) {
            println!("{service}/{backend}: {active} active flows");
            last = Some(active);
        }
        if active == 0 {
            println!("{service}/{backend} is drained");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{service}/{backend} still holds {active} active flows after {}s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => agent::run(args),
        Command::Status { json, socket } => {
            let reply = ask(&socket, &Request::Status)?;
            let status = reply.status.context("the agent sent no status")?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("encoding status")?
                );
            } else {
                print!("{}", control::render(&status));
            }
            Ok(())
        }
        Command::Backend { change, socket } => {
            println!(
                "{}",
                ask(&socket, &Request::Backend(change.clone()))?.message
            );
            if let BackendChange::Drain {
                service,
                backend,
                wait: true,
                timeout,
            } = change
            {
                wait_drained(&socket, &service, &backend, Duration::from_secs(timeout))?;
            }
            Ok(())
        }
        Command::Vip { change, socket } => {
            println!("{}", ask(&socket, &Request::Vip(change))?.message);
            Ok(())
        }
        Command::Firewall { change, socket } => {
            let reply = ask(&socket, &Request::Firewall(change))?;
            println!("{}", reply.message.trim_end());
            Ok(())
        }
        Command::Explain {
            client,
            service,
            socket,
        } => {
            // Checked here too, so a typo is named without an agent.
            lb_userspace::explain::FlowQuery::parse(&client, &service)?;
            print!(
                "{}",
                ask(&socket, &Request::Explain { client, service })?.message
            );
            Ok(())
        }
        Command::Db { command, socket } => {
            println!("{}", ask(&socket, &Request::Db(command))?.message);
            Ok(())
        }
        Command::Reload { socket } => {
            println!("{}", ask(&socket, &Request::Reload)?.message);
            Ok(())
        }
        Command::Trace(args) => lb_userspace::trace::run(args),
        Command::Capture(args) => lb_userspace::capture::run(args),
        Command::Teardown { pin_dir, config } => {
            // A pin dir another user owns or can write to may hold pins
            // that are not the agent's (or lost the agent's): teardown,
            // as root, acts on none of it.
            let exists = std::fs::symlink_metadata(&pin_dir).is_ok();
            if exists {
                host::check_pin_dir(
                    &pin_dir,
                    &format!(
                        "Whoever can write there may have removed or replaced the pins, so \
                         teardown will not act on them: see what is there (`ls -la {0}`, \
                         `bpftool link show`) and remove it by hand (`rm -r {0}`)",
                        pin_dir.display()
                    ),
                )?;
            }
            // Never under a running agent: it would keep writing maps that
            // no longer forward anything.
            let _lock = exists
                .then(|| {
                    host::PinLock::acquire(
                        &pin_dir,
                        "stop the agent first; `lb teardown` removes the data plane it runs",
                    )
                })
                .transpose()?;
            withdraw_for_teardown(&pin_dir, config.as_deref())?;
            let removed = Dataplane::teardown(&pin_dir)?;
            let probes = lb_userspace::health::through_vip::Names::for_pin_dir(&pin_dir);
            if lb_userspace::health::through_vip::remove(&probes) {
                println!("removed the probe namespace {}", probes.netns);
            }
            if removed.is_empty() {
                println!("nothing pinned under {}", pin_dir.display());
            } else {
                println!(
                    "removed {} from {} (XDP detached)",
                    removed.join(", "),
                    pin_dir.display()
                );
            }
            Ok(())
        }
        Command::Doctor(args) => lb_userspace::doctor::run(args),
        Command::Validate { file } => {
            let cfg = config::load(&file)?;
            println!(
                "{}: ok ({} service(s), {} backend(s))",
                file.display(),
                cfg.services.len(),
                cfg.services.iter().map(|s| s.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        #[cfg(feature = "harness")]
        Command::Lab(cmd) => lab::run(cmd).context("lab"),
        #[cfg(feature = "harness")]
        Command::LabServe(args) => lab::serve(args),
        Command::Decap(command) => lb_userspace::decap::run(command),
        Command::Pktgen(args) => pktgen::run(args),
        #[cfg(feature = "harness")]
        Command::Bench(args) => bench::run(args),
        Command::GenerateAssets { out } => generate_assets(&out),
    }
}

/// `lb teardown`'s first step: withdraws from BGP every VIP announced for
/// the data plane at `pin_dir`, through the `[announce]` of `config` and
/// the one its agent recorded, then forgets the record. A record that
/// cannot be trusted or BIRD refusing stops the teardown, saying how to go
/// on: the data plane must not go while routers still send traffic here.
fn withdraw_for_teardown(
    pin_dir: &std::path::Path,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use lb_userspace::announce::{self, RECORDS_DIR, Record};
    let records = std::path::Path::new(RECORDS_DIR);
    let mut targets = Vec::new();
    if let Some(file) = config
        && let Some(a) = config::load(file)?.announce
    {
        targets.push((format!("[announce] of {}", file.display()), a));
    }
    let recorded = Record::read(records, pin_dir).with_context(|| {
        format!(
            "reading what the agent of {} announced; give its config with --config \
             so teardown withdraws the VIPs from BGP",
            pin_dir.display()
        )
    })?;
    if let Some((path, record)) = &recorded {
        let a = record.announce();
        if !targets.iter().any(|(_, t)| t.include == a.include) {
            targets.push((format!("recorded in {}", path.display()), a));
        }
    }
    for (from, a) in &targets {
        announce::withdraw_all(a).with_context(|| {
            format!(
                "withdrawing the VIPs from BGP ({from}; include file {}): the data plane stays \
                 until they are withdrawn. Start BIRD (or fix its socket) and run teardown again",
                a.include.display()
            )
        })?;
        println!("withdrew every VIP from BGP ({})", a.include.display());
    }
    Record::remove(records, pin_dir).context("removing the announcement record")?;
    Ok(())
}

/// Man pages and completions, generated from the CLI's own definitions so
/// they never drift from it.
fn generate_assets(out: &std::path::Path) -> anyhow::Result<()> {
    let cli = Cli::command();
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let mut pages = vec![("lb".to_owned(), cli.clone())];
    pages.extend(
        cli.get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| (format!("lb-{}", c.get_name()), c.clone())),
    );
    for (title, cmd) in pages {
        let path = man.join(format!("{title}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .title(title.to_uppercase())
            .render(&mut page)
            .with_context(|| format!("rendering {}", path.display()))?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "lb", &completions)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    println!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}
