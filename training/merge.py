"""Merge a LoRA adapter into its base: a full model that serves without LoRA support.

The merge is checked, not assumed: on a fixed set of chat prompts the logits of the saved merged
checkpoint are compared with base + adapter computed unmerged by PEFT, both in fp32.
- fp32 merged weights (the default): max |logit difference| <= FP32_TOLERANCE, else MergeError.
- bf16 merged weights: measured and reported, not guaranteed. Rounding W + BA to bf16 drops
  every part of a small LoRA update below half a bf16 ulp of W (measured here: max |logit diff|
  4.4, greedy-token agreement 95 % after a 20-step adapter), which is why fp32 is the default.
  `update_retained` says how much of the adapter's effect on the logits survived
  (1 - mean|merged - reference| / mean|base - reference|).

`fmt="gguf"` also writes `<out>/model-<gguf_dtype>.gguf` (training/gguf_export.py) from the
float32 merge and checks it the same way: loaded back with transformers' GGUF loader, its logits
must match base + adapter within GGUF_TOLERANCES (max |logit diff| over every position; f32: 1e-3,
as the checkpoint; f16: rounding the weights to half precision moves the logits, measured 0.06 for
a trained and a random adapter, so 0.25), and every prompt's next token (the greedy token after the
chat prompt) must be the reference's. Top-1 agreement over all positions is reported, not required:
inside a prompt a trained adapter leaves near-ties that a 0.06 shift flips (measured 97.5 % in f16).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-3
FORMATS = ("hf", "gguf")
# GGUF dtype -> max |logit diff| allowed against base + adapter (fp32, unmerged)
GGUF_TOLERANCES = {"f32": FP32_TOLERANCE, "f16": 0.25}
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Classify the support ticket: my card was charged twice.",
    "Rewrite in capitals: hello world",
    "How much does the Zorvex K3 drone cost?",
)


class MergeError(RuntimeError):
    pass


@dataclass
class MergeReport:
    adapter: str
    base: str
    out: str
    dtype: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    update_retained: float
    tolerance: float | None
    positions: int
    passed: bool
    artifact_bytes: int
    gguf: dict | None = None  # GGUFCheck, with format="gguf"


@dataclass
class GGUFCheck:
    file: str
    dtype: str
    bytes: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float  # over all positions: reported
    next_token_agreement: float  # at each prompt's end: must be 1.0
    tolerance: float
    passed: bool


def _adapter_base(adapter: Path, base: str | None) -> Path:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    if base is None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise MergeError(f"{adapter}/adapter_config.json names no base model; pass --base")
    return resolve_base_model(base, Settings().models_dir)


def logits(model, batches) -> list:
    import torch

    with torch.no_grad():
        return [model(**b).logits.float() for b in batches]


def check_batches(tokenizer) -> list:
    """CHECK_PROMPTS as chat-templated model inputs, one batch of one per prompt."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        for p in CHECK_PROMPTS
    ]


def _compare(got: list, reference: list) -> tuple[float, float, float, int]:
    """max |diff|, mean |diff| (per position), top-1 agreement, positions."""
    diffs = [(g - r).abs() for g, r in zip(got, reference, strict=True)]
    positions = sum(d.shape[1] for d in diffs)
    mean_diff = sum(float(d.mean()) * d.shape[1] for d in diffs) / positions
    same = sum(
        int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference, strict=True)
    )
    return max(float(d.max()) for d in diffs), mean_diff, same / positions, positions


def gguf_logits(gguf_file: Path, batches: list) -> list:
    """Logits of `gguf_file` loaded with transformers' GGUF loader (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file = Path(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    return logits(model, batches)


def check_gguf(gguf_file: Path, got: list, reference: list, dtype: str) -> GGUFCheck:
    """Judge the GGUF's logits `got` against `reference` with the tolerance for `dtype`."""
    gguf_file = Path(gguf_file)
    max_diff, mean_diff, agree, _ = _compare(got, reference)
    same_next = [
        int(g[0, -1].argmax() == r[0, -1].argmax()) for g, r in zip(got, reference, strict=True)
    ]
    next_agree = sum(same_next) / len(same_next)
    tolerance = GGUF_TOLERANCES[dtype]
    return GGUFCheck(
        file=str(gguf_file),
        dtype=dtype,
        bytes=gguf_file.stat().st_size,
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=mean_diff,
        top1_agreement=agree,
        next_token_agreement=next_agree,
        tolerance=tolerance,
        passed=max_diff <= tolerance and next_agree == 1.0,
    )


def merge(
    adapter: Path,
    out: Path,
    base: str | None = None,
    dtype: str = "float32",
    check: bool = True,
    fmt: str = "hf",
    gguf_dtype: str = "f16",
) -> MergeReport:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.report import artifact_bytes

    adapter, out = Path(adapter), Path(out)
    if fmt not in FORMATS:
        raise MergeError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "gguf" and (dtype != "float32" or gguf_dtype not in GGUF_TOLERANCES):
        raise MergeError(
            f"--format gguf writes {sorted(GGUF_TOLERANCES)} from the float32 merge "
            f"(got --dtype {dtype}, --gguf-dtype {gguf_dtype})"
        )
    base_path = _adapter_base(adapter, base)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    batches = check_batches(tokenizer)
    reference = base_logits = None
    if check:
        reference = logits(model, batches)
        with model.disable_adapter():
            base_logits = logits(model, batches)

    merged = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if (base_path / "generation_config.json").is_file():
        shutil.copy(base_path / "generation_config.json", tmp / "generation_config.json")

    max_diff = mean_diff = 0.0
    agree, positions, retained = 1.0, 0, 1.0
    tolerance = FP32_TOLERANCE if dtype == "float32" else None
    passed = True
    if check:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        got = logits(reloaded, batches)
        del reloaded
        max_diff, mean_diff, agree, positions = _compare(got, reference)
        shift = sum(
            float((b - r).abs().mean()) for b, r in zip(base_logits, reference, strict=True)
        )
        off = sum(float((g - r).abs().mean()) for g, r in zip(got, reference, strict=True))
        retained = 1.0 - off / shift if shift > 0 else 1.0
        passed = tolerance is None or max_diff <= tolerance
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = artifact_bytes(out)  # the checkpoint, without the GGUF beside it
    gguf = None
    if fmt == "gguf" and passed:
        from training.gguf_export import write_gguf

        del merged, model
        gguf_file = write_gguf(out, out / f"model-{gguf_dtype}.gguf", gguf_dtype)
        if check:
            got = gguf_logits(gguf_file, batches)
            gguf = check_gguf(gguf_file, got, reference, gguf_dtype)
            passed = gguf.passed
    report = MergeReport(
        adapter=str(adapter),
        base=str(base_path),
        out=str(out),
        dtype=dtype,
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=mean_diff,
        top1_agreement=agree,
        update_retained=retained,
        tolerance=tolerance,
        positions=positions,
        passed=passed,
        artifact_bytes=size,
        gguf=asdict(gguf) if gguf else None,
    )
    (out / "merge_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    if gguf is not None and not gguf.passed:
        raise MergeError(
            f"GGUF ({gguf_dtype}) disagrees with base + adapter: max |logit diff| "
            f"{gguf.max_abs_logit_diff:.4g} (tolerance {gguf.tolerance}), next-token agreement "
            f"{gguf.next_token_agreement:.2f} (must be 1); see {out}/merge_report.json"
        )
    if not passed:
        raise MergeError(
            f"merged model disagrees with base + adapter: max |logit diff| {max_diff:.4g} "
            f"(tolerance {tolerance}), top-1 agreement {agree:.3f}; see {out}/merge_report.json"
        )
    log.info(
        "merged %s into %s (%s): max |logit diff| %.3g, top-1 agreement %.3f, update retained %.3f",
        adapter, out, dtype, max_diff, agree, retained,
    )  # fmt: skip
    if check and tolerance is None:
        log.warning(
            "bf16 merge: rounding drops part of the adapter's update, so it is not equivalent to "
            "base + adapter (see merge_report.json); the default float32 merge is exact"
        )
    return report
