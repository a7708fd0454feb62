//! The short soak of `make chaos` in `make test`: a fixed seed, every fault kind twice, about
//! three minutes against clustered etcd and NATS, checked from the consumer's side.

use std::time::Duration;

use herald_tests::chaos::{ChaosConfig, run};

/// The seed of the short soak: fixed, so CI runs the same schedule every time.
const SHORT_SEED: u64 = 14;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_every_fault_kind_keeps_every_guarantee() -> anyhow::Result<()> {
    let config = ChaosConfig {
        seed: SHORT_SEED,
        duration: Duration::from_secs(150),
        faults: 40,
        log_dir: herald_tests::repo_root().join("target/chaos/short"),
    };
    let report = run(&config).await?;
    println!("{}{}", report.table(), report.summary());
    assert!(report.fault_count() >= 40, "{}", report.summary());
    assert!(report.canonical_logs > 1000, "too little traffic: {}", report.canonical_logs);
    assert!(
        report.passed(),
        "{}\n{}\nlogs in {}; replay with {}",
        report.table(),
        report.summary(),
        config.log_dir.display(),
        config.replay_command()
    );
    let _ = std::fs::remove_dir_all(&config.log_dir);
    Ok(())
}
