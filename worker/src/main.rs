//! `herald-worker`: see the crate docs of `herald_worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use herald_worker::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

// The system allocator, on purpose: with tens of thousands of quiet subscriptions per worker,
// mimalloc held 18.6 KB of RSS per subscription against glibc's 11.5 KB (BENCH=scale, 10,000
// subscriptions), for no backfill throughput difference beyond the benchmark's noise.

/// herald worker: contract logs -> JetStream, with a fenced cursor in etcd.
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check_config {
        return match Config::check(args.config.as_deref()) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald-worker: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald-worker: {e}");
            return ExitCode::from(2);
        }
    };
    // Both rustls crypto providers are compiled in (async-nats asks for ring, reqwest for
    // aws-lc-rs), so rustls cannot pick one by itself: NATS over TLS would panic without this.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
            eprintln!("herald-worker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = match herald_worker::shutdown::install() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("herald-worker: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let span = tracing::info_span!("worker", worker_id = %config.worker_id);
        match tracing::Instrument::instrument(herald_worker::run(config, shutdown), span).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "worker failed");
                eprintln!("herald-worker: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
