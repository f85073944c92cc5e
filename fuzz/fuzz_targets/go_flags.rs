//! The command line, as a unit file written for flanneld gives it: NUL-separated arguments
//! (any bytes), Go-style single-dash flags normalised, then parsed by clap. Beyond "no panic":
//! normalisation keeps the argument count, never touches the program name, double-dash flags
//! or values, and is idempotent.
#![no_main]

use std::{ffi::OsString, os::unix::ffi::OsStringExt as _, sync::LazyLock};

use clap::{CommandFactory as _, FromArgMatches as _};
use libfuzzer_sys::fuzz_target;
use overlay_agent::cli::{Cli, normalize_go_flags};

/// The agent's command line definition, built once.
static COMMAND: LazyLock<clap::Command> = LazyLock::new(|| {
    let mut command = Cli::command();
    command.build();
    command
});

fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = std::iter::once(OsString::from("overlay-agent"))
        .chain(
            data.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| OsString::from_vec(a.to_vec())),
        )
        .collect();
    let normalized = normalize_go_flags(args.clone());
    assert_eq!(normalized.len(), args.len());
    assert_eq!(normalized[0], args[0], "the program name stays");
    for (before, after) in args.iter().zip(&normalized) {
        if before != after {
            let (b, a) = (before.to_string_lossy(), after.to_string_lossy());
            assert!(
                b.starts_with('-') && !b.starts_with("--"),
                "{b} was rewritten"
            );
            assert_eq!(a, format!("-{b}"), "only a dash is added");
        }
    }
    assert_eq!(
        normalize_go_flags(normalized.clone()),
        normalized,
        "idempotent"
    );
    // What `Cli::try_parse_from` does, with the command built (and clap's debug checks of
    // it run) once rather than for every input.
    if let Ok(matches) = COMMAND.clone().try_get_matches_from(normalized)
        && let Ok(cli) = Cli::from_arg_matches(&matches)
    {
        let _ = format!("{cli:?}");
    }
});
