"""The merged model's logits match base + adapter (PEFT, unmerged) within the stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path

from training.merge import FP32_TOLERANCE, merge


def test_merge_matches_base_plus_adapter_within_tolerance(lora_run, tmp_path: Path) -> None:
    adapter, _ = lora_run
    report = merge(adapter, tmp_path / "merged")  # float32: the exact, checked merge
    assert report.passed and report.dtype == "float32"
    assert report.max_abs_logit_diff <= FP32_TOLERANCE
    assert report.top1_agreement == 1.0
    assert report.update_retained > 0.99
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["max_abs_logit_diff"] == report.max_abs_logit_diff
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_bf16_merge_is_measured_and_lossy(lora_run, tmp_path: Path) -> None:
    """Rounding W + BA to bf16 drops part of a small update: the report says how much."""
    adapter, _ = lora_run
    report = merge(adapter, tmp_path / "merged16", dtype="bfloat16")
    assert report.tolerance is None
    assert 0.0 < report.update_retained < 1.0
    assert report.max_abs_logit_diff > FP32_TOLERANCE
    assert report.artifact_bytes < 300 * 2**20  # half the fp32 checkpoint
