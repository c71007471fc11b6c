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


def _ttft_mean(run: LoadRun) -> float | None:
    return run.summary.ttft_ms.get("mean")


def _goal(out: Analysis, key: str, value: float | None, goal: str, **extra: object) -> None:
    """Record one goal ("<= x" or ">= x") when its figure was measured."""
    if value is None:
        return
    op, _, bound = goal.partition(" ")
    met = value >= float(bound) if op == ">=" else value <= float(bound)
    out.goals[key] = Goal(value=value, goal=goal, met=met, **extra)  # type: ignore[arg-type]


def analyse(results: BenchResults) -> Analysis:
    out = Analysis()
    loads = results.loads
    main = results.hot_swap.server or next(
        (x.server for x in loads if x.scenario == "shared-base-no-adapter"), None
    )
    base_runs = _runs(loads, "shared-base-no-adapter", server=main)
    base_tput = statistics.median(_tput(x) for x in base_runs) if base_runs else None
    out.base_output_throughput = base_tput
    out.base_output_throughput_runs = [_tput(x) for x in base_runs]
    # Per server and adapter count: the median over the sweep's rounds (one run when rounds=1).
    sweep: dict[tuple[str, int], list[LoadRun]] = {}
    for run in loads:
        if run.scenario in ("shared", "shared-base-no-adapter", "peer"):
            sweep.setdefault((run.server, run.adapters), []).append(run)
    for (server, n), runs in sweep.items():
        out.throughput_by_adapters.setdefault(server, {})[n] = statistics.median(map(_tput, runs))
        ttfts = [t for t in map(_ttft_mean, runs) if t is not None]
        if ttfts:
            out.ttft_mean_ms_by_adapters.setdefault(server, {})[n] = statistics.median(ttfts)
    ours = out.throughput_by_adapters.get(main, {}) if main else {}
    pairs = paired_adapter_runs(loads, main)
    for n in sorted(x for x in ours if x > 0):
        ratio = _paired_median(pairs.get(n), _tput)
        if ratio is None and base_tput:
            ratio = ours[n] / base_tput  # a run without the paired base loads
        if ratio is not None:
            out.paired_ratios.setdefault(main, {})[n] = ratio
    _adapter_goals(out, main, ours, base_tput, pairs)
    out.noisy_runs = [x.label for x in loads if x.noisy]
    _peer_goals(out, loads, main, ours)
    _single_request_goal(out, loads, main)
    _peft_goal(out, loads, ours)
    _memory_goal(out, results)
    _roofline(out, results, base_tput)
    hs = results.hot_swap
    if hs.merged_cold_start_s and hs.cold_ttft_s_median is not None:
        merged_cold = statistics.mean(hs.merged_cold_start_s)
        _goal(
            out,
            "cold_adapter_vs_merged_cold_start",
            hs.cold_ttft_s_median / merged_cold,
            "<= 0.05",
            figures={
                "cold_adapter_ttft_s": hs.cold_ttft_s_median,
                "merged_cold_start_s": merged_cold,
            },
        )
    return out


PAIRED_BASIS = "median over rounds of each run over our base run right before it"


def paired_adapter_runs(
    loads: list[LoadRun], main: str | None
) -> dict[int, list[tuple[LoadRun, LoadRun]]]:
    """Each of our N-adapter runs with the base-only run made right before it on the same server
    (scenario "shared-base-paired", one per N and round), in run order."""
    pairs: dict[int, list[tuple[LoadRun, LoadRun]]] = {}
    before: LoadRun | None = None
    for run in loads:
        if run.server != main:
            continue
        if run.scenario == "shared-base-paired":
            before = run
        elif run.scenario == "shared" and before is not None:
            if before.group == f"N={run.adapters}":
                pairs.setdefault(run.adapters, []).append((run, before))
            before = None
    return pairs


def _paired_median(pairs: list[tuple[LoadRun, LoadRun]] | None, figure) -> float | None:
    """Median over the rounds of figure(N-adapter run) / figure(its paired base run)."""
    ratios = []
    for run, base in pairs or []:
        num, den = figure(run), figure(base)
        if num is not None and den:
            ratios.append(num / den)
    return statistics.median(ratios) if ratios else None


def _adapter_goals(
    out: Analysis,
    main: str | None,
    ours: dict[int, float],
    base_tput: float | None,
    pairs: dict[int, list[tuple[LoadRun, LoadRun]]],
) -> None:
    """Our throughput with N adapters over our own base-only throughput, and the TTFT cost.

    With paired base runs (the sweep makes one right before each of our N-adapter runs) a goal
    is the median over the rounds of the run-by-run ratios, and the figures also give the ratio
    of the sweep's medians; without them, the ratio of the medians."""
    ttft = out.ttft_mean_ms_by_adapters.get(main, {}) if main else {}
    ratios = out.paired_ratios.get(main, {}) if main else {}
    for n, goal in ((1, ">= 0.9"), (32, ">= 0.85"), (128, ">= 0.85")):
        if n not in ratios or not base_tput:
            continue
        figures = {"adapters_tok_s": ours[n], "base_tok_s": base_tput}
        basis = None
        if any(_tput(base) for _, base in pairs.get(n, [])):  # ratios[n] is the paired median
            basis = PAIRED_BASIS
            figures["ratio_of_medians"] = ours[n] / base_tput
            for i, (run, base) in enumerate(pairs[n], 1):
                figures[f"ratio_round_{i}"] = _tput(run) / _tput(base) if _tput(base) else 0.0
        _goal(out, f"throughput_{n}_adapters_vs_base", ratios[n], goal, adapters=n, basis=basis,
              figures=figures)  # fmt: skip
    if 32 in ttft and ttft.get(0):
        figures = {"adapters_ttft_mean_ms": ttft[32], "base_ttft_mean_ms": ttft[0]}
        value, basis = _paired_median(pairs.get(32), _ttft_mean), None
        if value is not None:
            basis = PAIRED_BASIS
            figures["ratio_of_medians"] = ttft[32] / ttft[0]
        else:
            value = ttft[32] / ttft[0]
        _goal(out, "ttft_32_adapters_vs_base", value, "<= 1.5", adapters=32, basis=basis,
              figures=figures)  # fmt: skip


def _peer_goals(
    out: Analysis, loads: list[LoadRun], main: str | None, ours: dict[int, float]
) -> None:
    """Ours over `vllm serve` at the same N, same client, same run."""
    for n in (8, 32):
        peer = [x for x in _runs(loads, "peer", adapters=n) if x.server.startswith("vllm")]
        theirs = out.throughput_by_adapters[peer[0].server][n] if peer else 0.0
        if n in ours and theirs > 0:
            _goal(
                out,
                f"throughput_vs_vllm_serve_{n}_adapters",
                ours[n] / theirs,
                ">= 3",
                adapters=n,
                figures={"tenantlora_tok_s": ours[n], "vllm_serve_tok_s": theirs},
            )


def _single_request_goal(out: Analysis, loads: list[LoadRun], main: str | None) -> None:
    """One request alone: our per-token time over llama.cpp's (its fastest GGUF)."""
    single = _runs(loads, "single")
    mine = [x for x in single if x.server == main and x.summary.completed]
    llama = [x for x in single if x.server.startswith("llama.cpp") and x.summary.completed]
    for run in single:
        if run.summary.completed:
            out.single_request_tok_s[run.server] = _tput(run)
    if mine and llama:
        best = max(llama, key=_tput)
        _goal(
            out,
            "single_request_vs_llama_cpp",
            _tput(best) / _tput(mine[0]),
            "<= 2",
            basis=f"per-token time ratio, ours / {best.server}",
            figures={"tenantlora_tok_s": _tput(mine[0]), "llama_cpp_tok_s": _tput(best)},
        )


def _roofline(out: Analysis, results: BenchResults, base_tput: float | None) -> None:
    roof = results.roofline
    if roof is None or not base_tput:
        return
    achieved = base_tput * roof.flops_per_token / 1e9
    out.roofline_achieved_gflops = achieved
    for rate in roof.rates:
        out.roofline_fraction[f"{rate.dtype}/{rate.threads}t"] = achieved / rate.gflops


def _peft_goal(out: Analysis, loads: list[LoadRun], shared: dict[int, float]) -> None:
    """Ours over the transformers + PEFT peer, same adapters, requests and concurrency."""
    peft = _runs(loads, "peft")
    if not peft or _tput(peft[0]) <= 0:
        return
    n_peft = peft[0].adapters
    pair = [x for x in _runs(loads, "shared-vs-peft") if x.summary.completed]
    ours = _tput(pair[0]) if pair else shared.get(n_peft)
    if ours is None:
        return
    _goal(
        out,
        "throughput_vs_peft_peer",
        ours / _tput(peft[0]),
        ">= 5",
        adapters=n_peft,
        basis="paired run right after the peer"
        if pair
        else f"the shared-base N={n_peft} run of the adapter sweep (the paired run failed)",
        figures={"tenantlora_tok_s": ours, "peft_tok_s": _tput(peft[0])},
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
    _goal(
        out,
        "memory_per_tenant_vs_merged",
        max(per_adapter.uss, 0) / per_engine_uss,
        "<= 0.05",
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
