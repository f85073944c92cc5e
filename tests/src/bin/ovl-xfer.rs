//! Test helper run inside namespaces by the harness: bounded, verified TCP transfers and UDP
//! echoes. See `overlay_tests::xfer` for the subcommands and output format.

fn main() {
    std::process::exit(overlay_tests::xfer::main_with_args(
        std::env::args().skip(1).collect(),
    ));
}
