"""Merge a LoRA adapter into its base: a full model that serves without LoRA support.

The merge is checked, not assumed: on a fixed set of chat prompts the logits of the saved merged
checkpoint are compared with base + adapter computed unmerged by PEFT, both in fp32.
- fp32 merged weights (the default): max |logit difference| <= FP32_TOLERANCE, else MergeError.
- bf16 merged weights: measured and reported, not guaranteed. Rounding W + BA to bf16 drops
  every part of a small LoRA update below half a bf16 ulp of W (measured here: max |logit diff|
  4.4, greedy-token agreement 95 % after a 20-step adapter), which is why fp32 is the default.
  `update_retained` says how much of the adapter's effect on the logits survived
  (1 - mean|merged - reference| / mean|base - reference|).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-3
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


def _adapter_base(adapter: Path, base: str | None) -> Path:
    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    if base is None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise MergeError(f"{adapter}/adapter_config.json names no base model; pass --base")
    return resolve_base_model(base, Settings().models_dir)


def _logits(model, batches) -> list:
    import torch

    with torch.no_grad():
        return [model(**b).logits.float() for b in batches]


def merge(
    adapter: Path, out: Path, base: str | None = None, dtype: str = "float32", check: bool = True
) -> MergeReport:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.report import artifact_bytes

    adapter, out = Path(adapter), Path(out)
    base_path = _adapter_base(adapter, base)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    batches = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        for p in CHECK_PROMPTS
    ]
    reference = base_logits = None
    if check:
        reference = _logits(model, batches)
        with model.disable_adapter():
            base_logits = _logits(model, batches)

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
        got = _logits(reloaded, batches)
        diffs = [(g - r).abs() for g, r in zip(got, reference, strict=True)]
        max_diff = max(float(d.max()) for d in diffs)
        positions = sum(d.shape[1] for d in diffs)
        mean_diff = sum(float(d.mean()) * d.shape[1] for d in diffs) / positions
        agree = (
            sum(
                int((g.argmax(-1) == r.argmax(-1)).sum())
                for g, r in zip(got, reference, strict=True)
            )
            / positions
        )
        shift = sum(
            float((b - r).abs().mean()) for b, r in zip(base_logits, reference, strict=True)
        )
        off = sum(float(d.mean()) for d in diffs)
        retained = 1.0 - off / shift if shift > 0 else 1.0
        passed = tolerance is None or max_diff <= tolerance
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
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
        artifact_bytes=artifact_bytes(out),
    )
    (out / "merge_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
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
