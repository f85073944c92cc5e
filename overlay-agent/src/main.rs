//! `overlay-agent`: the per-node daemon. See `overlay_agent::daemon` for what it does.

use std::process::ExitCode;

use clap::Parser as _;
use overlay_agent::{
    cli::{Cli, Command, normalize_go_flags},
    daemon,
};
use tracing::error;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_go_flags(std::env::args_os()));
    init_tracing(cli.flags.verbosity);
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => daemon::run(cli.flags).await,
        Command::Counters => daemon::print_counters(&cli.flags.bpf_dir),
        Command::Peers => daemon::print_peers(&cli.flags.bpf_dir),
        Command::Nat => daemon::print_nat(&cli.flags.bpf_dir),
        Command::Endpoints => daemon::print_endpoints(&cli.flags.bpf_dir),
        Command::Cleanup => daemon::cleanup(&cli.flags.bpf_dir).await,
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
    // Colours only on a terminal: the logs usually go to journald or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}
