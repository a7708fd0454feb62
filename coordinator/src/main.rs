//! `herald-coordinator`: see the crate docs of `herald_coordinator`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use herald_coordinator::config::{Config, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// herald coordinator: subscription registry and admin API.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file; `HERALD_*` variables override it.
    #[arg(long, short, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Load and validate the configuration (file and `HERALD_*` variables), print `config ok`
    /// and exit: 0 when valid, 2 otherwise. Files named by `*_file` keys are not read.
    #[arg(long)]
    check_config: bool,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_openapi {
        let document = herald_coordinator::api::handlers::document_with(&[]);
        println!("{}", serde_json::to_string_pretty(&document).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    if args.check_config {
        return match Config::check(args.config.as_deref()) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald-coordinator: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald-coordinator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            eprintln!("herald-coordinator: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let root = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("shutdown requested; a second signal exits at once");
            root.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            std::process::exit(130);
        });
        match herald_coordinator::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herald-coordinator: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
