//! `make dashboards-check`: every dashboard query, proven against a real Prometheus.
//!
//! Starts etcd, NATS (JetStream) and anvil, a coordinator and two workers; registers a few
//! subscriptions through the admin API (one paused, one with confirmations), makes the chain
//! produce an undecodable log and a reorg, and keeps sending transfers. Then it starts
//! `prometheus` (Debian package) scraping the coordinator and both workers every second with
//! `dashboards/alerts.yaml` loaded, waits until every target has been scraped several times,
//! and evaluates every panel query of every `dashboards/*.json` through Prometheus' HTTP API,
//! template variables substituted (query variables resolved from Prometheus itself). A query
//! that errors or returns no series is a failure, named by dashboard, panel and expression.
//! Every alert rule must evaluate without error and name only metrics that exist.
//!
//! The last line is `dashboards: <P> panels, <Q> queries, <E> empty or failing`; it exits
//! non-zero unless E = 0 (and the alert rules are healthy).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_tests::chain::{NOTE_EVENT, TRANSFER_EVENT};
use herald_tests::herald::{CoordinatorProcess, CoordinatorSettings};
use herald_tests::process::{ChildProcess, free_port};
use herald_tests::{Stack, WorkerProcess, repo_root, tool, wait_for};
use reqwest::Url;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Concrete values for Grafana's built-in variables (scrapes are 1 s apart).
const BUILTINS: [(&str, &str); 7] = [
    ("__rate_interval", "30s"),
    ("__interval_ms", "5000"),
    ("__interval", "5s"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
    ("__range", "5m"),
    ("__auto", "5s"),
];

/// A Prometheus HTTP API client.
struct Prometheus {
    base: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn get(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let url = Url::parse_with_params(&format!("{}{path}", self.base), params)?;
        let body: Value = self.http.get(url).send().await?.json().await?;
        if body["status"] != "success" {
            anyhow::bail!("{} {}", body["errorType"].as_str().unwrap_or("error"), body["error"]);
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result list (a scalar or string result counts as one element).
    async fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.get("/api/v1/query", &[("query", expr)]).await?;
        Ok(match data["result"].as_array() {
            Some(list) => list.clone(),
            None if data["result"].is_null() => vec![],
            None => vec![data["result"].clone()],
        })
    }

    async fn scalar(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await.ok()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let root = repo_root();
    let dashboards = load_dashboards(&root.join("dashboards"))?;
    anyhow::ensure!(!dashboards.is_empty(), "no dashboards/*.json");

    println!("dashboards-check: starting etcd, nats-server -js, anvil, a coordinator and 2 workers");
    let stack = Arc::new(Stack::start().await?);
    stack.chain.emit_many(5).await?;
    let coordinator =
        CoordinatorProcess::start(CoordinatorSettings::new(stack.etcd.endpoint(), stack.anvil.url())).await?;
    let workers = [
        WorkerProcess::start(stack.worker_settings("worker-a"))?,
        WorkerProcess::start(stack.worker_settings("worker-b"))?,
    ];
    let contract = stack.chain.contract.to_string();
    // Subscriptions must differ in chain, contract, event or filters: these filter on recipients.
    let recipients = |n: u64| -> Vec<String> {
        (0..n).map(|k| herald_tests::chain::expected_transfer(k).1.to_string()).collect()
    };
    let subscriptions = [
        serde_json::json!({"id": "transfers", "chain_id": 31337, "address": contract, "event": TRANSFER_EVENT,
            "start_block": 0}),
        serde_json::json!({"id": "transfers-confirmed", "chain_id": 31337, "address": contract,
            "event": TRANSFER_EVENT, "start_block": 0, "confirmations": 2, "filters": {"to": recipients(50)}}),
        serde_json::json!({"id": "notes", "chain_id": 31337, "address": contract, "event": NOTE_EVENT,
            "start_block": 0}),
        serde_json::json!({"id": "paused", "chain_id": 31337, "address": contract, "event": TRANSFER_EVENT,
            "start_block": 0, "filters": {"to": recipients(1)}}),
    ];
    for body in &subscriptions {
        let (status, answer) = coordinator.post("/v1/subscriptions", body).await?;
        anyhow::ensure!(status == 201, "registration failed: {status} {answer}\n{}", coordinator.log_tail());
    }
    let (status, answer) = coordinator.post("/v1/subscriptions/paused/pause", &serde_json::json!({})).await?;
    anyhow::ensure!(status < 300, "pause failed: {status} {answer}");

    // An undecodable log and a reorg of published blocks: decode failures and retractions.
    stack.chain.emit_malformed_transfer().await?;
    stack.chain.emit_note("hello", b"herald", &[1, 2, 3]).await?;
    let head = stack.chain.emit_many(3).await?;
    let workers_ref = &workers;
    wait_for("both workers to run subscriptions and catch up", TIMEOUT, || async {
        let mut running = 0;
        for w in &workers {
            if w.metric("herald_worker_assigned_subscriptions", &[]).await.unwrap_or(0.0) > 0.0 {
                running += 1;
            }
        }
        let cursor = |id: &'static str| async move {
            let mut best = 0.0f64;
            for w in workers_ref {
                let cursor = w.metric("herald_subscription_cursor_block", &[("subscription_id", id)]).await;
                best = best.max(cursor.unwrap_or(0.0));
            }
            Some(best)
        };
        let caught_up = cursor("transfers").await? >= head as f64 && cursor("notes").await? >= head as f64;
        (running == 2 && caught_up).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", workers[0].log_tail(), workers[1].log_tail()))?;
    stack.chain.reorg(3, &[(2, 0)]).await?;
    println!("dashboards-check: 4 subscriptions registered (1 paused), an undecodable log and a reorg made");

    // Steady traffic until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (stack, stop) = (stack.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = stack.chain.emit_many(2).await {
                    eprintln!("dashboards-check: sending transfers failed: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    // Prometheus, scraping every second, with the alert rules loaded.
    let dir = tempfile::Builder::new().prefix("herald-prometheus-").tempdir()?;
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    let alerts = root.join("dashboards/alerts.yaml");
    let worker_targets: Vec<String> =
        workers.iter().map(|w| format!("'127.0.0.1:{}'", w.settings().metrics_port)).collect();
    let coordinator_target = coordinator.url("").trim_start_matches("http://").to_owned();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n\
             \x20 - job_name: herald-coordinator\n    static_configs:\n      - targets: ['{coordinator_target}']\n\
             \x20 - job_name: herald-worker\n    static_configs:\n      - targets: [{}]\n",
            alerts.display(),
            worker_targets.join(", "),
        ),
    )?;
    let args = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--log.level=warn".to_owned(),
    ];
    let prometheus_process = ChildProcess::spawn("prometheus", &tool("prometheus"), &args, &[], dir.path())?;
    let prometheus = Prometheus { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
    println!("dashboards-check: prometheus on 127.0.0.1:{port} scraping 3 targets every second");
    wait_for("Prometheus to scrape every target at least 10 times", TIMEOUT, || async {
        let up = prometheus.scalar("count(up == 1)").await?;
        let scrapes = prometheus.scalar("min(count_over_time(up[1m]))").await?;
        (up == 3.0 && scrapes >= 10.0).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", prometheus_process.log_tail(20)))?;

    let names: BTreeSet<String> = prometheus
        .get("/api/v1/label/__name__/values", &[])
        .await?
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();

    // Alert rules: loaded, evaluated without error, naming only existing metrics.
    let mut rule_failures = Vec::new();
    let rules = wait_for("every alert rule to be evaluated", TIMEOUT, || async {
        let groups = prometheus.get("/api/v1/rules", &[]).await.ok()?;
        let rules: Vec<Value> = groups["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated =
            rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")));
        (!rules.is_empty() && evaluated).then_some(rules)
    })
    .await?;
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let query = rule["query"].as_str().unwrap_or("");
        if rule["health"] != "ok" {
            rule_failures.push(format!("alert {name}: {} ({})", rule["health"], rule["lastError"]));
        }
        for metric in unknown_metrics(query, &names) {
            rule_failures.push(format!("alert {name}: no metric {metric} is exported"));
        }
    }
    println!("alerts: {} rules, {} failing", rules.len(), rule_failures.len());

    // Every panel query of every dashboard. A query fails when it cannot be evaluated, errors,
    // names a metric nobody exports, or returns no series.
    let (mut panels, mut queries, mut failing) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for (file, dashboard) in &dashboards {
        for problem in structure_problems(dashboard) {
            failures.push(format!("{file}: {problem}"));
        }
        let vars = resolve_variables(&prometheus, dashboard).await.map_err(|e| format!("{file}: {e}"));
        if let Err(e) = &vars {
            failures.push(e.clone());
        }
        for panel in all_panels(dashboard) {
            let targets: Vec<&Value> = panel["targets"]
                .as_array()
                .map(|t| t.iter().filter(|t| t["expr"].is_string()).collect())
                .unwrap_or_default();
            if targets.is_empty() {
                continue;
            }
            panels += 1;
            let title = panel["title"].as_str().unwrap_or("?");
            for target in targets {
                queries += 1;
                let raw = target["expr"].as_str().unwrap_or_default();
                let problems = match &vars {
                    Ok(vars) => query_problems(&prometheus, &substitute(raw, vars), &names).await,
                    Err(_) => vec![format!("{raw}: template variables unresolved")],
                };
                if !problems.is_empty() {
                    failing += 1;
                    failures.extend(problems.into_iter().map(|p| format!("{file} / {title:?}: {p}")));
                }
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    drop(prometheus_process);
    drop(workers);
    drop(coordinator);
    for failure in rule_failures.iter().chain(&failures) {
        println!("FAIL {failure}");
    }
    println!("dashboards: {panels} panels, {queries} queries, {failing} empty or failing");
    std::process::exit(if failures.is_empty() && rule_failures.is_empty() { 0 } else { 1 });
}

/// Why `expr` (variables substituted) fails, if it does.
async fn query_problems(prometheus: &Prometheus, expr: &str, names: &BTreeSet<String>) -> Vec<String> {
    if expr.contains('$') {
        return vec![format!("{expr}: unresolved variable")];
    }
    let mut problems: Vec<String> = unknown_metrics(expr, names)
        .into_iter()
        .map(|m| format!("{expr}: no metric {m} is exported"))
        .collect();
    match prometheus.query(expr).await {
        Err(e) => problems.push(format!("{expr}: {e}")),
        Ok(result) if result.is_empty() => problems.push(format!("{expr}: no series")),
        Ok(_) => {}
    }
    problems
}

/// `dashboards/*.json`, by file name.
fn load_dashboards(dir: &Path) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let value = serde_json::from_slice(&std::fs::read(&path)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            out.insert(name, value);
        }
    }
    Ok(out)
}

/// Panels, rows' nested panels included (rows themselves excluded).
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

/// What a dashboard must have for the chart and Grafana's sidecar: a uid, a title, a
/// `datasource` variable of type datasource, and every panel and target using it.
fn structure_problems(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["uid", "title"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no {key}"));
        }
    }
    let vars = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
    if !vars
        .iter()
        .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus")
    {
        problems.push("no `datasource` variable of type datasource (query prometheus)".into());
    }
    for panel in all_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        let uses_variable = |ds: &Value| ds["uid"] == "${datasource}" || ds == "${datasource}";
        if !uses_variable(&panel["datasource"]) {
            problems.push(format!("panel {title:?} does not use the datasource variable"));
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if !target["datasource"].is_null() && !uses_variable(&target["datasource"]) {
                problems.push(format!("a target of panel {title:?} does not use the datasource variable"));
            }
        }
    }
    problems
}

/// Values for the dashboard's query variables (`label_values(selector, label)`), taken from
/// Prometheus in order (a later variable's selector may use an earlier one), plus the
/// built-ins. The first value in sorted order is used.
async fn resolve_variables(
    prometheus: &Prometheus,
    dashboard: &Value,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut vars: Vec<(String, String)> =
        BUILTINS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let definition = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap_or("");
        let inner =
            definition.trim().strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).ok_or_else(
                || anyhow::anyhow!("variable {name}: only label_values(selector, label) is supported"),
            )?;
        let (selector, label) = inner
            .rsplit_once(',')
            .ok_or_else(|| anyhow::anyhow!("variable {name}: label_values needs a selector"))?;
        let selector = substitute(selector.trim(), &vars);
        let series = prometheus
            .get("/api/v1/series", &[("match[]", selector.as_str())])
            .await
            .map_err(|e| anyhow::anyhow!("variable {name}: {selector}: {e}"))?;
        let values: BTreeSet<&str> =
            series.as_array().into_iter().flatten().filter_map(|s| s[label.trim()].as_str()).collect();
        let value = values
            .first()
            .ok_or_else(|| anyhow::anyhow!("variable {name}: {selector} has no {} values", label.trim()))?;
        vars.push((name.to_owned(), (*value).to_owned()));
    }
    // Longest names first: `$__range_s` before `$__range`.
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    Ok(vars)
}

/// Substitutes `${name}`, `[[name]]` and `$name`.
fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut out = expr.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value).replace(&format!("[[{name}]]"), value);
        out = out.replace(&format!("${name}"), value);
    }
    out
}

/// `herald_*` names in `expr` that Prometheus has never seen.
fn unknown_metrics(expr: &str, names: &BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let preceded_by_label_char =
            rest[..at].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"');
        if !preceded_by_label_char && !names.contains(name) && !unknown.iter().any(|u| u == name) {
            unknown.push(name.to_owned());
        }
        rest = &tail[end..];
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_substituted_longest_first() {
        let mut vars =
            vec![("__range".to_owned(), "5m".to_owned()), ("__range_s".to_owned(), "300".to_owned())];
        vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        assert_eq!(substitute("x[$__range] $__range_s ${__range} [[__range]]", &vars), "x[5m] 300 5m 5m");
    }

    #[test]
    fn unknown_metric_names_are_found() {
        let names: BTreeSet<String> = ["herald_a_total".to_owned()].into();
        assert_eq!(unknown_metrics("rate(herald_a_total[1m]) + herald_b", &names), vec!["herald_b"]);
    }
}
