//! `overlay-agent`: the per-node daemon. See the crate docs of `overlay_agent` for the parts.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use overlay_agent::{
    cli::{Cli, Command, Flags, normalize_go_flags},
    datapath::Datapath,
    iface,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_go_flags(std::env::args_os()));
    init_tracing(cli.flags.verbosity);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.flags).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    // Install the handlers first so a signal during start-up still ends the agent cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let ext = iface::discover(&flags.iface, &flags.iface_regex, flags.public_ip)
        .await
        .context("choosing the external interface")?;
    info!(
        "using interface {} (index {}, MTU {}), address {}, public IP {}",
        ext.name, ext.index, ext.mtu, ext.iface_addr, ext.public_ip
    );

    let mut datapath = Datapath::load()?;
    datapath.attach_underlay(&ext.name)?;
    info!("data path attached to {}", ext.name);

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
        _ = sigint.recv() => info!("SIGINT received, shutting down"),
    }
    for (reason, counter) in datapath.counters()? {
        info!("counter {}: {} packets, {} bytes", reason.name(), counter.packets, counter.bytes);
    }
    drop(datapath);
    info!("programs detached; exiting");
    Ok(())
}
