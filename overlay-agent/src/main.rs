//! `overlay-agent`: the per-node daemon. See `overlay_agent::daemon` for what it does.

use std::process::ExitCode;

use overlay_agent::{
    cli::{Cli, Command, EventType, Output},
    daemon, datapath, monitor, status,
};
use tracing::error;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_process_env(std::env::args_os());
    init_tracing(cli.flags.verbosity);
    let dir = cli.flags.bpf_dir.clone();
    let json = |o: Output| o == Output::Json;
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => daemon::run(cli.flags).await,
        Command::Counters { output } if json(output) => status::print_counters_json(&dir),
        Command::Counters { .. } => datapath::print::counters(&dir),
        Command::Peers { output } if json(output) => status::print_peers_json(&dir),
        Command::Peers { .. } => datapath::print::peers(&dir),
        Command::Nat { output } if json(output) => status::print_nat_json(&dir),
        Command::Nat { .. } => datapath::print::nat(&dir),
        Command::Status { output } => {
            status::print_status(&dir, &cli.flags.status_file, json(output))
        }
        Command::Monitor {
            event_type: EventType::Drop,
            output,
            count,
            timeout,
        } => monitor::run(&dir, json(output), count, timeout).await,
        Command::Endpoints => datapath::print::endpoints(&dir),
        Command::Cleanup => daemon::cleanup(&dir).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated as anyhow's `{:#}` prints them, without a cause
/// that the text before it already ends with: several error types name their source in
/// their own message (`cannot write X: <io error>`) and also return it as their source, which
/// `{:#}` would print twice.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
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

#[cfg(test)]
mod tests {
    use std::io;

    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write /x/subnet.env: {source}")]
    struct Names {
        source: io::Error,
    }

    #[test]
    fn a_cause_named_in_the_message_is_not_repeated() {
        let err = anyhow::Error::new(Names {
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        })
        .context("writing the subnet file");
        assert_eq!(
            error_chain(&err),
            "writing the subnet file: cannot write /x/subnet.env: permission denied"
        );
        // Causes that the message does not name are all there.
        let err = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound))
            .context("reading")
            .context("starting");
        assert_eq!(error_chain(&err), "starting: reading: entity not found");
    }
}
