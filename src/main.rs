use std::process::ExitCode;

use clap::Parser;
use lomar::cli::{run, Cli};
use lomar::cpu::line_alloc::LineAligned;

/// Large blocks on cache lines, for the CPU products' vector stores (src/cpu/line_alloc.rs).
#[global_allocator]
static ALLOCATOR: LineAligned = LineAligned;

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
