"""Headline ratios of a serving-benchmark run against its goals, and the memory extrapolation."""

from __future__ import annotations

import statistics

from benchmarks.records import Analysis, BenchResults, Extrapolation, Goal, LoadRun


def _runs(loads: list[LoadRun], scenario: str, **match: object) -> list[LoadRun]:
    return [
        x
        for x in loads
        if x.scenario == scenario and all(getattr(x, k) == v for k, v in match.items())
    ]


def _tput(run: LoadRun) -> float:
    return run.summary.output_throughput


def analyse(results: BenchResults) -> Analysis:
    out = Analysis()
    loads = results.loads
    base_runs = _runs(loads, "base")
    base_tput = statistics.mean(_tput(x) for x in base_runs) if base_runs else None
    out.base_output_throughput = base_tput
    out.base_output_throughput_runs = [_tput(x) for x in base_runs]
    for run in _runs(loads, "shared"):
        out.throughput_by_adapters.setdefault(run.server, {})[run.adapters] = _tput(run)
        paired = _runs(loads, "base", group=run.group)
        if paired and _tput(paired[0]) > 0:
            out.paired_ratios.setdefault(run.server, {})[run.adapters] = _tput(run) / _tput(
                paired[0]
            )
    main = results.hot_swap.server
    shared = out.throughput_by_adapters.get(main, {}) if main else {}
    _throughput_goal(out, loads, main, shared, base_tput)
    _peft_goal(out, loads, shared)
    _memory_goal(out, results)
    hs = results.hot_swap
    if hs.merged_cold_start_s and hs.cold_ttft_s_median is not None:
        merged_cold = statistics.mean(hs.merged_cold_start_s)
        ratio = hs.cold_ttft_s_median / merged_cold
        out.goals["cold_adapter_vs_merged_cold_start"] = Goal(
            value=ratio,
            goal="<= 0.05",
            met=ratio <= 0.05,
            figures={
                "cold_adapter_ttft_s": hs.cold_ttft_s_median,
                "merged_cold_start_s": merged_cold,
            },
        )
    return out


def _throughput_goal(
    out: Analysis,
    loads: list[LoadRun],
    main: str | None,
    shared: dict[int, float],
    base_tput: float | None,
) -> None:
    """The shared base at (up to) 32 adapters over the reference run paired with it."""
    n32 = max((n for n in shared if n <= 32), default=None)
    if not base_tput or n32 is None:
        return
    run = _runs(loads, "shared", server=main, adapters=n32)[0]
    paired = _runs(loads, "base", group=run.group)
    pair_tput = _tput(paired[0]) if paired else base_tput
    ratio = shared[n32] / pair_tput
    out.goals["throughput_32_adapters_vs_base"] = Goal(
        value=ratio,
        goal=">= 0.7",
        met=ratio >= 0.7,
        adapters=n32,
        figures={
            "base_output_throughput_paired": pair_tput,
            "vs_mean_of_base_runs": shared[n32] / base_tput,
        },
    )


def _peft_goal(out: Analysis, loads: list[LoadRun], shared: dict[int, float]) -> None:
    """The shared base over the transformers + PEFT peer, same adapters and requests."""
    peft = _runs(loads, "peft")
    if not peft or _tput(peft[0]) <= 0:
        return
    n_peft = peft[0].adapters
    pair = [x for x in _runs(loads, "shared-vs-peft") if x.summary.completed]
    ours = _tput(pair[0]) if pair else shared.get(n_peft)
    if ours is None:
        return
    ratio = ours / _tput(peft[0])
    out.goals["throughput_vs_peft_peer"] = Goal(
        value=ratio,
        goal=">= 5",
        met=ratio >= 5,
        adapters=n_peft,
        basis="paired run right after the peer"
        if pair
        else f"the shared-base N={n_peft} run of the adapter sweep (the paired run failed)",
    )


def _memory_goal(out: Analysis, results: BenchResults) -> None:
    """Memory per extra tenant against one more merged engine, and N tenants extrapolated."""
    mem = results.memory
    mono = mem.monolithic
    if mono is None or not mono.per_engine or mem.shared is None:
        return
    per_engine_uss = statistics.mean(m.uss for m in mono.per_engine)
    per_engine_rss = statistics.mean(m.rss for m in mono.per_engine)
    per_adapter = mem.shared.per_adapter_bytes
    if not per_engine_uss:
        return
    ratio = max(per_adapter.uss, 0) / per_engine_uss
    out.goals["memory_per_tenant_vs_merged"] = Goal(
        value=ratio,
        goal="<= 0.05",
        met=ratio <= 0.05,
        figures={
            "per_adapter_uss_bytes": per_adapter.uss,
            "per_merged_engine_uss_bytes": per_engine_uss,
        },
    )
    shared_base = mem.shared.before_adapters.uss
    measured_n = mem.shared.adapters_loaded
    for n in sorted({1, 8, 32, 128, *results.config.adapter_counts}):
        out.extrapolation.append(
            Extrapolation(
                tenants=n,
                shared_uss_bytes=shared_base + n * per_adapter.uss,
                shared_basis="measured" if n == measured_n else "interpolated",
                monolithic_uss_bytes=n * per_engine_uss,
                monolithic_rss_bytes=n * per_engine_rss,
                monolithic_basis="measured" if n <= len(mono.per_engine) else "extrapolated",
            )
        )
    out.monolithic_engines_that_fit = int(mono.available_bytes // per_engine_uss)
    out.monolithic_engines_that_fit_total_ram = int(results.machine.memory_bytes // per_engine_uss)
