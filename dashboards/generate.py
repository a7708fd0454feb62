#!/usr/bin/env python3
"""Generates herald's Grafana dashboards (dashboards/*.json) from the definitions below.

The JSON files are committed (the Helm chart ships them as a ConfigMap for Grafana's
sidecar); edit this file and run `python3 dashboards/generate.py` to change them.
`make dashboards-check` proves every query against a real Prometheus scraping a cluster, and
`--check` (which it runs) fails when the committed JSON differs from what this file generates.
"""

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}

DATASOURCE_VAR = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "hide": 0,
    "refresh": 1,
    "regex": "",
    "includeAll": False,
    "multi": False,
    "options": [],
}


def query_var(name, label, query, include_all=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "sort": 1,
        "includeAll": include_all,
        "allValue": ".*" if include_all else None,
        "multi": include_all,
        "current": {},
        "hide": 0,
        "options": [],
        "regex": "",
    }


CHAIN_VAR = query_var("chain", "Chain", "label_values(herald_chain_head_block, chain_id)")
SUBSCRIPTION_VAR = query_var(
    "subscription",
    "Subscription",
    'label_values(herald_subscription_cursor_block{chain_id=~"$chain"}, subscription_id)',
    include_all=False,
)


def panel(title, kind, targets, unit="short", w=12, h=8, description="", stacked=False):
    """A panel; `targets` is a list of (expr, legend) pairs."""
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        }
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"}
    elif kind == "table":
        for t in p["targets"]:
            t["format"] = "table"
            t["instant"] = True
            t["range"] = False
    return p


def dashboard(uid, title, description, variables, panels):
    x = y = row_h = 0
    for i, p in enumerate(panels):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"].update({"x": x, "y": y})
        p["id"] = i + 1
        x += w
        row_h = max(row_h, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["herald"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [DATASOURCE_VAR] + variables},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["herald"], "asDropdown": True, "title": "herald"}],
        "panels": panels,
    }


RATE = "$__rate_interval"
SUB = 'chain_id=~"$chain", subscription_id=~"$subscription"'

overview = dashboard(
    "herald-overview",
    "herald / Cluster overview",
    "Workers, subscriptions, leader, throughput and lag of the whole herald cluster.",
    [],
    [
        panel("Live workers", "stat", [("max(herald_coordinator_workers)", "workers")], w=4, h=4,
              description="Workers registered with a lease, as seen by the coordinators."),
        panel("Leaders", "stat", [("sum(herald_coordinator_is_leader)", "leaders")], w=4, h=4,
              description="Coordinator replicas that are leader: should be exactly 1."),
        panel("Subscriptions", "stat", [("max by (state) (herald_subscriptions)", "{{state}}")], w=4, h=4,
              description="Registered subscriptions by state."),
        panel("Events published / s", "stat", [(f"sum(rate(herald_events_published_total[{RATE}]))", "events/s")],
              unit="ops", w=4, h=4),
        panel("Total lag", "stat", [("sum(herald_subscription_lag_blocks)", "blocks")], w=4, h=4,
              description="Blocks between each chain head and each subscription's cursor, summed."),
        panel("Worst lag", "stat", [("max(herald_subscription_lag_seconds)", "seconds")], unit="s", w=4, h=4,
              description="Longest time any subscription has been behind its confirmed head."),
        panel("Throughput by chain", "timeseries",
              [(f"sum by (chain_id) (rate(herald_events_published_total[{RATE}]))", "chain {{chain_id}}")],
              unit="ops"),
        panel("Lag by subscription", "timeseries",
              [("max by (subscription_id) (herald_subscription_lag_blocks)", "{{subscription_id}}")]),
        panel("Assigned subscriptions per worker", "timeseries",
              [("sum by (worker_id) (herald_worker_assigned_subscriptions)", "{{worker_id}}")], stacked=True),
        panel("Subscription tasks by state", "timeseries",
              [("sum by (state) (herald_subscription_state)", "{{state}}")], stacked=True,
              description="Running subscription tasks: starting, backfilling (behind) or live (caught up)."),
        panel("Leader", "table", [("max by (instance) (herald_coordinator_is_leader)", "")], w=8,
              description="1 for the coordinator replica that currently leads."),
        panel("Chain heads", "timeseries", [("max by (chain_id) (herald_chain_head_block)", "chain {{chain_id}}")],
              w=8),
        panel("Retractions and decode failures / s", "timeseries", [
            (f"sum(rate(herald_retractions_total[{RATE}]))", "retractions"),
            (f"sum(rate(herald_decode_failures_total[{RATE}]))", "decode failures"),
        ], unit="ops", w=8),
        panel("etcd database", "timeseries", [
            ("max(herald_etcd_db_size_bytes)", "file"),
            ("max(herald_etcd_db_size_in_use_bytes)", "in use"),
            ("max(herald_etcd_quota_bytes)", "quota"),
        ], unit="bytes",
              description="etcd refuses every write at its quota. The leader compacts its history; "
                          "a file far above what is in use needs a defragmentation."),
    ],
)

subscription = dashboard(
    "herald-subscription",
    "herald / Subscription",
    "One subscription: lag, event rate, retractions, decode failures, state and owner.",
    [CHAIN_VAR, SUBSCRIPTION_VAR],
    [
        panel("State", "stat", [(f"max by (state) (herald_subscription_state{{{SUB}}}) == 1", "{{state}}")],
              w=6, h=4, description="The subscription task's state on its worker."),
        panel("Registry state", "stat",
              [(f"max by (state) (herald_coordinator_subscription_state{{{SUB}}}) == 1", "{{state}}")], w=6, h=4,
              description="Active or paused, as registered."),
        panel("Owner", "table", [(f"max by (worker_id) (herald_subscription_cursor_block{{{SUB}}})", "")],
              w=6, h=4, description="The worker running the subscription (value: its cursor block)."),
        panel("Lag (blocks)", "stat", [(f"max(herald_subscription_lag_blocks{{{SUB}}})", "blocks")], w=6, h=4),
        panel("Lag in blocks", "timeseries",
              [(f"max by (subscription_id) (herald_subscription_lag_blocks{{{SUB}}})", "{{subscription_id}}")]),
        panel("Lag in seconds", "timeseries",
              [(f"max by (subscription_id) (herald_subscription_lag_seconds{{{SUB}}})", "{{subscription_id}}")],
              unit="s", description="Time since the subscription was last caught up with its confirmed head."),
        panel("Cursor and head", "timeseries", [
            (f"max(herald_subscription_cursor_block{{{SUB}}})", "cursor"),
            ('max(herald_chain_head_block{chain_id=~"$chain"})', "head"),
        ]),
        panel("Events published / s", "timeseries", [
            (f"sum(rate(herald_events_published_total{{{SUB}}}[{RATE}]))", "published"),
            (f"sum(rate(herald_publish_duplicates_total{{{SUB}}}[{RATE}]))", "duplicates"),
        ], unit="ops"),
        panel("Retractions / s", "timeseries",
              [(f"sum(rate(herald_retractions_total{{{SUB}}}[{RATE}]))", "retractions")], unit="ops", w=8),
        panel("Decode failures / s", "timeseries",
              [(f"sum(rate(herald_decode_failures_total{{{SUB}}}[{RATE}]))", "decode failures")], unit="ops", w=8),
        panel("Deep reorgs and publish errors", "timeseries", [
            (f"sum(increase(herald_deep_reorgs_total{{{SUB}}}[$__range]))", "deep reorgs"),
            (f"sum(increase(herald_publish_errors_total{{{SUB}}}[$__range]))", "publish errors"),
        ], w=8),
    ],
)

rpc = dashboard(
    "herald-rpc",
    "herald / RPC health",
    "JSON-RPC calls by method and outcome, latency, range splits, failovers, rate limits, endpoint heads.",
    [CHAIN_VAR],
    [
        panel("Requests / s by method and outcome", "timeseries",
              [(f'sum by (method, outcome) (rate(herald_rpc_requests_total{{chain_id=~"$chain"}}[{RATE}]))',
                "{{method}} {{outcome}}")], unit="reqps", stacked=True),
        panel("Error ratio", "timeseries", [(
            f'sum by (chain_id) (rate(herald_rpc_requests_total{{chain_id=~"$chain", outcome!="ok"}}[{RATE}]))'
            f' / sum by (chain_id) (rate(herald_rpc_requests_total{{chain_id=~"$chain"}}[{RATE}]))',
            "chain {{chain_id}}")], unit="percentunit",
            description="Failed calls over all calls; refused ranges (split and asked again) included."),
        panel("Latency p50 by method", "timeseries", [(
            "histogram_quantile(0.5, sum by (le, method) "
            f'(rate(herald_rpc_request_duration_seconds_bucket{{chain_id=~"$chain"}}[{RATE}])))',
            "{{method}}")], unit="s"),
        panel("Latency p99 by method", "timeseries", [(
            "histogram_quantile(0.99, sum by (le, method) "
            f'(rate(herald_rpc_request_duration_seconds_bucket{{chain_id=~"$chain"}}[{RATE}])))',
            "{{method}}")], unit="s"),
        panel("Range splits / s", "timeseries",
              [(f'sum by (chain_id) (rate(herald_rpc_range_splits_total{{chain_id=~"$chain"}}[{RATE}]))',
                "chain {{chain_id}}")], unit="ops", w=8,
              description="eth_getLogs ranges an endpoint refused and that were split."),
        panel("Failovers / s", "timeseries",
              [(f'sum by (chain_id) (rate(herald_rpc_failovers_total{{chain_id=~"$chain"}}[{RATE}]))',
                "chain {{chain_id}}")], unit="ops", w=8),
        panel("Rate-limit waits / s", "timeseries",
              [(f'sum by (chain_id, endpoint) (rate(herald_rpc_rate_limit_waits_total{{chain_id=~"$chain"}}[{RATE}]))',
                "chain {{chain_id}} endpoint {{endpoint}}")], unit="ops", w=8),
        panel("Head per endpoint", "timeseries",
              [('max by (chain_id, endpoint) (herald_rpc_endpoint_head_block{chain_id=~"$chain"})',
                "chain {{chain_id}} endpoint {{endpoint}}")],
              description="Endpoints are numbered by their index in the chain's rpc_urls (URLs carry keys)."),
        panel("Chain head", "timeseries",
              [('max by (chain_id) (herald_chain_head_block{chain_id=~"$chain"})', "chain {{chain_id}}")]),
        panel("Endpoints up", "timeseries",
              [('min by (chain_id, endpoint) (herald_rpc_endpoint_up{chain_id=~"$chain"})',
                "chain {{chain_id}} endpoint {{endpoint}}")], w=8,
              description="1 while an endpoint answers, 0 while it is down and only probed."),
        panel("Heads over WebSocket", "timeseries",
              [('min by (chain_id) (herald_chain_heads_websocket{chain_id=~"$chain"})', "chain {{chain_id}}")],
              w=8, description="1 while new heads arrive over a WebSocket subscription, 0 while polled."),
        panel("Reorgs and incomplete answers", "timeseries", [
            (f'sum by (chain_id) (increase(herald_chain_reorgs_total{{chain_id=~"$chain"}}[$__range]))',
             "chain {{chain_id}} reorgs"),
            (f'sum by (chain_id) (increase(herald_rpc_incomplete_log_answers_total{{chain_id=~"$chain"}}[$__range]))',
             "chain {{chain_id}} incomplete eth_getLogs answers"),
        ], w=8),
    ],
)

jetstream = dashboard(
    "herald-jetstream",
    "herald / JetStream publishing",
    "Publish latency, acknowledgements, duplicates reported by the server, errors and in-flight publishes.",
    [CHAIN_VAR],
    [
        panel("Acks / s", "timeseries",
              [(f'sum by (chain_id) (rate(herald_jetstream_acks_total{{chain_id=~"$chain"}}[{RATE}]))',
                "chain {{chain_id}}")], unit="ops"),
        panel("Publish latency", "timeseries", [
            ("histogram_quantile(0.5, sum by (le) "
             f'(rate(herald_jetstream_publish_duration_seconds_bucket{{chain_id=~"$chain"}}[{RATE}])))', "p50"),
            ("histogram_quantile(0.99, sum by (le) "
             f'(rate(herald_jetstream_publish_duration_seconds_bucket{{chain_id=~"$chain"}}[{RATE}])))', "p99"),
        ], unit="s"),
        panel("Stored vs duplicates / s", "timeseries", [
            (f'sum(rate(herald_events_published_total{{chain_id=~"$chain"}}[{RATE}]))', "stored"),
            (f'sum(rate(herald_publish_duplicates_total{{chain_id=~"$chain"}}[{RATE}]))', "duplicates"),
        ], unit="ops", description="Duplicates: publishes the server dropped within its duplicate window."),
        panel("Publish errors / s", "timeseries",
              [(f'sum by (subscription_id) (rate(herald_publish_errors_total{{chain_id=~"$chain"}}[{RATE}]))',
                "{{subscription_id}}")], unit="ops"),
        panel("In flight per worker", "timeseries",
              [("sum by (worker_id) (herald_jetstream_publishes_in_flight)", "{{worker_id}}")],
              description="Publishes sent and not yet acknowledged."),
        panel("Mean publish latency", "timeseries", [(
            f'sum(rate(herald_jetstream_publish_duration_seconds_sum{{chain_id=~"$chain"}}[{RATE}]))'
            f' / sum(rate(herald_jetstream_publish_duration_seconds_count{{chain_id=~"$chain"}}[{RATE}]))',
            "mean")], unit="s"),
    ],
)

rebalancing = dashboard(
    "herald-rebalancing",
    "herald / Rebalancing history",
    "Leadership, planning rounds, moves, workers and their leases.",
    [],
    [
        panel("Leader per replica", "timeseries",
              [("max by (instance) (herald_coordinator_is_leader)", "{{instance}}")], w=8),
        panel("Leader changes", "stat",
              [("sum(increase(herald_coordinator_leader_changes_total[$__range]))", "changes")], w=4),
        panel("Workers seen", "timeseries", [("max(herald_coordinator_workers)", "workers")], w=6),
        panel("Moves", "stat", [("sum(increase(herald_coordinator_moves_total[$__range]))", "moves")], w=6,
              description="Assignments revoked by reconcile rounds in the time range."),
        panel("Plan runs / s", "timeseries",
              [(f"sum(rate(herald_coordinator_plan_runs_total[{RATE}]))", "rounds")], unit="ops", w=8),
        panel("Plan duration", "timeseries", [
            (f"histogram_quantile(0.5, sum by (le) (rate(herald_coordinator_plan_duration_seconds_bucket[{RATE}])))",
             "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate(herald_coordinator_plan_duration_seconds_bucket[{RATE}])))",
             "p99"),
        ], unit="s", w=8),
        panel("Moves per plan (p90)", "timeseries", [(
            f"histogram_quantile(0.9, sum by (le) (rate(herald_coordinator_plan_moves_bucket[{RATE}])))", "p90")],
            w=8),
        panel("Assigned subscriptions per worker", "timeseries",
              [("sum by (worker_id) (herald_worker_assigned_subscriptions)", "{{worker_id}}")], stacked=True),
        panel("Lease keepalive latency p99", "timeseries", [(
            "histogram_quantile(0.99, sum by (le, worker_id) "
            f"(rate(herald_worker_lease_keepalive_duration_seconds_bucket[{RATE}])))", "{{worker_id}}")],
            unit="s"),
        panel("Lease failures, registrations, fencing", "timeseries", [
            ("sum by (worker_id) (increase(herald_worker_lease_keepalive_failures_total[$__range]))",
             "{{worker_id}} keepalive failures"),
            ("sum by (worker_id) (increase(herald_worker_registrations_total[$__range]))",
             "{{worker_id}} registrations"),
            ("sum by (worker_id) (increase(herald_worker_self_fenced_total[$__range]))", "{{worker_id}} self-fenced"),
            ("sum by (worker_id) (increase(herald_worker_fenced_total[$__range]))", "{{worker_id}} fenced"),
        ]),
        panel("Admin API requests / s", "timeseries",
              [(f"sum by (route, status) (rate(herald_api_requests_total[{RATE}]))", "{{route}} {{status}}")],
              unit="reqps"),
    ],
)

check = "--check" in sys.argv[1:]
stale = []
for name, d in [("overview", overview), ("subscription", subscription), ("rpc", rpc), ("jetstream", jetstream),
                ("rebalancing", rebalancing)]:
    path = HERE / f"herald-{name}.json"
    text = json.dumps(d, indent=2) + "\n"
    if check:
        if not path.exists() or path.read_text() != text:
            stale.append(path.name)
        continue
    path.write_text(text)
    print(f"dashboards/{path.name}: {len(d['panels'])} panels")
if stale:
    sys.exit(f"dashboards: {', '.join(stale)} differ from dashboards/generate.py; run python3 dashboards/generate.py")
