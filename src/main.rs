#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tokenvault::cli::Cli::parse();
    // An actix System over a multi-thread Tokio runtime: actix-server's workers then run as the System's
    // arbiters, which drain in-flight connections on a graceful stop, and the offloaded database and
    // upstream work (see `routes::offload`) still gets every core.
    let system = actix_web::rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("the Tokio runtime starts")
    });
    // What a command changes is audited as done by the CLI (`serve` names its own actors per request).
    let context = tokenvault::request_context::Context { request_id: None, actor: Some("cli".into()) };
    match system.block_on(tokenvault::request_context::scope(context, tokenvault::cli::run(cli))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line naming the cause: the outermost context and its sources.
            let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
            eprintln!("tokenvault: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
