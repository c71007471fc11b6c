"""The Grafana dashboard against a live server: every metric it queries is on the real
/metrics page, with every label its queries filter or group by."""

from __future__ import annotations

import re

import httpx
import pytest
from deploy_checks import (
    GPU_ONLY_METRICS,
    REPO,
    dashboard,
    dashboard_metrics,
    exported_series,
)

pytestmark = pytest.mark.engine


def test_dashboard_metrics_are_exported_by_a_live_server(live_server):
    pytest.importorskip("promql_parser")
    key = live_server.create_tenant("dashboard-viewer")
    client = live_server.client(key)
    # Traffic so the labelled series exist: an adapter (cold load), the base model, an error.
    for model in ("a", live_server.base_model_name):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=4,
            temperature=0,
        )
    client.completions.create(model="a", prompt="One, two,", max_tokens=3, temperature=0)
    missing = httpx.post(
        f"{live_server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]},
        timeout=60,
    )
    assert missing.status_code == 404

    page = live_server.admin("GET", "/metrics")
    assert page.status_code == 200
    exported = exported_series(page.text)
    needed = dashboard_metrics(dashboard())

    absent = sorted(set(needed) - set(exported) - GPU_ONLY_METRICS)
    assert not absent, f"the dashboard queries metrics /metrics does not export: {absent}"
    for name, labels in needed.items():
        if name in exported:
            assert labels <= exported[name], (
                f"{name}: the dashboard needs labels {sorted(labels - exported[name])} "
                f"it does not carry (has {sorted(exported[name])})"
            )
    # The GPU-only series are defined by the server, just not exported without a GPU.
    source = (REPO / "serving" / "metrics.py").read_text()
    for name in GPU_ONLY_METRICS:
        assert re.search(rf'"{name}"', source), name

    # The tenant's own traffic is on the page the dashboard reads.
    requests = [
        line
        for line in page.text.splitlines()
        if line.startswith("tenantlora_requests_total{") and 'tenant="dashboard-viewer"' in line
    ]
    assert any('status="404"' in line for line in requests)
    assert any('adapter="public/a@1"' in line and 'status="200"' in line for line in requests)
