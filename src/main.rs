use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    qtune::tune_process();
    match qtune::cli::main(qtune::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` keeps the causes on one line; a server's error body is printed as it came.
            eprintln!("qtune: {e:#}");
            ExitCode::FAILURE
        }
    }
}
