//! `lb`: the XDP load balancer's agent and CLI.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};

use lb_userspace::{
    agent, config,
    control::{self, BackendChange, FirewallChange, Request, VipChange},
    dataplane::Dataplane,
    harness::{bench, lab, pktgen},
    host, logging,
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
    /// Detach the pinned data plane and remove its pins (stopping the agent
    /// alone leaves it forwarding)
    Teardown {
        #[arg(long, default_value = agent::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's config: with `[announce]`, every VIP is withdrawn
        /// from BGP first, so routers stop sending traffic here before the
        /// data plane goes
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a config file without touching the kernel
    Validate {
        /// The TOML config to check
        file: PathBuf,
    },
    /// The seed's infrastructure in network namespaces (client, lb, web1..3)
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Serve HTTP and UDP as a lab web server (used inside lab namespaces)
    #[command(hide = true)]
    LabServe(lab::ServeArgs),
    /// Generate traffic with XDP live frames (BPF_PROG_RUN)
    Pktgen(pktgen::PktgenArgs),
    /// Benchmarks in network namespaces: Mpps vs a bare forwarder, ns/packet, HTTP vs HAProxy; writes BENCHMARKS.md
    Bench(bench::BenchArgs),
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
    let deadline = std::time::Instant::now() + timeout;
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
        Command::Teardown { pin_dir, config } => {
            // Never under a running agent: it would keep writing maps that
            // no longer forward anything.
            let _lock = pin_dir
                .exists()
                .then(|| {
                    host::PinLock::acquire(
                        &pin_dir,
                        "stop the agent first; `lb teardown` removes the data plane it runs",
                    )
                })
                .transpose()?;
            if let Some(announce) = config
                .map(|c| config::load(&c))
                .transpose()?
                .and_then(|c| c.announce)
            {
                lb_userspace::announce::withdraw_all(&announce)
                    .context("withdrawing the VIPs from BGP")?;
                println!(
                    "withdrew every VIP from BGP ({})",
                    announce.include.display()
                );
            }
            let removed = Dataplane::teardown(&pin_dir)?;
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
        Command::Lab(cmd) => lab::run(cmd).context("lab"),
        Command::LabServe(args) => lab::serve(args),
        Command::Pktgen(args) => pktgen::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
