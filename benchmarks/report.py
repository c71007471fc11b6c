"""Write a benchmark's results as JSON, Markdown and PNG plots (matplotlib, Agg backend).

`tenantlora bench report RESULTS.json [--note TEXT ...]` rewrites the Markdown and plots from a
results file, adding reviewer notes to it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.records import BenchResults

MB = 1024 * 1024


def _pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: the CLI starts faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / MB:,.0f}"


def plot_latency_vs_load(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for scenario, color in (("base-rate", "tab:blue"), ("shared-rate", "tab:orange")):
        runs = sorted(
            (x for x in results["loads"] if x["scenario"] == scenario), key=lambda x: x["rate"]
        )
        if not runs:
            continue
        label = (
            "base alone"
            if scenario == "base-rate"
            else f"shared base, {runs[0]['adapters']} adapters"
        )
        rates = [x["rate"] for x in runs]
        for ax, metric in zip(axes, ("e2e_ms", "ttft_ms"), strict=True):
            for q, style in (("p50", "-o"), ("p95", "--s"), ("p99", ":^")):
                vals = [x["summary"][metric][q] for x in runs]
                ys = [v / 1000 if v is not None else float("nan") for v in vals]
                ax.plot(rates, ys, style, color=color, label=f"{label} {q}")
    for ax, title in zip(axes, ("end-to-end latency", "time to first token"), strict=True):
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency percentiles against load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput_vs_adapters(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    by = results["analysis"].get("throughput_by_adapters", {})
    for server, points in by.items():
        ns = sorted(n for n in (int(k) for k in points) if n > 0)
        ax.plot(ns, [points[n] if n in points else points[str(n)] for n in ns], "-o", label=server)
    base = results["analysis"].get("base_output_throughput")
    if base:
        ax.axhline(base, color="k", ls="--", label="our base alone")
        ax.axhline(0.85 * base, color="grey", ls=":", label="goal: 0.85 x base")
    for scenario, marker, name in (
        ("peft", "X", "transformers+PEFT peer"),
        ("monolithic", "D", "monolithic merged engines"),
        ("llamacpp", "P", "llama.cpp server, base only"),
    ):
        for x in results["loads"]:
            if x["scenario"] == scenario:
                ax.plot(
                    [x["adapters"]],
                    [x["summary"]["output_throughput"]],
                    marker,
                    markersize=10,
                    label=f"{name} ({x['server'] if scenario == 'llamacpp' else x['adapters']})",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters (tenants) in the Zipf mix")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Aggregate throughput against number of adapters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    names, rss, uss = [], [], []
    mem = results["memory"]
    if mem.get("reference"):
        names.append("base engine\n(no LoRA)")
        rss.append(mem["reference"]["rss"] / MB)
        uss.append(mem["reference"]["uss"] / MB)
    if mem.get("shared"):
        s = mem["shared"]
        names += ["shared engine\n0 adapters", f"shared engine\n{s['adapters_loaded']} adapters"]
        rss += [s["before_adapters"]["rss"] / MB, s["after_adapters"]["rss"] / MB]
        uss += [s["before_adapters"]["uss"] / MB, s["after_adapters"]["uss"] / MB]
    for i, m in enumerate((mem.get("monolithic") or {}).get("per_engine", [])):
        names.append(f"merged engine\n#{i + 1}")
        rss.append(m["rss"] / MB)
        uss.append(m["uss"] / MB)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rss, 0.4, label="RSS (process tree)")
    ax.bar([x + 0.2 for x in xs], uss, 0.4, label="USS (private to the tree)")
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("Measured resident memory per engine")
    ax.legend(fontsize=7)
    ax = axes[1]
    ext = results["analysis"].get("extrapolation", [])
    if ext:
        labels = [str(e["tenants"]) for e in ext]
        xs = range(len(ext))
        ax.bar(
            [x - 0.2 for x in xs],
            [e["shared_uss_bytes"] / MB for e in ext],
            0.4,
            label="one shared base + N adapters",
        )
        bars = ax.bar(
            [x + 0.2 for x in xs],
            [e["monolithic_uss_bytes"] / MB for e in ext],
            0.4,
            label="N merged engines",
        )
        for bar, e in zip(bars, ext, strict=True):
            if e["monolithic_basis"] == "extrapolated":
                bar.set_hatch("//")
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        ax.set_xlabel("tenants N (hatched: extrapolated from measured engines)")
        ax.set_ylabel("MiB (USS)")
        ax.legend(fontsize=7)
    ax.set_title("Memory for N tenants")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hot_swap(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    hs = results["hot_swap"]
    labels, vals = [], []
    for key, label in (
        ("warm_ttft_s_median", "warm adapter\nTTFT"),
        ("cold_ttft_s_median", "cold adapter\nTTFT"),
    ):
        if hs.get(key) is not None:
            labels.append(label)
            vals.append(hs[key])
    if hs.get("merged_cold_start_s"):
        labels.append("merged model\ncold start to 1st token")
        vals.append(sum(hs["merged_cold_start_s"]) / len(hs["merged_cold_start_s"]))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(labels, vals, color=["tab:green", "tab:orange", "tab:red"][: len(vals)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}s", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title("Hot swap: cold adapter vs merged-model cold start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    m = results["machine"]
    cfg = results["config"]
    a = results["analysis"]
    lines = [
        f"# Serving benchmark: {results['name']}",
        "",
        f"Run {results['started_utc']} to {results.get('finished_utc', '?')} "
        f"({_f(results.get('wall_s'), 0)} s). Machine: {m['cpu']}, {m['logical_cores']} logical "
        f"cores, {m['memory_bytes'] / 2**30:.1f} GiB RAM, no GPU"
        if m.get("gpu_memory_used_bytes") is None
        else f"Run {results['started_utc']}. Machine: {m['cpu']}, GPU present.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; commit "
        f"{m.get('git_commit') or '?'}. Load average (1 min) at start "
        f"{_f(m['load_average_start'][0], 2)} (after waiting {_f(m.get('quiet_wait_s'), 0)} s "
        f"for a quiet machine), at end {_f((m.get('load_average_end') or [None])[0], 2)}. "
        f"{_quiet_summary(results)}",
        "",
        f"Workload: {cfg['server']} server, base `{Path(cfg['base_model']).name}`, Zipf exponent "
        f"{cfg['zipf']}, prompt length {cfg['prompt_len']} words, {cfg['max_tokens']} output "
        f"tokens (ignore_eos, greedy), closed loop at concurrency {cfg['concurrency']} with "
        f"{cfg['requests']} requests per run, the adapter sweep (ours and the peers at every N) "
        f"repeated {cfg.get('rounds', 1)} time(s) interleaved, figures and goals from the medians "
        f"(PEFT peer: {cfg['peft_requests']}, llama.cpp: "
        f"{cfg.get('llamacpp_requests')}); one request alone: {cfg.get('single_prompt_words')}-word "
        f"prompt, {cfg.get('single_requests')} requests; every vLLM engine (ours and `vllm serve`) "
        f"with a KV cache of {cfg.get('kv_cache_gib')} GiB, max_loras "
        f"{cfg['max_loras'] if cfg['max_loras'] is not None else 'default'}, max_model_len "
        f"{cfg['max_model_len']}, the same dtype, LoRA dtype ({cfg.get('lora_dtype') or 'auto'}) "
        "and adapters (r=16 on all seven projections, saved in bf16). "
        f"{_prefix_cache_summary(results)}",
        "",
    ]
    if results["errors"]:
        short = [
            e.splitlines()[0][:160]
            + (f" ... {e.strip().splitlines()[-1][:160]}" if "\n" in e else "")
            for e in results["errors"]
        ]
        lines += ["**Errors** (full text in the JSON): " + "; ".join(short), ""]
    lines += [
        "## Goals (ratios from this one run)",
        "",
        "| goal | measured | target | met |",
        "|---|---|---|---|",
    ]
    names = {
        "throughput_1_adapters_vs_base": "throughput, 1 adapter / our base alone",
        "throughput_32_adapters_vs_base": "throughput, {adapters} adapters / our base alone",
        "throughput_128_adapters_vs_base": "throughput, {adapters} adapters / our base alone",
        "ttft_32_adapters_vs_base": "mean TTFT, {adapters} adapters / our base alone",
        "throughput_vs_vllm_serve_8_adapters": "throughput vs `vllm serve`, {adapters} adapters",
        "throughput_vs_vllm_serve_32_adapters": "throughput vs `vllm serve`, {adapters} adapters",
        "throughput_vs_peft_peer": "throughput vs transformers+PEFT peer, {adapters} adapters",
        "single_request_vs_llama_cpp": "one request alone: per-token time / llama.cpp's",
        "memory_per_tenant_vs_merged": "memory per extra tenant / one more merged engine (USS)",
        "cold_adapter_vs_merged_cold_start": "cold adapter first-token latency / merged cold start",
    }
    for key, g in a["goals"].items():
        title = names.get(key, key).format(**g) + (f" [{g['basis']}]" if g.get("basis") else "")
        lines.append(
            f"| {title} | {g['value']:.3g} | {g['goal']} | {'yes' if g['met'] else 'NO'} |"
        )
    lines += _side_by_side(results)
    lines += _single_and_roofline(results)
    lines += [
        "",
        "## Loads",
        "",
        "| run | adapters | mode | req/s | out tok/s | TTFT p50/p95/p99 ms | TPOT p50/p95/p99 ms "
        "| e2e p50/p95/p99 ms | ok/sent | errors | vLLM queue/prefill/decode ms | load avg before/after "
        "| other processes' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in results["loads"]:
        s = x["summary"]
        mode = f"rate {x['rate']}" if x["mode"] == "rate" else f"conc {x['concurrency']}"

        def pq(key: str, s: dict[str, Any] = s) -> str:
            return "/".join(_f(s[key][q], 0) for q in ("p50", "p95", "p99"))

        ph = x.get("phases_ms") or {}
        phases = "/".join(_f(ph.get(k), 0) for k in ("queue", "prefill", "decode")) if ph else "-"
        lines.append(
            f"| {x['label']} | {x['adapters']} | {mode} | {_f(s['request_throughput'], 2)} | "
            f"{_f(s['output_throughput'])} | {pq('ttft_ms')} | {pq('tpot_ms')} | {pq('e2e_ms')} | "
            f"{s['completed']}/{s['requests_sent']} | {s['errors'] or '-'} | {phases} | "
            f"{_load_cells(x)} |"
        )
    hs = results["hot_swap"]
    lines += ["", "## Hot swap", ""]
    if hs.get("trials"):
        lines.append(
            f"Server {hs['server']}: first request (32-word prompt, 16 tokens) to a cold adapter: "
            f"TTFT median {_f(hs['cold_ttft_s_median'], 3)} s, e2e {_f(hs['cold_e2e_s_median'], 3)} s; "
            f"the same request once warm: TTFT {_f(hs['warm_ttft_s_median'], 3)} s, e2e "
            f"{_f(hs['warm_e2e_s_median'], 3)} s ({len(hs['trials'])} adapters tried)."
        )
    if hs.get("server_adapter_load_s_mean") is not None:
        lines.append(
            f"Adapter load time reported by the server: mean {_f(hs['server_adapter_load_s_mean'], 3)} s."
        )
    if hs.get("merged_cold_start_s"):
        lines.append(
            "Merged model brought up on demand (process spawn to first token): "
            + ", ".join(f"{v:.1f} s" for v in hs["merged_cold_start_s"])
            + "."
        )
    if hs.get("touch_all"):
        t = hs["touch_all"]
        lines.append(
            f"Loading all {t['adapters']} adapters (one 1-token request each, 4 in flight): "
            f"{_f(t['wall_s'])} s, {t['completed']} completed."
        )
    mem = results["memory"]
    lines += [
        "",
        "## Memory",
        "",
        "| engine | role | ready (s) | RSS MiB | USS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, e in results["engines"].items():
        mm = e.get("memory") or e.get("memory_end") or {}
        lines.append(
            f"| {name} | {e['role']} | {_f(e.get('ready_s'))} | {_mb(mm.get('rss'))} | {_mb(mm.get('uss'))} |"
        )
    if mem.get("shared"):
        s = mem["shared"]
        lines += [
            "",
            f"Shared engine ({s['server']}, process tree): USS {_mb(s['before_adapters']['uss'])} MiB "
            f"with no adapter loaded, {_mb(s['after_adapters']['uss'])} MiB with "
            f"{s['adapters_loaded']} loaded: {s['per_adapter_bytes']['uss'] / MB:.2f} MiB USS "
            f"({s['per_adapter_bytes']['rss'] / MB:.2f} MiB RSS) per additional tenant. Adapter "
            f"file {_mb(mem.get('adapter_file_bytes'))} MiB, merged checkpoint "
            f"{_mb(mem.get('merged_file_bytes'))} MiB.",
        ]
    if a.get("extrapolation"):
        lines += [
            "",
            "| tenants | shared base + adapters, MiB | basis | merged engines, MiB (USS) "
            "| merged, MiB (RSS) | basis |",
            "|---|---|---|---|---|---|",
        ]
        for e in a["extrapolation"]:
            lines.append(
                f"| {e['tenants']} | {_mb(e['shared_uss_bytes'])} | {e['shared_basis']} | "
                f"{_mb(e['monolithic_uss_bytes'])} | {_mb(e['monolithic_rss_bytes'])} | "
                f"{e['monolithic_basis']} |"
            )
        lines.append(
            f"\nMerged engines that would fit (extrapolated from the measured USS): about "
            f"{a.get('monolithic_engines_that_fit')} in the memory available at the time "
            f"({_mb(mem['monolithic']['available_bytes'])} MiB, the machine is shared), about "
            f"{a.get('monolithic_engines_that_fit_total_ram')} in all of the machine's RAM."
        )
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"


SWEEP_SCENARIOS = ("shared", "shared-base-paired", "shared-base-no-adapter", "peer")


def _prefix_cache_summary(results: dict[str, Any]) -> str:
    """How much of the sweep runs' prompts the servers' prefix caches held (each run draws its own
    prompts, so it should be near zero)."""
    runs = [
        x
        for x in results["loads"]
        if x["scenario"] in SWEEP_SCENARIOS and x.get("prefix_cache_hit_rate") is not None
    ]
    if not runs:
        return ""
    worst = max(runs, key=lambda x: x["prefix_cache_hit_rate"])
    typical = median(x["prefix_cache_hit_rate"] for x in runs)
    return (
        "Every sweep run draws its own prompts (prefix caching is on in every vLLM engine, as "
        "by default): the most of a run's prompt tokens found in the prefix cache was "
        f"{100 * worst['prefix_cache_hit_rate']:.0f} % ({worst['label']}), the median "
        f"{100 * typical:.0f} %."
    )


def _quiet_summary(results: dict[str, Any]) -> str:
    noisy = [x["label"] for x in results["loads"] if x.get("noisy")]
    if not noisy:
        return (
            "Every run was quiet: processes outside the benchmark used at most "
            f"{max((100 * (x.get('quiet') or {}).get('foreign_share', 0) for x in results['loads']), default=0):.1f} "
            "% of the CPU during any run (flag above 5 %). The load average before a run "
            "includes the previous run's own servers."
        )
    return f"**{len(noisy)} runs were not quiet** (flagged in the table): {', '.join(noisy)}."


def _load_cells(x: dict[str, Any]) -> str:
    q = x.get("quiet")
    if not q:
        return f"-/{_f((x.get('loadavg') or [None])[0], 2)} | -"
    flag = " (not quiet)" if x.get("noisy") else ""
    return (
        f"{_f(q['load_before'], 2)}/{_f(q['load_after'], 2)} | "
        f"{100 * q['foreign_share']:.1f} %{flag}"
    )


def _side_by_side(results: dict[str, Any]) -> list[str]:
    """Output tok/s and mean TTFT per server and adapter count, from the same run."""
    a = results["analysis"]
    by = a.get("throughput_by_adapters") or {}
    if not by:
        return []
    ttft = a.get("ttft_mean_ms_by_adapters") or {}
    counts = sorted({int(n) for points in by.values() for n in points})
    lines = [
        "",
        "## Side by side (same client, same run, median over the rounds; N=0 is the base alone)",
        "",
        "| server | " + " | ".join(f"N={n}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for server, points in by.items():
        t = ttft.get(server, {})
        cells = []
        for n in counts:
            v = points.get(n, points.get(str(n)))
            tt = t.get(n, t.get(str(n)))
            cells.append("-" if v is None else f"{v:.1f} tok/s, TTFT {_f(tt, 0)} ms")
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    base = a.get("base_output_throughput")
    ratios = next(iter((a.get("paired_ratios") or {}).values()), {})
    if base and ratios:
        lines += [
            "",
            "Ours with N adapters over our base alone"
            + (
                " (each N-adapter run over a base-only run made right before it, median over "
                "the rounds): "
                if any(x.get("scenario") == "shared-base-paired" for x in results["loads"])
                else ": "
            )
            + ", ".join(f"N={n}: {float(r):.2f}" for n, r in ratios.items())
            + ".",
        ]
    return lines


def _single_and_roofline(results: dict[str, Any]) -> list[str]:
    a = results["analysis"]
    lines: list[str] = []
    single = a.get("single_request_tok_s") or {}
    if single:
        lines += [
            "",
            "## One request alone (concurrency 1, greedy, ignore_eos)",
            "",
            "| server | output tok/s | ms per token |",
            "|---|---|---|",
        ]
        for server, v in sorted(single.items(), key=lambda kv: -kv[1]):
            lines.append(
                f"| {server} | {v:.1f} | {1000 / v:.1f} |" if v else f"| {server} | - | - |"
            )
    roof = results.get("roofline")
    if roof and a.get("roofline_achieved_gflops") is not None:
        lines += [
            "",
            "## Roofline (base-only decoding against this CPU's GEMM rate)",
            "",
            f"{roof['params'] / 1e6:.1f} M parameters: {roof['flops_per_token'] / 1e9:.3f} GFLOP "
            f"per output token. Our base-only throughput reaches "
            f"{a['roofline_achieved_gflops']:.1f} GFLOP/s.",
            "",
            "| GEMM | threads | torch GEMM GFLOP/s (M,K,N) | share reached by decoding |",
            "|---|---|---|---|",
        ]
        for r in roof["rates"]:
            share = a["roofline_fraction"].get(f"{r['dtype']}/{r['threads']}t")
            lines.append(
                f"| {r['dtype']} | {r['threads']} | {r['gflops']:.1f} {tuple(r['shape'])} | "
                f"{_f(100 * share if share is not None else None)} % |"
            )
    return lines


def write_report(results: BenchResults | dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>_*.png`` into ``out_dir`` (from the typed
    results of a run, or from their JSON form as a results file holds them)."""
    if isinstance(results, BenchResults):
        results = asdict(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results["name"]
    plots = {}
    if any(x["scenario"] == "base-rate" for x in results["loads"]):
        plots["latency_vs_load"] = plot_latency_vs_load(
            results, out_dir / f"{name}_latency_vs_load.png"
        )
    plots |= {
        "throughput_vs_adapters": plot_throughput_vs_adapters(
            results, out_dir / f"{name}_throughput_vs_adapters.png"
        ),
        "memory": plot_memory(results, out_dir / f"{name}_memory.png"),
        "hot_swap": plot_hot_swap(results, out_dir / f"{name}_hot_swap.png"),
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown(results, {k: p.name for k, p in plots.items()}))
    return {"json": json_path, "markdown": md_path, **plots}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tenantlora bench report`."""
    parser.add_argument("results", help="A results JSON written by `tenantlora bench run`")
    parser.add_argument("--note", action="append", default=[], help="Add a note (repeatable)")


def cli(args: argparse.Namespace) -> int:
    """Rewrite a results file's report, with the notes added."""
    path = Path(args.results)
    results = json.loads(path.read_text())
    results["notes"] = [*results.get("notes", []), *args.note]
    for kind, out in write_report(results, path.parent).items():
        print(f"{kind}: {out}")
    return 0
