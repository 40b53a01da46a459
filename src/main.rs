#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = tokenvault::cli::Cli::parse();
    match tokenvault::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line naming the cause: the outermost context and its sources.
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("tokenvault: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
