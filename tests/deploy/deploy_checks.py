"""Helpers for the deployment tests: the repository's deploy/ files, read and taken apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tenantlora.json"

# Metrics the dashboard may name that a CPU server does not export (checked against the source).
GPU_ONLY_METRICS = {"tenantlora_gpu_memory_used_bytes"}
# Labels Prometheus adds at scrape time, or that histograms carry.
SCRAPE_LABELS = {"instance", "job", "le"}

# Grafana's macros and template variables, replaced by values PromQL accepts.
_GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$tenant": ".*",
    "$adapter": ".*",
}


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[dict]:
    panels = []
    for panel in dash["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and template variable query."""
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(dash)
        for target in panel.get("targets", [])
    ]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query or "")
        if match:  # label_values(SELECTOR, LABEL): the selector is PromQL, the label must exist
            queries.append((f"variable {var['name']}", f"count by ({match[2]}) ({match[1]})"))
    return queries


def promql(expr: str):
    import promql_parser

    for macro, value in _GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(macro, value)
    return promql_parser.parse(expr)


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric name, labels the query needs on it) for each series selector in `expr`.

    The labels are those the selector matches on and those every enclosing `sum by (...)` (or
    other aggregation) groups by: a query grouping by a label its series lack shows nothing."""
    import promql_parser as pp

    found: list[tuple[str, frozenset[str]]] = []

    def walk(node, grouping: frozenset[str]) -> None:
        if isinstance(node, pp.VectorSelector):
            matched = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            found.append((node.name, frozenset(matched) | grouping))
        elif isinstance(node, pp.MatrixSelector):
            walk(node.vector_selector, grouping)
        elif isinstance(node, pp.AggregateExpr):
            labels = set(grouping)
            if node.modifier is not None and node.modifier.type == pp.AggModifierType.By:
                labels |= set(node.modifier.labels)
            walk(node.expr, frozenset(labels))
        elif isinstance(node, pp.BinaryExpr):
            walk(node.lhs, grouping)
            walk(node.rhs, grouping)
        elif isinstance(node, pp.Call):
            for arg in node.args:
                walk(arg, grouping)
        elif isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
            walk(node.expr, grouping)

    walk(promql(expr), frozenset())
    return found


def dashboard_metrics(dash: dict) -> dict[str, set[str]]:
    """Every metric the dashboard queries -> the labels its queries need on it."""
    needed: dict[str, set[str]] = {}
    for _title, expr in dashboard_queries(dash):
        for name, labels in selectors(expr):
            needed.setdefault(name, set()).update(labels - SCRAPE_LABELS)
    return needed


def exported_series(metrics_text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series
