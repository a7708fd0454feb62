//! Runs the soak: registration, traffic every block, the fault schedule, healing, catch-up,
//! and the consumer-side check.
//!
//! Faults run as tasks at their planned times. Each holds the lock of what it breaks (a
//! worker slot, the coordinators, etcd, NATS, the chain, the proxy, one subscription), so
//! faults of different kinds overlap and faults of one resource queue. A monitor samples the
//! coordinators for two leaders and restarts any herald process that exited without the soak
//! causing it (counted as an unexpected exit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, U256, keccak256};
use async_nats::jetstream;
use etcd_client::WatchOptions;
use herald_proto::{Cursor, EventEnvelope, Keyspace, SubscriptionId};
use nix::sys::signal::Signal;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::deployment::{BASE_WORKERS, Deployment, WORKER_LEASE_TTL_SECS};
use super::schedule::{FaultKind, PlannedFault, SplitMix64, plan};
use super::verdict::{CanonicalLog, Counts, Delivered, Evidence, InjectedReorg, judge_in_detail};
use crate::chain::{NOTE_EVENT, TRANSFER_EVENT};
use crate::services::ANVIL_CHAIN_ID;
use crate::wait_for;

/// How a soak runs.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Seed of the schedule and of every choice.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// How many faults.
    pub faults: usize,
    /// Where herald's logs go (kept when the run fails).
    pub log_dir: PathBuf,
}

impl ChaosConfig {
    /// From `CHAOS_SECONDS` (900), `CHAOS_SEED` (the clock) and `CHAOS_FAULTS` (220).
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let number = |key: &str, default: u64| -> anyhow::Result<u64> {
            var(key).map_or(Ok(default), |v| {
                v.trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{key} must be a non-negative integer, not {v:?}"))
            })
        };
        let clock = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let seed = number("CHAOS_SEED", clock % 1_000_000)?;
        let seconds = number("CHAOS_SECONDS", 900)?;
        let faults = number("CHAOS_FAULTS", 220)? as usize;
        anyhow::ensure!(seconds >= 30, "CHAOS_SECONDS must be at least 30");
        anyhow::ensure!(faults >= 1, "CHAOS_FAULTS must be at least 1");
        let log_dir = crate::repo_root().join("target/chaos").join(format!("seed-{seed}"));
        Ok(Self { seed, duration: Duration::from_secs(seconds), faults, log_dir })
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        format!(
            "CHAOS_SEED={} CHAOS_SECONDS={} CHAOS_FAULTS={} make chaos",
            self.seed,
            self.duration.as_secs(),
            self.faults
        )
    }
}

/// One subscription's line of the report.
#[derive(Debug, Clone)]
pub struct SubscriptionLine {
    /// Its id.
    pub id: String,
    /// Its confirmations.
    pub confirmations: u64,
    /// Canonical logs it must hold.
    pub canonical: usize,
    /// Logs its fold holds.
    pub held: usize,
    /// Messages on its subject (this registration's).
    pub messages: usize,
    /// What went wrong.
    pub counts: Counts,
    /// The canonical logs its fold lacks, as (block, log index).
    pub lost: Vec<(u64, u64)>,
}

/// What a soak found.
#[derive(Debug, Clone)]
pub struct Report {
    /// How it ran.
    pub config: ChaosConfig,
    /// Faults injected, by kind.
    pub faults: BTreeMap<FaultKind, usize>,
    /// Faults that could not be injected or healed as planned (the soak's own trouble).
    pub fault_errors: Vec<String>,
    /// One line per subscription.
    pub subscriptions: Vec<SubscriptionLine>,
    /// The subscriptions' counts added up.
    pub totals: Counts,
    /// Log lines with a panic, in any herald log.
    pub panics: u64,
    /// Herald processes that exited without the soak causing it.
    pub exits: u64,
    /// Samples in which two coordinators said they led (twice in a row).
    pub split_brain: u64,
    /// Running workers `GET /v1/workers` did not list.
    pub unlisted: u64,
    /// Subscriptions whose cursor did not reach the head in time.
    pub behind: u64,
    /// Canonical logs of the run, over every subscription.
    pub canonical_logs: usize,
}

impl Report {
    /// Faults injected.
    pub fn fault_count(&self) -> usize {
        self.faults.values().sum()
    }

    /// The last line of the run.
    pub fn summary(&self) -> String {
        let t = &self.totals;
        format!(
            "chaos: faults={} lost={} dup={} extra={} order={} unmatched={} stale={} panics={} paused={} unexplained={} exits={} split_brain={} unlisted={} behind={}",
            self.fault_count(),
            t.lost,
            t.dup,
            t.extra,
            t.order,
            t.unmatched,
            t.stale,
            self.panics,
            t.paused,
            t.unexplained,
            self.exits,
            self.split_brain,
            self.unlisted,
            self.behind,
        )
    }

    /// Whether every count but the faults is 0.
    pub fn passed(&self) -> bool {
        self.totals.clean()
            && self.panics == 0
            && self.exits == 0
            && self.split_brain == 0
            && self.unlisted == 0
            && self.behind == 0
    }

    /// The table of faults by kind, then one line per subscription.
    pub fn table(&self) -> String {
        let mut out = String::from("faults by kind:\n");
        for kind in FaultKind::ALL {
            out.push_str(&format!(
                "  {:<24} {}\n",
                kind.name(),
                self.faults.get(&kind).copied().unwrap_or(0)
            ));
        }
        for e in &self.fault_errors {
            out.push_str(&format!("  fault trouble: {e}\n"));
        }
        out.push_str("subscriptions:\n");
        for s in &self.subscriptions {
            let c = &s.counts;
            out.push_str(&format!(
                "  {:<22} conf={} canonical={} held={} messages={} lost={} dup={} extra={} order={} unmatched={} stale={} paused={} unexplained={}\n",
                s.id, s.confirmations, s.canonical, s.held, s.messages, c.lost, c.dup, c.extra, c.order, c.unmatched, c.stale, c.paused, c.unexplained
            ));
            if !s.lost.is_empty() {
                let shown: Vec<String> =
                    s.lost.iter().take(40).map(|(block, index)| format!("{block}/{index}")).collect();
                out.push_str(&format!("    lost (block/log index): {}\n", shown.join(" ")));
            }
        }
        out
    }
}

/// A subscription the soak registered, with what it needs to compute its canonical logs.
#[derive(Debug, Clone)]
struct Planned {
    id: String,
    body: Value,
    contract: usize,
    topic0: B256,
    /// (topic position, accepted topics).
    filter: Option<(usize, BTreeSet<B256>)>,
    confirmations: u64,
    /// First block it covers.
    start: u64,
    /// `start_block` was a number (so it can be deleted and registered again as it was).
    numbered: bool,
}

/// An indexed filter as registered: the input's name, its topic position, and the accepted
/// values (as topics, and as the text the API is given).
type TopicFilter<'a> = (&'a str, usize, Vec<(B256, String)>);

/// Everything the soak's tasks share.
struct Soak {
    d: Deployment,
    chain: Mutex<()>,
    proxy: Mutex<()>,
    coordinators: Mutex<()>,
    /// Held through a whole add/remove of the extra worker: two overlapping ones would start
    /// a process in the slot while the other's still ran (dropping it kills it unseen).
    extra_worker: Mutex<()>,
    subscriptions: StdMutex<Vec<Planned>>,
    busy: StdMutex<BTreeSet<String>>,
    reorgs: StdMutex<Vec<InjectedReorg>>,
    pauses: StdMutex<BTreeMap<String, Vec<(u64, u64)>>>,
    executed: StdMutex<BTreeMap<FaultKind, usize>>,
    errors: StdMutex<Vec<String>>,
    split_brain: AtomicU64,
    /// Every value the owner keys had, per subscription id: (revision, worker), oldest first,
    /// recorded as it happens (the leader compacts etcd's history as the soak runs), with the
    /// time of the last change and what went wrong recording it, if anything.
    owners: StdMutex<(OwnerHistory, Instant, Option<String>)>,
    worker_generation: AtomicU64,
    history_registrations: AtomicU64,
    max_sequence: AtomicU64,
}

const API_TIMEOUT: Duration = Duration::from_secs(90);

fn transfer_topic() -> B256 {
    keccak256("Transfer(address,address,uint256)")
}

fn note_topic() -> B256 {
    keccak256("Note(uint256,string,bytes,uint256[])")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The Transfer `from` (or `to`) of the contract's k-th transfer, as a topic and as the API's filter value.
fn transfer_party(base: u64, k: u64) -> (B256, String) {
    let address = Address::from_word(B256::from(U256::from(base + k)));
    (address.into_word(), address.to_checksum(None))
}

/// Runs one soak.
pub async fn run(config: &ChaosConfig) -> anyhow::Result<Report> {
    let _ = std::fs::remove_dir_all(&config.log_dir);
    let d = Deployment::start(&config.log_dir, 4).await?;
    let soak = Arc::new(Soak {
        d,
        chain: Mutex::new(()),
        proxy: Mutex::new(()),
        coordinators: Mutex::new(()),
        extra_worker: Mutex::new(()),
        subscriptions: StdMutex::new(Vec::new()),
        busy: StdMutex::new(BTreeSet::new()),
        reorgs: StdMutex::new(Vec::new()),
        pauses: StdMutex::new(BTreeMap::new()),
        executed: StdMutex::new(BTreeMap::new()),
        errors: StdMutex::new(Vec::new()),
        split_brain: AtomicU64::new(0),
        owners: StdMutex::new((BTreeMap::new(), Instant::now(), None)),
        worker_generation: AtomicU64::new(1),
        history_registrations: AtomicU64::new(0),
        max_sequence: AtomicU64::new(0),
    });
    soak.register_catalogue().await?;
    println!(
        "chaos: {} subscriptions registered; traffic and faults for {:?}",
        soak.subscriptions().len(),
        config.duration
    );

    let stop = CancellationToken::new();
    let traffic = tokio::spawn(soak.clone().traffic(config.seed ^ 0x7AFF1C, stop.clone()));
    let monitor_stop = CancellationToken::new();
    let monitor = tokio::spawn(soak.clone().monitor(monitor_stop.clone()));
    let recorder = tokio::spawn(soak.clone().record_owners(monitor_stop.clone()));

    let schedule = plan(config.seed, config.faults, config.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for fault in schedule {
        tokio::time::sleep_until((started + fault.at).into()).await;
        let soak = soak.clone();
        tasks.push(tokio::spawn(async move {
            let kind = fault.kind;
            match soak.inject(&fault).await {
                Ok(()) => {
                    *soak.executed.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default() += 1
                }
                Err(e) => soak.trouble(format!("{kind} at {:?}: {e:#}", fault.at)),
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    stop.cancel();
    let last_traffic_block = traffic.await.unwrap_or(Ok(0)).unwrap_or(0);
    println!("chaos: schedule done after {:?}; healing and waiting for the cursors", started.elapsed());

    let report = soak.check(config, last_traffic_block).await;
    monitor_stop.cancel();
    let _ = monitor.await;
    let _ = recorder.await;
    let mut report = report?;
    for slot in soak.d.workers.iter().chain([]) {
        report.exits += slot.lock().await.unexpected_exits.len() as u64;
    }
    for slot in &soak.d.coordinators {
        report.exits += slot.lock().await.unexpected_exits.len() as u64;
    }
    report.split_brain = soak.split_brain.load(Ordering::SeqCst);
    // Kept beside the logs, so a failed run can be read after the fact.
    let _ = std::fs::write(
        config.log_dir.join("report.txt"),
        format!("{}canonical logs: {}\n{}\n", report.table(), report.canonical_logs, report.summary()),
    );
    Ok(report)
}

impl Soak {
    fn subscriptions(&self) -> Vec<Planned> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn trouble(&self, message: String) {
        eprintln!("chaos: {message}");
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).push(message);
    }

    /// The event of a subscription in one of the API's three forms: a signature, a JSON ABI
    /// fragment, or a name with the contract's ABI.
    fn event_fields(&self, contract: usize, signature: &str, form: usize) -> serde_json::Map<String, Value> {
        let mut fields = serde_json::Map::new();
        match form % 3 {
            0 => {
                fields.insert("event".into(), json!(signature));
            }
            1 => {
                let event =
                    herald_proto::EventDefinition::Signature(signature.into()).parse().expect("valid event");
                fields.insert("event".into(), serde_json::to_value(event).expect("an event serialises"));
            }
            _ => {
                let name = signature.trim_start_matches("event ").split('(').next().unwrap_or_default();
                fields.insert("event".into(), json!(name));
                fields.insert("abi".into(), self.d.contracts[contract].abi_json());
            }
        }
        fields
    }

    /// Registers one subscription through the API and records it.
    #[allow(clippy::too_many_arguments)]
    async fn register(
        &self,
        id: &str,
        contract: usize,
        note: bool,
        form: usize,
        filter: Option<TopicFilter<'_>>,
        confirmations: u64,
        start: Option<u64>,
    ) -> anyhow::Result<Planned> {
        let signature = if note { NOTE_EVENT } else { TRANSFER_EVENT };
        let mut body = self.event_fields(contract, signature, form);
        body.insert("id".into(), json!(id));
        body.insert("chain_id".into(), json!(ANVIL_CHAIN_ID));
        body.insert("address".into(), json!(self.d.contracts[contract].contract.to_checksum(None)));
        body.insert("confirmations".into(), json!(confirmations));
        body.insert("start_block".into(), start.map_or(json!("latest"), |s| json!(s)));
        let mut planned_filter = None;
        if let Some((name, position, values)) = &filter {
            let texts: Vec<&String> = values.iter().map(|(_, t)| t).collect();
            body.insert("filters".into(), json!({ *name: texts }));
            planned_filter = Some((*position, values.iter().map(|(t, _)| *t).collect()));
        }
        let body = Value::Object(body);
        let (status, answer) =
            self.d.api(Method::POST, "/v1/subscriptions", Some(&body), API_TIMEOUT).await?;
        anyhow::ensure!(status == 201, "registering {id}: {status} {answer}");
        let planned = Planned {
            id: id.to_owned(),
            body,
            contract,
            topic0: if note { note_topic() } else { transfer_topic() },
            filter: planned_filter,
            confirmations,
            start: start.unwrap_or(0),
            numbered: start.is_some(),
        };
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()).push(planned.clone());
        Ok(planned)
    }

    /// Twelve subscriptions over four contracts: Transfers and Notes, confirmations 0, 1 and 3,
    /// indexed filters, history and `latest` starts, the three forms of `event`. The `latest`
    /// ones are running before any traffic, so they cover every log.
    async fn register_catalogue(&self) -> anyhow::Result<()> {
        let every = |step: u64, count: u64| (0..count).map(|k| k * step).collect::<Vec<_>>();
        let from_filter = |values: Vec<u64>| {
            ("from", 1, values.into_iter().map(|k| transfer_party(0x1000, k)).collect::<Vec<_>>())
        };
        let to_filter = |values: Vec<u64>| {
            ("to", 2, values.into_iter().map(|k| transfer_party(0x2000, k)).collect::<Vec<_>>())
        };
        let seq_filter = |values: Vec<u64>| {
            (
                "seq",
                1,
                values.into_iter().map(|k| (B256::from(U256::from(k)), k.to_string())).collect::<Vec<_>>(),
            )
        };
        self.register("a-transfers", 0, false, 0, None, 0, Some(0)).await?;
        self.register("a-notes-c1", 0, true, 1, None, 1, Some(0)).await?;
        self.register("a-from-c3", 0, false, 2, Some(from_filter(every(37, 200))), 3, Some(0)).await?;
        self.register("b-transfers-c1", 1, false, 1, None, 1, None).await?;
        self.register("b-notes-c3", 1, true, 0, None, 3, Some(0)).await?;
        self.register("b-to", 1, false, 0, Some(to_filter(every(53, 200))), 0, Some(0)).await?;
        self.register("c-transfers-c3", 2, false, 2, None, 3, None).await?;
        self.register("c-notes", 2, true, 0, None, 0, None).await?;
        self.register("c-seq-c1", 2, true, 1, Some(seq_filter(every(2, 300))), 1, Some(0)).await?;
        self.register("d-transfers", 3, false, 1, None, 0, Some(0)).await?;
        self.register("d-notes-c1", 3, true, 2, None, 1, None).await?;
        self.register("d-to-c3", 3, false, 0, Some(to_filter(every(29, 250))), 3, Some(0)).await?;
        let latest: Vec<Planned> = self.subscriptions().into_iter().filter(|s| !s.numbered).collect();
        let mut etcd = self.etcd_client().await?;
        for s in &latest {
            let key = Keyspace::default().cursor(&SubscriptionId::new(&s.id)?);
            wait_for(&format!("{} to be running", s.id), Duration::from_secs(120), || {
                let mut etcd = etcd.clone();
                let key = key.clone();
                async move { etcd.get(key, None).await.ok()?.kvs().first().map(|_| ()) }
            })
            .await?;
        }
        let _ = etcd.status().await;
        Ok(())
    }

    async fn etcd_client(&self) -> anyhow::Result<etcd_client::Client> {
        let endpoints = self.d.etcd.lock().await.endpoints();
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
    }

    /// Traffic every block until `stop`: a few Transfers per contract, sometimes hundreds,
    /// and Notes. Returns the last block it wrote to.
    async fn traffic(self: Arc<Self>, seed: u64, stop: CancellationToken) -> anyhow::Result<u64> {
        let mut rng = SplitMix64(seed);
        let mut last_block = 0;
        let mut note = 0u64;
        let mut emitted = vec![0u64; self.d.contracts.len()];
        while !stop.is_cancelled() {
            let guard = self.chain.lock().await;
            let mut sent = Vec::new();
            for (i, contract) in self.d.contracts.iter().enumerate() {
                let n = if rng.chance(4) { rng.between(100, 300) } else { rng.between(1, 4) };
                emitted[i] += n;
                if let Ok(tx) = contract.emit_many_tx(n) {
                    sent.push((i, contract.submit(tx).await));
                }
                if rng.chance(45) {
                    note += 1;
                    let tx = contract.emit_note_tx(&format!("note {note}"), &note.to_be_bytes(), &[note, n]);
                    if let Ok(tx) = tx {
                        sent.push((i, contract.submit(tx).await));
                    }
                }
            }
            for (i, hash) in sent {
                match hash {
                    Ok(hash) => match self.d.contracts[i].wait_mined(hash).await {
                        Ok(receipt) => last_block = last_block.max(receipt.block_number.unwrap_or_default()),
                        Err(e) => eprintln!("chaos: traffic: {e:#}"),
                    },
                    Err(e) => eprintln!("chaos: traffic: {e:#}"),
                }
            }
            drop(guard);
            self.max_sequence.store(emitted.iter().copied().max().unwrap_or(0), Ordering::SeqCst);
        }
        Ok(last_block)
    }

    /// Restarts herald processes that exited without the soak causing it, and samples the
    /// coordinators for two leaders.
    async fn monitor(self: Arc<Self>, stop: CancellationToken) {
        let mut both_before = false;
        while !stop.is_cancelled() {
            for slot in &self.d.workers {
                if let Ok(mut slot) = slot.try_lock()
                    && !slot.meant_down
                    && let Some(code) = slot.process.as_mut().and_then(|p| p.try_exit_code())
                {
                    let id = slot.settings.worker_id.clone();
                    eprintln!("chaos: worker {id} exited by itself ({code:?}); starting it again");
                    slot.unexpected_exits.push((id, code));
                    slot.process = None;
                    if let Err(e) = self.d.start_worker(&mut slot) {
                        self.trouble(format!("restarting a worker: {e:#}"));
                    }
                }
            }
            for slot in &self.d.coordinators {
                if let Ok(mut slot) = slot.try_lock()
                    && !slot.meant_down
                    && let Some(code) = slot.process.as_mut().and_then(|p| p.try_exit_code())
                {
                    eprintln!(
                        "chaos: coordinator {} exited by itself ({code:?}); starting it again",
                        slot.settings.port
                    );
                    let name = format!("coordinator-{}", slot.settings.port);
                    slot.unexpected_exits.push((name, code));
                    slot.process = None;
                    if let Err(e) = self.d.start_coordinator(&mut slot) {
                        self.trouble(format!("restarting a coordinator: {e:#}"));
                    }
                }
            }
            let ports = self.d.coordinator_ports().await;
            let (a, b) = tokio::join!(self.d.leads(ports[0]), self.d.leads(ports[1]));
            let both = a == Some(true) && b == Some(true);
            if both && both_before {
                let at = now_ms();
                eprintln!(
                    "chaos: both coordinators say they lead (Unix time {}.{:03} s)",
                    at / 1000,
                    at % 1000
                );
                self.split_brain.fetch_add(1, Ordering::SeqCst);
            }
            both_before = both;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// A subscription no other fault is changing, marked busy until [`Self::release`].
    fn take_subscription(&self, rng: &mut SplitMix64, numbered: bool) -> Option<Planned> {
        let all = self.subscriptions();
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let free: Vec<&Planned> =
            all.iter().filter(|s| !busy.contains(&s.id) && (s.numbered || !numbered)).collect();
        let pick = (*free.get(rng.below(free.len() as u64) as usize)?).clone();
        busy.insert(pick.id.clone());
        Some(pick)
    }

    fn release(&self, id: &str) {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    async fn head(&self) -> anyhow::Result<u64> {
        self.d.contracts[0].head().await
    }

    /// Injects one fault and heals it.
    async fn inject(&self, fault: &PlannedFault) -> anyhow::Result<()> {
        let mut rng = SplitMix64(fault.seed);
        let hold = |rng: &mut SplitMix64, low: u64, high: u64| Duration::from_millis(rng.between(low, high));
        match fault.kind {
            FaultKind::WorkerKill | FaultKind::WorkerTerm | FaultKind::WorkerDrain => {
                let i = rng.below(BASE_WORKERS as u64) as usize;
                let mut slot = self.d.workers[i].lock().await;
                let id = slot.settings.worker_id.clone();
                if slot.running() {
                    self.d.wait_worker_up(&slot).await;
                }
                slot.meant_down = true;
                let Some(mut process) = slot.process.take() else {
                    anyhow::bail!("worker slot {i} is not running")
                };
                match fault.kind {
                    FaultKind::WorkerKill => process.kill().await,
                    FaultKind::WorkerTerm => {
                        process.signal(Signal::SIGTERM);
                        self.expect_clean_exit(&mut slot, &id, &mut process).await;
                    }
                    _ => {
                        let path = format!("/v1/workers/{id}/drain");
                        let (status, body) = self.d.api(Method::POST, &path, None, API_TIMEOUT).await?;
                        if !(200..300).contains(&status) {
                            // Not registered right now (its lease lapsed): stop it by signal.
                            eprintln!("chaos: drain of {id} answered {status} {body}; sending SIGTERM");
                            process.signal(Signal::SIGTERM);
                        }
                        self.expect_clean_exit(&mut slot, &id, &mut process).await;
                    }
                }
                tokio::time::sleep(hold(&mut rng, 0, 3000)).await;
                if rng.chance(50) {
                    let generation = self.worker_generation.fetch_add(1, Ordering::SeqCst);
                    slot.settings.worker_id = format!("w{i}-{generation}");
                }
                self.d.start_worker(&mut slot)
            }
            FaultKind::WorkerStop => {
                let i = rng.below(BASE_WORKERS as u64) as usize;
                let slot = self.d.workers[i].lock().await;
                let Some(process) = &slot.process else { anyhow::bail!("worker slot {i} is not running") };
                process.signal(Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(WORKER_LEASE_TTL_SECS) + hold(&mut rng, 1000, 3000))
                    .await;
                process.signal(Signal::SIGCONT);
                Ok(())
            }
            FaultKind::WorkerAddRemove => {
                let _guard = self.extra_worker.lock().await;
                let mut slot = self.d.workers[BASE_WORKERS].lock().await;
                let generation = self.worker_generation.fetch_add(1, Ordering::SeqCst);
                slot.settings.worker_id = format!("w{BASE_WORKERS}-{generation}");
                let id = slot.settings.worker_id.clone();
                self.d.start_worker(&mut slot)?;
                drop(slot);
                tokio::time::sleep(hold(&mut rng, 8000, 20000)).await;
                let mut slot = self.d.workers[BASE_WORKERS].lock().await;
                if slot.running() {
                    self.d.wait_worker_up(&slot).await;
                }
                slot.meant_down = true;
                if let Some(mut process) = slot.process.take() {
                    process.signal(Signal::SIGTERM);
                    self.expect_clean_exit(&mut slot, &id, &mut process).await;
                }
                Ok(())
            }
            FaultKind::LeaderKill | FaultKind::LeaderStop => {
                let _guard = self.coordinators.lock().await;
                let leader = wait_for("a leader", Duration::from_secs(60), || self.d.leader()).await?;
                let mut slot = self.d.coordinators[leader].lock().await;
                if fault.kind == FaultKind::LeaderKill {
                    slot.meant_down = true;
                    if let Some(mut p) = slot.process.take() {
                        p.kill().await;
                    }
                    tokio::time::sleep(hold(&mut rng, 500, 3000)).await;
                    self.d.start_coordinator(&mut slot)
                } else {
                    let Some(process) = &slot.process else { anyhow::bail!("the leader is not running") };
                    process.signal(Signal::SIGSTOP);
                    tokio::time::sleep(hold(&mut rng, 3000, 6000)).await;
                    process.signal(Signal::SIGCONT);
                    Ok(())
                }
            }
            FaultKind::EtcdMemberKill | FaultKind::EtcdQuorumLoss => {
                let mut etcd = self.d.etcd.lock().await;
                let first = rng.below(3) as usize;
                let members: Vec<usize> = if fault.kind == FaultKind::EtcdMemberKill {
                    vec![first]
                } else {
                    vec![first, (first + 1) % 3]
                };
                for &m in &members {
                    etcd.kill(m).await;
                }
                tokio::time::sleep(hold(&mut rng, 2000, 6000)).await;
                for &m in &members {
                    etcd.start_again(m)?;
                }
                etcd.wait_writable().await
            }
            FaultKind::NatsNodeKill => {
                let mut nats = self.d.nats.lock().await;
                let node = rng.below(3) as usize;
                nats.kill(node).await;
                tokio::time::sleep(hold(&mut rng, 2000, 6000)).await;
                nats.start_again(node).await
            }
            FaultKind::NatsRestart => {
                let mut nats = self.d.nats.lock().await;
                for node in 0..nats.len() {
                    nats.stop(node).await;
                }
                tokio::time::sleep(hold(&mut rng, 500, 3000)).await;
                nats.start_all_again().await
            }
            FaultKind::Reorg => self.reorg(&mut rng).await,
            FaultKind::ProxyServerErrors
            | FaultKind::ProxyTimeouts
            | FaultKind::ProxyEmptyLogs
            | FaultKind::ProxyLaggingHead => {
                let _guard = self.proxy.lock().await;
                let f = self.d.proxy.faults();
                let set = |knob: &AtomicU64, value: u64| knob.store(value, Ordering::SeqCst);
                match fault.kind {
                    FaultKind::ProxyServerErrors => {
                        set(&f.server_error_every, rng.between(2, 4));
                        set(&f.rate_limit_every, if rng.chance(50) { 5 } else { 0 });
                    }
                    FaultKind::ProxyTimeouts => {
                        set(&f.slow_ms, 2500);
                        set(&f.slow_every, rng.between(3, 5));
                        set(&f.drop_every, if rng.chance(50) { 4 } else { 0 });
                    }
                    FaultKind::ProxyEmptyLogs => set(&f.empty_logs_every, rng.between(2, 3)),
                    _ => {
                        set(&f.stale_by, rng.between(2, 6));
                        set(&f.stale_latest_every, 2);
                    }
                }
                tokio::time::sleep(hold(&mut rng, 3000, 8000)).await;
                for knob in [
                    &f.server_error_every,
                    &f.rate_limit_every,
                    &f.slow_every,
                    &f.drop_every,
                    &f.empty_logs_every,
                    &f.stale_latest_every,
                ] {
                    set(knob, 0);
                }
                Ok(())
            }
            FaultKind::PauseResume => {
                let Some(s) = self.take_subscription(&mut rng, false) else {
                    anyhow::bail!("no free subscription")
                };
                let result = self.pause_resume(&s, hold(&mut rng, 2000, 6000)).await;
                self.release(&s.id);
                result
            }
            FaultKind::Rewind => {
                let Some(s) = self.take_subscription(&mut rng, false) else {
                    anyhow::bail!("no free subscription")
                };
                let result = self.rewind(&s, &mut rng).await;
                self.release(&s.id);
                result
            }
            FaultKind::DeleteReregister => {
                let Some(s) = self.take_subscription(&mut rng, true) else {
                    anyhow::bail!("no free subscription")
                };
                let result = self.delete_reregister(&s, hold(&mut rng, 500, 3000)).await;
                self.release(&s.id);
                result
            }
            FaultKind::RegisterFromHistory => {
                let n = self.history_registrations.fetch_add(1, Ordering::SeqCst);
                let contract = rng.below(self.d.contracts.len() as u64) as usize;
                let top = self.max_sequence.load(Ordering::SeqCst).max(100);
                let values: BTreeSet<u64> = (0..60).map(|_| rng.below(top)).collect();
                let filter = ("to", 2, values.into_iter().map(|k| transfer_party(0x2000, k)).collect());
                let confirmations = [0, 1, 3][rng.below(3) as usize];
                let start = self.head().await?.saturating_sub(rng.between(20, 300));
                let id = format!("hist-{n}");
                self.register(&id, contract, false, n as usize, Some(filter), confirmations, Some(start))
                    .await?;
                Ok(())
            }
        }
    }

    /// Waits for a worker the soak asked to stop; an unclean or late exit is counted.
    async fn expect_clean_exit(
        &self,
        slot: &mut super::deployment::WorkerSlot,
        id: &str,
        process: &mut crate::process::ChildProcess,
    ) {
        match tokio::time::timeout(Duration::from_secs(60), process.wait()).await {
            Ok(Some(0)) => {}
            Ok(code) => {
                eprintln!("chaos: worker {id} exited with {code:?} when asked to stop");
                slot.unexpected_exits.push((id.to_owned(), code));
            }
            Err(_) => {
                eprintln!("chaos: worker {id} did not stop within 60 s; killing it");
                slot.unexpected_exits.push((id.to_owned(), None));
                process.kill().await;
            }
        }
    }

    async fn pause_resume(&self, s: &Planned, hold: Duration) -> anyhow::Result<()> {
        self.control(&s.id, "pause", None).await?;
        let paused_at = now_ms();
        tokio::time::sleep(hold).await;
        let resumed_at = now_ms();
        // A worker learns of the pause from its watch, or stops on its own once its lease
        // would have lapsed: anything stored later than that, before the resume, is a fault.
        let grace = WORKER_LEASE_TTL_SECS * 1000 + 1000;
        if paused_at + grace < resumed_at {
            let mut pauses = self.pauses.lock().unwrap_or_else(|e| e.into_inner());
            pauses.entry(s.id.clone()).or_default().push((paused_at + grace, resumed_at));
        }
        self.control(&s.id, "resume", None).await
    }

    /// `POST /v1/subscriptions/<id>/<action>`, which must succeed.
    async fn control(&self, id: &str, action: &str, body: Option<&Value>) -> anyhow::Result<()> {
        let path = format!("/v1/subscriptions/{id}/{action}");
        let (status, answer) = self.d.api(Method::POST, &path, body, API_TIMEOUT).await?;
        anyhow::ensure!((200..300).contains(&status), "{action} of {id}: {status} {answer}");
        Ok(())
    }

    /// Rewinds `s` a few to 80 blocks back, never past its own progress (a rewind only goes
    /// back, and a subscription with confirmations, or one catching up after a fault, is
    /// behind the head).
    async fn rewind(&self, s: &Planned, rng: &mut SplitMix64) -> anyhow::Result<()> {
        let mut from = self.head().await?.saturating_sub(rng.between(5, 80));
        let (_, view) =
            self.d.api(Method::GET, &format!("/v1/subscriptions/{}", s.id), None, API_TIMEOUT).await?;
        if let Some(cursor) = view["cursor_block"].as_u64() {
            from = from.min(cursor + 1);
        }
        self.control(&s.id, "rewind", Some(&json!({"from_block": from.max(s.start)}))).await
    }

    async fn delete_reregister(&self, s: &Planned, hold: Duration) -> anyhow::Result<()> {
        let path = format!("/v1/subscriptions/{}", s.id);
        let (status, body) = self.d.api(Method::DELETE, &path, None, API_TIMEOUT).await?;
        // 404: an earlier attempt whose answer was lost (the API call is retried) deleted it.
        anyhow::ensure!((200..300).contains(&status) || status == 404, "delete of {}: {status} {body}", s.id);
        tokio::time::sleep(hold).await;
        self.register_again(s).await
    }

    /// Registers `s` again as it was first registered; a 409 `already_exists` means an
    /// earlier attempt whose answer was lost did it.
    async fn register_again(&self, s: &Planned) -> anyhow::Result<()> {
        let (status, body) =
            self.d.api(Method::POST, "/v1/subscriptions", Some(&s.body), API_TIMEOUT).await?;
        let done = status == 201 || (status == 409 && body["error"]["code"] == "already_exists");
        anyhow::ensure!(done, "registering {} again: {status} {body}", s.id);
        Ok(())
    }

    /// Before the check: every subscription the soak registered exists and is active, even
    /// where a pause/resume or delete/re-register fault could not finish under the faults
    /// around it (each such repair is reported as fault trouble, not as a herald failure).
    async fn heal_subscriptions(&self) -> anyhow::Result<()> {
        for s in self.subscriptions() {
            let path = format!("/v1/subscriptions/{}", s.id);
            let (status, view) = self.d.api(Method::GET, &path, None, API_TIMEOUT).await?;
            if status == 404 {
                self.trouble(format!("{} was missing after the schedule; registered again", s.id));
                self.register_again(&s).await?;
            } else if view["state"] == "paused" {
                self.trouble(format!("{} was still paused after the schedule; resumed", s.id));
                self.control(&s.id, "resume", None).await?;
            }
        }
        Ok(())
    }

    /// `anvil_reorg` of depth 1-8 whose new blocks hold new transactions at random offsets:
    /// logs dropped (the old blocks' transactions are not replayed), moved (the same
    /// sequence numbers emitted again elsewhere) and added, also into blocks that had none.
    async fn reorg(&self, rng: &mut SplitMix64) -> anyhow::Result<()> {
        let _guard = self.chain.lock().await;
        // Never as deep as the contracts' deployment: a reorg that replaced it would take the
        // contracts away (seed 202 lost three of four that way, and with them their traffic).
        let floor = self.d.deployed_at + 1;
        let head_before = wait_for("a block above the deployment", Duration::from_secs(30), || async {
            self.head().await.ok().filter(|head| *head > floor)
        })
        .await?;
        let depth = rng.between(1, 8).min(head_before - floor).max(1);
        let mut txs = Vec::new();
        for _ in 0..rng.between(0, depth + 2) {
            let contract = &self.d.contracts[rng.below(self.d.contracts.len() as u64) as usize];
            let offset = rng.below(depth);
            let tx = if rng.chance(25) {
                contract.emit_note_tx("reorg", &[1, 2, 3], &[offset])?
            } else {
                contract.emit_many_tx(rng.between(1, 5))?
            };
            txs.push((tx, offset));
        }
        self.d.contracts[0].reorg_with(depth, txs).await?;
        self.reorgs.lock().unwrap_or_else(|e| e.into_inner()).push(InjectedReorg { head_before, depth });
        Ok(())
    }

    /// Heals, waits for the cursors, and judges every subscription from the consumer's side.
    async fn check(&self, config: &ChaosConfig, last_traffic_block: u64) -> anyhow::Result<Report> {
        // Everything up: base workers, coordinators, every etcd member and NATS server.
        self.d.etcd.lock().await.wait_writable().await?;
        self.d.nats.lock().await.start_all_again().await?;
        self.heal_subscriptions().await?;
        // A few empty blocks above the traffic, then a frozen head.
        let chain = &self.d.contracts[0];
        wait_for("blocks above the traffic", Duration::from_secs(60), || async {
            (chain.head().await.ok()? >= last_traffic_block + 4).then_some(())
        })
        .await?;
        chain.raw("evm_setIntervalMining", json!([0])).await?;
        let head = chain.head().await?;

        let subscriptions = self.subscriptions();
        let mut etcd = self.etcd_client().await?;
        let keys = Keyspace::default();
        let mut behind = 0;
        for s in &subscriptions {
            let id = SubscriptionId::new(&s.id)?;
            let target = head - s.confirmations;
            let reached =
                wait_for(&format!("the cursor of {} at {target}", s.id), Duration::from_secs(300), || {
                    let mut etcd = etcd.clone();
                    let key = keys.cursor(&id);
                    async move {
                        let resp = etcd.get(key, None).await.ok()?;
                        let cursor = Cursor::decode(resp.kvs().first()?.value()).ok()?;
                        (cursor.block_number >= target).then_some(())
                    }
                })
                .await;
            if let Err(e) = reached {
                eprintln!("chaos: {e}");
                behind += 1;
            }
        }

        let nats_servers = self.d.nats.lock().await.urls();
        let nats_servers = nats_servers
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        let client = async_nats::connect(nats_servers).await?;
        let stream = jetstream::new(client).get_stream(crate::herald::STREAM).await?;
        let reorgs = self.reorgs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let pauses = self.pauses.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let owners = self.owner_history().await?;
        let mut lines = Vec::new();
        let mut totals = Counts::default();
        let mut canonical_logs = 0;
        for s in &subscriptions {
            let id = SubscriptionId::new(&s.id)?;
            let record = etcd.get(keys.subscription(&id), None).await?;
            let registration = record.kvs().first().map_or(0, |kv| kv.create_revision()) as u64;
            let messages =
                read_subject(&stream, &herald_proto::subjects::default_subject(ANVIL_CHAIN_ID, &id)).await?;
            let canonical = self.canonical(s, head - s.confirmations).await?;
            let evidence = Evidence {
                messages,
                registration,
                canonical,
                confirmations: s.confirmations,
                reorgs: reorgs.clone(),
                paused: pauses.get(&s.id).cloned().unwrap_or_default(),
                owners: owners
                    .get(&s.id)
                    .map(|h| {
                        h.iter()
                            .filter(|(rev, _)| *rev as u64 >= registration)
                            .map(|(_, w)| w.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let (counts, held, lost) = judge_in_detail(&evidence);
            let messages =
                evidence.messages.iter().filter(|m| m.envelope.registration == registration).count();
            totals.add(&counts);
            canonical_logs += evidence.canonical.len();
            lines.push(SubscriptionLine {
                id: s.id.clone(),
                confirmations: s.confirmations,
                canonical: evidence.canonical.len(),
                held,
                messages,
                counts,
                lost: lost.iter().map(|l| (l.block_number, l.log_index)).collect(),
            });
        }

        let mut panics = 0;
        for file in self.d.log_files() {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked at")) {
                eprintln!("chaos: panic in {}: {line}", file.display());
                panics += 1;
            }
        }
        let unlisted = self.unlisted_workers().await;
        Ok(Report {
            config: config.clone(),
            faults: self.executed.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            fault_errors: self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            subscriptions: lines,
            totals,
            panics,
            exits: 0,
            split_brain: 0,
            unlisted,
            behind,
            canonical_logs,
        })
    }

    /// The logs subscription `s` must hold, from a raw `eth_getLogs` of the chain.
    async fn canonical(&self, s: &Planned, to: u64) -> anyhow::Result<Vec<CanonicalLog>> {
        let logs = self.d.contracts[s.contract].logs(s.topic0, s.start, to).await?;
        Ok(logs
            .iter()
            .filter(|l| {
                s.filter.as_ref().is_none_or(|(position, accepted)| {
                    l.topics().get(*position).is_some_and(|t| accepted.contains(t))
                })
            })
            .map(|l| CanonicalLog {
                block_number: l.block_number.unwrap_or_default(),
                block_hash: l.block_hash.unwrap_or_default(),
                log_index: l.log_index.unwrap_or_default(),
            })
            .collect())
    }

    /// Running workers that `GET /v1/workers` does not list (after waiting for them).
    async fn unlisted_workers(&self) -> u64 {
        let mut running = BTreeSet::new();
        for slot in &self.d.workers {
            let slot = slot.lock().await;
            if slot.running() {
                running.insert(slot.settings.worker_id.clone());
            }
        }
        let missing = StdMutex::new(running.clone());
        let listed = wait_for("every running worker listed", Duration::from_secs(60), || async {
            let (status, body) =
                self.d.api(Method::GET, "/v1/workers", None, Duration::from_secs(10)).await.ok()?;
            let listed: BTreeSet<String> =
                body.as_array()?.iter().filter_map(|w| w["worker_id"].as_str().map(str::to_owned)).collect();
            let gone: BTreeSet<String> = running.difference(&listed).cloned().collect();
            let empty = gone.is_empty();
            *missing.lock().unwrap_or_else(|e| e.into_inner()) = gone;
            (status == 200 && empty).then_some(())
        })
        .await;
        match listed {
            Ok(()) => 0,
            Err(_) => {
                let missing = missing.into_inner().unwrap_or_else(|e| e.into_inner());
                eprintln!("chaos: running workers not listed: {missing:?}");
                missing.len() as u64
            }
        }
    }
}

/// Every value the owner keys had, per subscription id: (revision, worker), oldest first.
type OwnerHistory = BTreeMap<String, Vec<(i64, String)>>;

impl Soak {
    /// Records every change of the owner keys from etcd's first revision on, until `stop`,
    /// watching again from the next revision whenever the watch breaks (an etcd member killed).
    async fn record_owners(self: Arc<Self>, stop: CancellationToken) {
        let prefix = Keyspace::default().owners_dir();
        let mut next = 1;
        while !stop.is_cancelled() {
            let watched = async {
                let mut etcd = self.etcd_client().await?;
                let options = WatchOptions::new().with_prefix().with_start_revision(next);
                anyhow::Ok(etcd.watch(prefix.as_str(), Some(options)).await?)
            };
            let mut stream = match watched.await {
                Ok(stream) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let response = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = stream.message() => r,
                };
                let Ok(Some(response)) = response else { break };
                if response.canceled() {
                    let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
                    owners.2 = Some(format!(
                        "the owner keys' history from revision {next} was compacted (to {}) before it was read",
                        response.compact_revision()
                    ));
                    return;
                }
                let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    next = next.max(kv.mod_revision() + 1);
                    owners.1 = Instant::now();
                    if event.event_type() == etcd_client::EventType::Put {
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let id = key.trim_start_matches(prefix.as_str()).to_owned();
                        let worker = String::from_utf8_lossy(kv.value()).into_owned();
                        owners.0.entry(id).or_default().push((kv.mod_revision(), worker));
                    }
                }
            }
        }
    }

    /// The owner keys' history once no owner changed for 3 seconds (at most 30 s).
    async fn owner_history(&self) -> anyhow::Result<OwnerHistory> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(problem) = &owners.2 {
                    anyhow::bail!("{problem}");
                }
                if owners.1.elapsed() >= Duration::from_secs(3) || Instant::now() >= deadline {
                    return Ok(owners.0.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every message on `subject`, as a consumer reads it: the envelope, when the stream stored
/// it, and which worker published it.
async fn read_subject(stream: &jetstream::stream::Stream, subject: &str) -> anyhow::Result<Vec<Delivered>> {
    crate::herald::read_stored(stream, subject)
        .await?
        .iter()
        .map(|message| {
            let stored_at_ms =
                message.info().map_or(0, |i| (i.published.unix_timestamp_nanos() / 1_000_000) as u64);
            let publisher = message
                .headers
                .as_ref()
                .and_then(|h| h.get(herald_proto::subjects::WORKER_HEADER))
                .map(|v| v.as_str().to_owned());
            let envelope: EventEnvelope = serde_json::from_slice(&message.payload)?;
            Ok(Delivered { envelope, stored_at_ms, publisher })
        })
        .collect()
}
