"""CI smoke test: `tenantlora bench run --quick` end to end against real servers (the real vLLM
CPU engine, our server, the transformers+PEFT peer); asserts only that the report is produced
and well-formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_quick_benchmark_report(base_model_path: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "serving.cli", "bench", "run", "--quick",
        "--base-model", str(base_model_path),
        "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1100,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    name = "serving_benchmark_quick"
    results = json.loads((out_dir / f"{name}.json").read_text())
    assert results["errors"] == []
    for key in ("machine", "config", "engines", "loads", "hot_swap", "memory", "analysis"):
        assert key in results, key
    scenarios = {x["scenario"] for x in results["loads"]}
    assert {
        "shared-base-no-adapter",
        "shared",
        "peer",
        "single",
        "shared-rate",
        "base-rate",
        "peft",
        "monolithic",
    } <= scenarios
    peers = {x["adapters"] for x in results["loads"] if x["scenario"] == "peer"}
    assert peers == {0, *results["config"]["adapter_counts"]}  # vllm serve at every N
    assert all(x["quiet"] is not None for x in results["loads"])
    for entry in results["loads"]:
        s = entry["summary"]
        if entry["scenario"] == "warmup":
            continue
        assert s["completed"] >= 1, entry["label"]
        assert _positive(s["output_throughput"]) and _positive(s["request_throughput"])
        for metric in ("ttft_ms", "e2e_ms"):
            assert _positive(s[metric]["p50"]) and s[metric]["p50"] <= s[metric]["p99"]
        assert all(r["tenant"] and r["model"] for r in entry["requests"])
    hs = results["hot_swap"]
    assert _positive(hs["cold_ttft_s_median"]) and _positive(hs["warm_ttft_s_median"])
    assert all(_positive(v) for v in hs["merged_cold_start_s"])
    mem = results["memory"]
    assert _positive(mem["shared"]["after_adapters"]["uss"])
    assert all(_positive(m["uss"]) for m in mem["monolithic"]["per_engine"])
    goals = results["analysis"]["goals"]
    assert set(goals) == {
        "throughput_1_adapters_vs_base",
        "memory_per_tenant_vs_merged",
        "throughput_vs_peft_peer",
        "cold_adapter_vs_merged_cold_start",
    }
    assert all(isinstance(g["value"], float) and isinstance(g["met"], bool) for g in goals.values())

    md = (out_dir / f"{name}.md").read_text()
    for heading in ("## Goals", "## Side by side", "## Loads", "## Hot swap", "## Memory"):
        assert heading in md
    import matplotlib.image

    for plot in ("latency_vs_load", "throughput_vs_adapters", "memory", "hot_swap"):
        path = out_dir / f"{name}_{plot}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert path.name in md
