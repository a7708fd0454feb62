//! The credentials the Helm chart mounts, against real services: etcd over TLS with client
//! certificate authentication and etcd's own user/password auth, NATS over TLS, RPC URLs from
//! an `rpc_urls_file`. A coordinator registers a subscription and a worker joins the cluster
//! through them. Certificates come from the `openssl` command line.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, Permission, TlsOptions};
use herald_tests::process::{ChildProcess, free_port};
use herald_tests::services::ANVIL_CHAIN_ID;
use herald_tests::{Anvil, init_tracing, tool, wait_for, workspace_bin};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN_TOKEN: &str = "credentials-test-admin-token";

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and client certificates `root` (etcd maps the CN
/// to its root user) and `herald-client` (no such user: herald authenticates with a password).
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let days = ["-days", "2"];
    openssl(
        dir,
        &[
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt"][..],
            &["-subj", "/CN=herald-test-ca"],
            &days,
        ]
        .concat(),
    )?;
    for (name, cn, ext) in [
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("root", "root", "extendedKeyUsage=clientAuth\n"),
        ("herald", "herald-client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, crt, extfile, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
            format!("/CN={cn}"),
        );
        openssl(
            dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj],
        )?;
        openssl(
            dir,
            &[
                &["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"][..],
                &["-out", &crt, "-extfile", &extfile],
                &days,
            ]
            .concat(),
        )?;
    }
    Ok(())
}

async fn root_client(dir: &Path, endpoint: &str) -> anyhow::Result<Client> {
    let tls =
        TlsOptions::new().ca_certificate(Certificate::from_pem(std::fs::read(dir.join("ca.crt"))?)).identity(
            Identity::from_pem(std::fs::read(dir.join("root.crt"))?, std::fs::read(dir.join("root.key"))?),
        );
    let options = ConnectOptions::new().with_tls(tls).with_connect_timeout(Duration::from_secs(2));
    Ok(Client::connect([endpoint], Some(options)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_use_etcd_tls_user_auth_and_nats_tls() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::Builder::new().prefix("herald-credentials-").tempdir()?;
    let d = dir.path();
    make_certificates(d)?;
    let pem = |name: &str| d.join(name).to_string_lossy().into_owned();

    // etcd: TLS only, client certificates required.
    let (port, peer_port) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let etcd_args = [
        "--name",
        "herald-tls",
        "--data-dir",
        &pem("etcd-data"),
        "--listen-client-urls",
        &endpoint,
        "--advertise-client-urls",
        &endpoint,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("herald-tls={peer}"),
        "--cert-file",
        &pem("server.crt"),
        "--key-file",
        &pem("server.key"),
        "--trusted-ca-file",
        &pem("ca.crt"),
        "--client-cert-auth",
        "--log-level",
        "warn",
    ]
    .map(String::from);
    let etcd = ChildProcess::spawn("etcd", &tool("etcd"), &etcd_args, &[], d)?;
    let mut root = wait_for("etcd over TLS", TIMEOUT, || async {
        let mut c = root_client(d, &endpoint).await.ok()?;
        c.status().await.ok().map(|_| c)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", etcd.log()))?;

    // etcd auth: root, and a `herald` user that may only touch /herald.
    root.user_add("root", "root-password", None).await?;
    root.user_grant_role("root", "root").await?;
    root.user_add("herald", "herald-password", None).await?;
    root.role_add("herald").await?;
    root.role_grant_permission("herald", Permission::read_write("/herald").with_prefix()).await?;
    root.user_grant_role("herald", "herald").await?;
    root.auth_enable().await?;
    std::fs::write(d.join("etcd-password"), "herald-password\n")?;

    // NATS with JetStream over TLS.
    let nats_port = free_port();
    let nats_args = [
        "-a",
        "127.0.0.1",
        "-p",
        &nats_port.to_string(),
        "-js",
        "-sd",
        &pem("nats-data"),
        "--tls",
        "--tlscert",
        &pem("server.crt"),
        "--tlskey",
        &pem("server.key"),
    ]
    .map(String::from);
    let _nats = ChildProcess::spawn("nats-server", &tool("nats-server"), &nats_args, &[], d)?;

    let anvil = Anvil::start().await?;
    std::fs::write(d.join("rpc-urls"), format!("# from a mounted secret\n{}\n", anvil.url()))?;

    let etcd_toml = format!(
        "[etcd]\nendpoints = [\"{endpoint}\"]\nuser = \"herald\"\npassword_file = \"{}\"\n\
         [etcd.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pem("etcd-password"),
        pem("ca.crt"),
        pem("herald.crt"),
        pem("herald.key"),
    );
    let chain_toml =
        format!("[[chains]]\nchain_id = {ANVIL_CHAIN_ID}\nrpc_urls_file = \"{}\"\n", pem("rpc-urls"));

    let api_port = free_port();
    let coordinator_toml = format!(
        "listen = \"127.0.0.1:{api_port}\"\n{etcd_toml}[auth]\nadmin_token = \"{ADMIN_TOKEN}\"\n{chain_toml}"
    );
    std::fs::write(d.join("coordinator.toml"), coordinator_toml)?;
    let coordinator = ChildProcess::spawn(
        "herald-coordinator",
        &workspace_bin("herald-coordinator"),
        &["--config".to_owned(), pem("coordinator.toml")],
        &[],
        d,
    )?;
    let worker_toml = format!(
        "worker_id = \"tls-worker\"\n{etcd_toml}[nats]\nurl = \"tls://127.0.0.1:{nats_port}\"\n\
         ack_timeout = \"5s\"\ntls_ca_file = \"{}\"\n[membership]\nlease_ttl = \"5s\"\ncapacity = 0\n{chain_toml}",
        pem("ca.crt"),
    );
    std::fs::write(d.join("worker.toml"), worker_toml)?;
    let worker = ChildProcess::spawn(
        "herald-worker",
        &workspace_bin("herald-worker"),
        &["--config".to_owned(), pem("worker.toml")],
        &[],
        d,
    )?;

    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{api_port}");
    let logs = || format!("coordinator:\n{}\nworker:\n{}", coordinator.log(), worker.log());
    wait_for("the coordinator to be ready (etcd over TLS, as user herald)", TIMEOUT, || async {
        let r = http.get(format!("{api}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    let created = http
        .post(format!("{api}/v1/subscriptions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "id": "tls-sub", "chain_id": ANVIL_CHAIN_ID,
            "address": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
            "event": "event Transfer(address indexed from, address indexed to, uint256 value)",
            "start_block": 0,
        }))
        .send()
        .await?;
    assert_eq!(created.status().as_u16(), 201, "{}", created.text().await?);
    let stored = root.get("/herald/subscriptions/", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(stored.kvs().len(), 1, "the subscription is in etcd, written as user herald");

    // The worker reaches NATS over TLS (stream created), the chain through its URL file, and
    // registers in etcd: the coordinator lists it.
    wait_for("the worker to register", TIMEOUT, || async {
        let r = http.get(format!("{api}/v1/workers")).send().await.ok()?;
        let workers: Value = r.json().await.ok()?;
        workers.to_string().contains("tls-worker").then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;

    // --check-config does not read the mounted files; starting does, and names a missing one.
    std::fs::remove_file(d.join("ca.crt"))?;
    let check = std::process::Command::new(workspace_bin("herald-coordinator"))
        .args(["--check-config", "--config", &pem("coordinator.toml")])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "config ok", "{check:?}");
    let missing = std::process::Command::new(workspace_bin("herald-worker"))
        .args(["--config", &pem("worker.toml")])
        .output()?;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("etcd.tls.ca_file"), "{missing:?}");
    Ok(())
}
