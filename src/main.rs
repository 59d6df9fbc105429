//! Entry point: parse the command line and hand over to `cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    ferrotune::train::init_pool();
    let cli = ferrotune::config::Cli::parse();
    match ferrotune::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
