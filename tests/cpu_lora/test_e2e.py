"""End to end: greedy outputs of a real vLLM engine with the CPU LoRA plugin on (the model
compiled with torch.compile) equal those with it off (eager, vLLM's own LoRA ops), for one mixed
batch (base-model requests and three adapters in one generate call, prefill and decode), except
at an exact near-tie (checked with the log-probabilities; see the test), in the dtype the server
picks on this machine, and with bf16 adapter storage under a float32 model (``lora_dtype``). Each
engine runs in its own subprocess, since the plugin is chosen per process by
TENANTLORA_CPU_LORA_OPS. Three engine start-ups (four where the server's dtype is bf16): 2-5
minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from support import tie_logprob_gap  # noqa: E402

from serving.hardware import resolve_dtype  # noqa: E402

DTYPE = resolve_dtype("auto", gpu=False)  # what the server runs on this CPU

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from adapters.targets import LORA_TARGET_MODULES

if __name__ == "__main__":
    model, adapters, dtype, lora_dtype = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:5]
    # max_loras == number of adapters: every slot is taken, so the base requests' tokens (slot -1)
    # meet a non-empty last slot as well.
    llm = LLM(model=model, enable_lora=True, max_loras=len(adapters), max_lora_rank=16,
              max_model_len=256, dtype=dtype, lora_dtype=lora_dtype, seed=0,
              lora_target_modules=list(LORA_TARGET_MODULES))
    prompts = ["The capital of France is", "Write a haiku about the sea.",
               "List three prime numbers:", "Once upon a time, in a small village,",
               "Explain what a LoRA adapter is.", "2 + 2 =", "The best way to learn is",
               "Translate 'good morning' to Spanish:"]
    loras = [None] + [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
    reqs = [loras[i % len(loras)] for i in range(len(prompts))]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, sp, lora_request=reqs)
    mixed = [list(o.outputs[0].token_ids) for o in outs]
    top2 = [[{str(t): lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs]
            for o in outs]
    base = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp)]
    print("RESULT " + json.dumps({"mixed": mixed, "top2": top2, "base": base}))
"""


def _run(
    ops: str, base_model: Path, adapters: list[str], dtype: str = DTYPE, lora_dtype: str = "auto"
) -> dict:
    env = dict(os.environ, TENANTLORA_CPU_LORA_OPS=ops, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base_model), json.dumps(adapters), dtype, lora_dtype],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["log"] = proc.stdout + proc.stderr
    return result


@pytest.fixture(scope="module")
def plugin_off(base_model_path: Path, adapter_dirs) -> Callable[[str], dict]:
    """vLLM's own LoRA ops (eager), by model dtype, run once each."""
    adapters = [str(adapter_dirs[name]) for name in "abc"]
    runs: dict[str, dict] = {}

    def get(dtype: str) -> dict:
        if dtype not in runs:
            runs[dtype] = _run("0", base_model_path, adapters, dtype)
        return runs[dtype]

    return get


def _assert_same_greedy(on: dict, off: dict, dtype: str) -> None:
    """The plugin's greedy outputs equal vLLM's own except at a near-tie, and each run used the
    ops it should."""
    for i, (a, b) in enumerate(zip(on["mixed"], off["mixed"], strict=True)):
        if a == b:
            continue
        # Allowed only at a tie: the grouped ops' float32 sums run in another order than the
        # reference's (1 bf16 ulp, see test_ops.py), which can flip an argmax between two tokens
        # whose log-probabilities agree to within that noise. The model computes its logits in
        # bf16, where one step at |logit| in [16, 32) is 0.125: a smaller gap is a tie at the
        # precision of the model itself. (Seen in bf16: prompt 3 diverges at token 8 with a
        # 0.0625 gap; the other 7 prompts are identical.) In float32 the sums agree to ~1e-6, so
        # only a gap below 1e-3 counts as a tie. Report it so a real bug can't hide.
        p = next(j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        off_top = off["top2"][i][p]
        gap = abs(off_top.get(str(b[p]), 0.0) - off_top.get(str(a[p]), float("-inf")))
        print(f"prompt {i}: on/off diverge at token {p}, log-prob gap there {gap:.4f}")
        tie = tie_logprob_gap(dtype)
        assert p > 0 and gap <= tie, f"prompt {i}: on {a} vs off {b} (gap {gap})"
    assert sum(a != b for a, b in zip(on["mixed"], off["mixed"], strict=True)) <= 1
    assert "Using GroupedPunicaWrapperCPU" in on["log"]
    assert "Using PunicaWrapperCPU" in off["log"]
    assert "tenantlora CPU LoRA ops: on" in on["log"]
    assert "tenantlora CPU LoRA ops: off" in off["log"]
    # With the plugin the model is compiled with LoRA on (vLLM alone runs it eagerly).
    assert "compilation mode DYNAMO_TRACE_ONCE kept with LoRA on" in on["log"]
    assert "kept with LoRA on" not in off["log"]


@pytest.mark.engine
def test_plugin_on_equals_off_for_a_mixed_batch(base_model_path: Path, adapter_dirs, plugin_off):
    adapters = [str(adapter_dirs[name]) for name in "abc"]
    on = _run("1", base_model_path, adapters)
    _assert_same_greedy(on, plugin_off(DTYPE), DTYPE)
    # Sanity: the adapters change outputs (most of the adapter prompts differ from the base), and
    # the base requests in the mixed batch start like the base alone (a batch of another size may
    # round differently later on, with or without the plugin).
    n = len(on["base"])
    assert sum(on["mixed"][i] != on["base"][i] for i in range(n) if i % 4) >= 3
    assert all(on["mixed"][i][:4] == on["base"][i][:4] for i in range(0, n, 4))


@pytest.mark.engine
def test_bf16_adapter_weights_under_a_float32_model(
    base_model_path: Path, adapter_dirs, plugin_off
):
    """``lora_dtype=bfloat16`` on a float32 model (the benchmark's setting on AVX2 CPUs): the
    kernel reads bf16 weights with float32 activations. The test adapters are bf16-exact, so the
    answers must be vLLM's own with float32 adapter storage, up to float32 near-ties."""
    adapters = [str(adapter_dirs[name]) for name in "abc"]
    on = _run("1", base_model_path, adapters, "float32", "bfloat16")
    _assert_same_greedy(on, plugin_off("float32"), "float32")
