"""The benchmark's analysis and report from typed results, without servers: headline goals
under `analysis.goals`, JSON that round-trips, Markdown and four PNG plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.analysis import analyse, paired_adapter_runs
from benchmarks.cli import add_run_arguments
from benchmarks.config import BenchConfig
from benchmarks.load import RequestRecord, summarize
from benchmarks.records import (
    BenchResults,
    FirstRequest,
    HotSwap,
    HotSwapTrial,
    LoadRun,
    MachineInfo,
    Memory,
    MemoryResults,
    MonolithicMemory,
    PerTenant,
    SharedMemory,
)
from benchmarks.report import write_report

MB = 2**20


def _run(scenario: str, server: str, adapters: int, tokens: int, group: str | None = None):
    records = [
        RequestRecord(
            i, f"m{i}", f"t{i}", "http://x/v1", i * 0.1, 8, 16, 0.05, 1.0, 0.06, 8, tokens
        )
        for i in range(4)
    ]
    return LoadRun(
        label=f"{server} {scenario}",
        scenario=scenario,
        server=server,
        adapters=adapters,
        group=group,
        mode="rate" if scenario.endswith("rate") else "concurrency",
        rate=1.0 if scenario.endswith("rate") else None,
        concurrency=4,
        loadavg=[1.0, 1.0, 1.0],
        phases_ms={"queue": 1.0, "prefill": 2.0, "decode": 3.0},
        config={},
        summary=summarize(records, wall=2.0),
        requests=[],
    )


def _results(tmp_path: Path) -> BenchResults:
    cfg = BenchConfig.quick_preset(base_model="/m", work_dir=tmp_path, out_dir=tmp_path)
    machine = MachineInfo("cpu", 2, 8 * 1024 * MB, None, "linux", "3.11", {}, "abc", [1.0] * 3)
    first = FirstRequest(0.5, 1.0)
    return BenchResults(
        name="unit",
        started_utc="2026-01-01T00:00:00+00:00",
        machine=machine,
        config=cfg,
        loads=[
            _run("shared-base-no-adapter", "tl", 0, 16, "N=0"),
            _run("peer", "vllm-serve", 0, 8, "N=0"),
            _run("shared", "tl", 1, 16, "N=1"),
            _run("shared", "tl", 8, 14, "N=8"),
            _run("peer", "vllm-serve", 8, 4, "N=8"),
            _run("shared", "tl", 32, 12, "N=32"),
            _run("peer", "vllm-serve", 32, 6, "N=32"),
            _run("single", "tl", 0, 8),
            _run("single", "llama.cpp-Q4_1", 0, 16),
            _run("base-rate", "tl", 0, 16),
            _run("shared-rate", "tl", 4, 12),
            _run("peft", "peft-peer", 4, 1),
            _run("shared-vs-peft", "tl", 4, 12, "peft"),
            _run("monolithic", "multiple", 1, 16),
        ],
        hot_swap=HotSwap(
            server="tl",
            trials=[HotSwapTrial("lora000", FirstRequest(0.2, 0.4), first)],
            cold_ttft_s_median=0.2,
            warm_ttft_s_median=0.5,
            cold_e2e_s_median=0.4,
            warm_e2e_s_median=1.0,
            merged_cold_start_s=[40.0],
        ),
        memory=MemoryResults(
            reference=Memory(900 * MB, 800 * MB, 3),
            shared=SharedMemory(
                "tl",
                Memory(1000 * MB, 900 * MB, 3),
                Memory(1040 * MB, 940 * MB, 3),
                4,
                PerTenant(10 * MB, 10 * MB),
            ),
            monolithic=MonolithicMemory(1, [Memory(900 * MB, 800 * MB, 3)], 4096 * MB),
        ),
    )


def test_analysis_goals_and_report_files(tmp_path: Path) -> None:
    results = _results(tmp_path)
    results.analysis = analyse(results)
    goals = results.analysis.goals
    assert set(goals) == {
        "throughput_1_adapters_vs_base",
        "throughput_32_adapters_vs_base",
        "ttft_32_adapters_vs_base",
        "throughput_vs_vllm_serve_8_adapters",
        "throughput_vs_vllm_serve_32_adapters",
        "single_request_vs_llama_cpp",
        "memory_per_tenant_vs_merged",
        "throughput_vs_peft_peer",
        "cold_adapter_vs_merged_cold_start",
    }
    assert goals["throughput_1_adapters_vs_base"].value == 1.0
    assert goals["throughput_32_adapters_vs_base"].value == 0.75  # 12 / 16 tokens
    assert goals["throughput_32_adapters_vs_base"].met is False  # goal >= 0.85
    assert goals["ttft_32_adapters_vs_base"].value == 1.0
    assert goals["throughput_vs_vllm_serve_8_adapters"].value == 3.5  # 14 / 4
    assert goals["throughput_vs_vllm_serve_8_adapters"].met is True
    assert goals["throughput_vs_vllm_serve_32_adapters"].value == 2.0  # 12 / 6
    assert goals["throughput_vs_vllm_serve_32_adapters"].met is False
    assert goals["single_request_vs_llama_cpp"].value == 2.0  # 16 / 8 tokens
    assert goals["single_request_vs_llama_cpp"].met is True
    assert goals["throughput_vs_peft_peer"].value == 12.0
    assert goals["memory_per_tenant_vs_merged"].value == 10 / 800
    assert goals["cold_adapter_vs_merged_cold_start"].value == 0.2 / 40.0
    assert results.analysis.monolithic_engines_that_fit == 5

    paths = write_report(results, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    for goal in data["analysis"]["goals"].values():
        assert isinstance(goal["value"], float) and isinstance(goal["met"], bool) and goal["goal"]
    assert data["memory"]["shared"]["per_adapter_bytes"]["uss"] == 10 * MB
    md = paths["markdown"].read_text()
    assert "throughput, 32 adapters / our base alone | 0.75 | >= 0.85 | NO" in md
    assert "## Side by side" in md and "| vllm-serve |" in md
    assert "## One request alone" in md
    for plot in ("latency_vs_load", "throughput_vs_adapters", "memory", "hot_swap"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The results file alone re-renders the same report (what `tenantlora bench report` does).
    again = write_report(data, tmp_path / "again")
    assert again["markdown"].read_text() == md


def test_goals_are_medians_over_the_sweep_rounds(tmp_path: Path) -> None:
    """Three interleaved rounds: each server and N gets the median of its runs, so one slow or
    fast round does not make a goal."""
    results = _results(tmp_path)
    results.config.rounds = 3
    results.loads = [
        _run("shared-base-no-adapter", "tl", 0, 16, "N=0"),
        _run("shared-base-no-adapter", "tl", 0, 40, "N=0"),  # one outlier round
        _run("shared-base-no-adapter", "tl", 0, 16, "N=0"),
        _run("shared", "tl", 32, 12, "N=32"),
        _run("shared", "tl", 32, 14, "N=32"),
        _run("shared", "tl", 32, 2, "N=32"),  # one slow round
        _run("peer", "vllm-serve", 32, 4, "N=32"),
        _run("peer", "vllm-serve", 32, 4, "N=32"),
        _run("peer", "vllm-serve", 32, 12, "N=32"),
    ]
    results.analysis = analyse(results)
    goals = results.analysis.goals
    assert goals["throughput_32_adapters_vs_base"].value == 0.75  # median 12 / median 16
    assert goals["throughput_vs_vllm_serve_32_adapters"].value == 3.0  # 12 / median 4
    runs = results.analysis.base_output_throughput_runs  # every round is kept in the results
    assert len(runs) == 3 and runs[1] > runs[0] == runs[2]
    assert results.analysis.base_output_throughput == runs[0]
    md = write_report(results, tmp_path / "rounds")["markdown"].read_text()
    assert "repeated 3 time(s) interleaved" in md


def test_adapter_goals_pair_each_run_with_the_base_run_before_it(tmp_path: Path) -> None:
    """The machine's speed drifts over a run: each of our N-adapter runs is divided by the base
    run made right before it (same server), and the goal is the median of those ratios; the
    ratio of the sweep's medians stays in the figures. Other servers' runs in between and an
    N-adapter run whose paired base belongs to another N do not pair."""
    results = _results(tmp_path)
    results.config.rounds = 3
    results.loads, expected = [], []
    for base, paired, n32 in ((16, 10, 9), (16, 20, 18), (40, 40, 30)):
        run = [
            _run("shared-base-no-adapter", "tl", 0, base, "N=0"),
            _run("shared-base-paired", "tl", 0, paired, "N=32"),
            _run("shared", "tl", 32, n32, "N=32"),
            _run("peer", "vllm-serve", 32, 4, "N=32"),
        ]
        results.loads += run
        expected.append((run[2], run[1]))
    wrong_n = [_run("shared-base-paired", "tl", 0, 50, "N=8"), _run("shared", "tl", 32, 1)]
    between = [
        _run("shared-base-paired", "tl", 0, 50, "N=32"),
        _run("peer", "vllm-serve", 32, 50, "N=32"),  # another server's run in between
        _run("shared", "tl", 32, 2, "N=32"),
    ]
    results.loads += wrong_n + between
    expected.append((between[2], between[0]))
    pairs = paired_adapter_runs(results.loads, "tl")
    assert [(r.label, id(r), id(b)) for r, b in pairs[32]] == [
        (r.label, id(r), id(b)) for r, b in expected
    ]
    tput = [r.summary.output_throughput / b.summary.output_throughput for r, b in expected]
    results.analysis = analyse(results)
    goal = results.analysis.goals["throughput_32_adapters_vs_base"]
    assert goal.value == pytest.approx(sorted(tput)[1:3][0] / 2 + sorted(tput)[1:3][1] / 2)
    assert 0.5 < goal.value < 1.0 and goal.basis
    assert goal.met is (goal.value >= 0.85)
    medians = results.analysis.throughput_by_adapters["tl"]
    assert goal.figures["ratio_of_medians"] == pytest.approx(medians[32] / medians[0])
    assert goal.figures["ratio_round_1"] == pytest.approx(tput[0])
    assert results.analysis.paired_ratios["tl"][32] == pytest.approx(goal.value)
    md = write_report(results, tmp_path / "paired")["markdown"].read_text()
    assert f"made right before it, median over the rounds): N=32: {goal.value:.2f}" in md


def test_rounds_flag_takes_positive_integers_only() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    assert parser.parse_args(["--rounds", "3"]).rounds == 3
    for bad in ("0", "-2", "two", "1.5", "9" * 400 + "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rounds", bad])


def test_every_sweep_run_draws_its_own_prompts() -> None:
    """A run whose seed an earlier run on the same server used would find its prompts in vLLM's
    prefix cache; each round, adapter count and paired base run gets its own seed, and none is
    one of the other scenarios' seeds."""
    from benchmarks.scenarios import SEED_PEFT, SEED_RATE, SEED_SINGLE, SEED_WARMUP, sweep_seed

    counts = [0, 1, 8, 32, 128, 4999]
    seeds = [sweep_seed(r, n, p) for r in range(5) for n in counts for p in (False, True)]
    assert len(set(seeds)) == len(seeds)
    others = {SEED_WARMUP, SEED_SINGLE, *range(SEED_RATE, SEED_RATE + 100), SEED_PEFT}
    assert not others & set(seeds)
    for bad in ((-1, 1), (0, -1), (0, 5000)):
        with pytest.raises(ValueError):
            sweep_seed(*bad)


def test_prefix_cache_hit_rate_from_metric_deltas(tmp_path: Path) -> None:
    from benchmarks.harness import prefix_cache_hit_rate

    q, h = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
    assert prefix_cache_hit_rate({q: 100, h: 40}, {q: 300, h: 90}) == 0.25
    assert prefix_cache_hit_rate({}, {}) is None  # a server without vLLM's metrics
    assert prefix_cache_hit_rate({q: 5, h: 5}, {q: 5, h: 5}) is None  # no prompt in the run

    results = _results(tmp_path)
    for run, rate in zip(results.loads, (0.9, 0.1, 0.2, 0.3), strict=False):
        run.prefix_cache_hit_rate = rate
    results.loads[-1].prefix_cache_hit_rate = 1.0  # not a sweep run: not counted
    results.analysis = analyse(results)
    md = write_report(results, tmp_path / "out")["markdown"].read_text()
    assert "found in the prefix cache was 90 % (tl shared-base-no-adapter), the median 25 %" in md
