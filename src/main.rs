use std::process::ExitCode;

use clap::Parser;
use lomar::cli::{run, Cli};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain: what failed, then why.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
