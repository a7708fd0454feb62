# herald: the two commands of the quickstart are `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(CURDIR)/.tools/bin:$(PATH)

# Demo length in seconds; empty runs until Ctrl-C.
DEMO_SECONDS ?=
export DEMO_SECONDS

.PHONY: deps build demo test test-unit api-fuzz bench lint fmt contracts dashboards-check alerts-check

deps:
	@bash scripts/install-deps.sh

build: deps
	cargo build --bins

## Runs etcd, NATS, anvil and a worker locally, with traffic, printing events as a consumer reads them.
demo: build
	@cargo run -q -p herald-tests --bin herald-demo

## The whole suite: unit tests and the end-to-end tests against real etcd, nats-server and anvil.
test: build
	@if command -v cargo-nextest >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast --test-threads 2; \
	else \
		cargo test --workspace --no-fail-fast -- --test-threads 2; \
	fi
	@$(MAKE) --no-print-directory dashboards-check

## Alert rules: promtool's syntax check and its unit tests (dashboards/alerts.test.yaml).
alerts-check: deps
	promtool check rules dashboards/alerts.yaml
	promtool test rules dashboards/alerts.test.yaml

## Dashboards against a real Prometheus scraping a live cluster with traffic (and the alert
## rules checked and loaded); last line: dashboards: P panels, Q queries, E empty or failing.
dashboards-check: build alerts-check
	python3 dashboards/generate.py --check
	@cargo run -q -p herald-tests --bin herald-dashboards-check

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
