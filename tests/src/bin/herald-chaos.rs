//! `make chaos`: the randomized fault soak against clustered etcd and NATS (see
//! `herald_tests::chaos` and the README's "Chaos soak"). Prints the faults by kind, one line
//! per subscription, then `chaos: faults=F lost=L ...`; exits non-zero when any count but the
//! faults is above 0, keeping the logs and printing how to replay the run.

use herald_tests::chaos::{ChaosConfig, run};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let config = match ChaosConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    println!(
        "chaos: seed={} seconds={} faults={} (logs in {})",
        config.seed,
        config.duration.as_secs(),
        config.faults,
        config.log_dir.display()
    );
    let report = match run(&config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: the soak could not run: {e:#}");
            eprintln!(
                "chaos: logs kept in {}; replay with: {}",
                config.log_dir.display(),
                config.replay_command()
            );
            return std::process::ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if report.passed() {
        let _ = std::fs::remove_dir_all(&config.log_dir);
    } else {
        println!("chaos: FAILED; logs kept in {}", config.log_dir.display());
        println!("chaos: replay with: {}", config.replay_command());
    }
    println!("{}", report.summary());
    if report.passed() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
