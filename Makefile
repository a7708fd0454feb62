# herald: the two commands of the quickstart are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(CURDIR)/.tools/bin:$(PATH)

# Demo length in seconds; empty runs until Ctrl-C.
DEMO_SECONDS ?=
export DEMO_SECONDS

.PHONY: deps build demo test test-unit helm-check api-fuzz bench chaos lint fmt contracts dashboards-check alerts-check

deps:
	@bash scripts/install-deps.sh

build: deps
	cargo build --bins

## Runs etcd, NATS, anvil and a worker locally, with traffic, printing events as a consumer reads them.
demo: build
	@cargo run -q -p herald-tests --bin herald-demo

## The whole suite: the Helm chart check, then unit tests and the end-to-end tests against real
## etcd, nats-server and anvil, then the dashboards against a real Prometheus.
test: build
	@rc=0; $(MAKE) --no-print-directory helm-check-only || rc=1; \
	if command -v cargo-nextest >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast --test-threads 2 || rc=1; \
	else \
		cargo test --workspace --no-fail-fast -- --test-threads 2 || rc=1; \
	fi; \
	$(MAKE) --no-print-directory dashboards-check || rc=1; \
	exit $$rc

## Alert rules: promtool's syntax check and its unit tests (dashboards/alerts.test.yaml).
alerts-check: deps
	promtool check rules dashboards/alerts.yaml
	promtool test rules dashboards/alerts.test.yaml

## Dashboards against a real Prometheus scraping a live cluster with traffic (and the alert
## rules checked and loaded); last line: dashboards: P panels, Q queries, E empty or failing.
dashboards-check: build alerts-check
	python3 dashboards/generate.py --check
	@cargo run -q -p herald-tests --bin herald-dashboards-check

## Renders helm/herald for the default and ci/*-values.yaml value sets, validates the manifests
## against Kubernetes 1.30 (kubernetes-validate --strict), runs the binaries' --check-config on
## the rendered config, and checks that values.schema.json rejects tests/helm/bad-values.
## Last line: helm: <V> value sets, <M> manifests, <E> errors.
helm-check: build
	@$(MAKE) --no-print-directory helm-check-only

.PHONY: helm-check-only
helm-check-only:
	@.tools/venv/bin/python tests/helm/helm_check.py

## schemathesis against a live coordinator (all checks); last line: api fuzz: N requests, M server errors, K schema violations.
api-fuzz: build
	@cargo run -q -p herald-tests --bin herald-api-fuzz

## Benchmarks: one line per scenario, `bench: <name> ... ratio=<figure/target>`. BENCH=<name> runs one.
BENCH ?=
export BENCH
## Release builds: the figures are herald's, not the debug build's.
bench: deps
	cargo build --release --bins
	@cargo run --release -q -p herald-tests --bin herald-bench

## The randomized fault soak (release build) against a 3-member etcd, a 3-node JetStream
## cluster, anvil behind a fault proxy, 2 coordinators and 3 workers; checked from the
## consumer's side. CHAOS_SECONDS (900), CHAOS_SEED (from the clock), CHAOS_FAULTS (220).
## Last line: chaos: faults=F lost=L dup=D extra=E order=O unmatched=U stale=S panics=P ...
CHAOS_SECONDS ?=
CHAOS_SEED ?=
CHAOS_FAULTS ?=
export CHAOS_SECONDS CHAOS_SEED CHAOS_FAULTS
chaos: deps
	cargo build --release --bins
	@cargo run --release -q -p herald-tests --bin herald-chaos

## Unit tests only (no services).
test-unit:
	cargo test --workspace --lib --bins

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

## Recompiles contracts/HeraldTest.sol into contracts/out/HeraldTest.json (committed).
contracts: deps
	bash contracts/build.sh
