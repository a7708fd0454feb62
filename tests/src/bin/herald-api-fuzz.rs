//! `make api-fuzz`: schemathesis against a live coordinator, all checks on.
//!
//! Starts etcd, anvil (for chain heads) and a coordinator, runs schemathesis with the admin
//! token against `/v1/openapi.json`, and reads its HAR and JUnit reports. The last line is
//! `api fuzz: <N> requests, <M> server errors, <K> schema violations`; it exits non-zero unless
//! N >= 1000 and M = K = 0. `API_FUZZ_EXAMPLES` (per operation, default 100) and
//! `API_FUZZ_SEED` (default 1, for a reproducible CI run) tune it.

use std::process::Stdio;

use herald_tests::herald::{ADMIN_TOKEN, CoordinatorProcess, CoordinatorSettings};
use herald_tests::{Anvil, Etcd, repo_root};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let examples = env_or("API_FUZZ_EXAMPLES", "100");
    let seed = env_or("API_FUZZ_SEED", "1");
    let (etcd, anvil) = tokio::try_join!(Etcd::start(), Anvil::start())?;
    let coordinator =
        CoordinatorProcess::start(CoordinatorSettings::new(etcd.endpoint(), anvil.url())).await?;

    let reports = tempfile::Builder::new().prefix("herald-api-fuzz-").tempdir()?;
    let har = reports.path().join("requests.har");
    let junit = reports.path().join("junit.xml");
    let root = repo_root();
    let schemathesis = root.join(".tools/venv/bin/schemathesis");
    anyhow::ensure!(schemathesis.exists(), "schemathesis is not installed; run scripts/install-deps.sh");
    let status = tokio::process::Command::new(&schemathesis)
        .arg("--config-file")
        .arg(root.join("tests/api-fuzz/schemathesis.toml"))
        .arg("run")
        .arg(coordinator.url("/v1/openapi.json"))
        .args([
            "--checks",
            "all",
            "--workers",
            "1",
            "--no-color",
            "--max-examples",
            &examples,
            "--seed",
            &seed,
        ])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--report", "har,junit"])
        .arg("--report-har-path")
        .arg(&har)
        .arg("--report-junit-path")
        .arg(&junit)
        .stdin(Stdio::null())
        .status()
        .await?;

    let har: serde_json::Value = serde_json::from_slice(&std::fs::read(&har)?)?;
    let entries = har["log"]["entries"].as_array().cloned().unwrap_or_default();
    let requests = entries.len();
    let server_errors =
        entries.iter().filter(|e| e["response"]["status"].as_u64().is_some_and(|s| s >= 500)).count();
    let junit = std::fs::read_to_string(&junit)?;
    let violations = junit.matches("<failure").count() + junit.matches("<error").count();
    drop(coordinator);
    println!("api fuzz: {requests} requests, {server_errors} server errors, {violations} schema violations");
    let ok = status.success() && requests >= 1000 && server_errors == 0 && violations == 0;
    std::process::exit(if ok { 0 } else { 1 });
}
