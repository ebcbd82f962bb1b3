//! `lb`: the XDP load balancer's agent and CLI.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use lb_userspace::{agent, config, lab};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP L4 load balancer: agent and control CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data plane, attach it and keep it in sync with the config
    Run(agent::RunArgs),
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
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match Cli::parse().command {
        Command::Run(args) => agent::run(args),
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
    }
}
