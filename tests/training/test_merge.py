"""The merged model's logits match base + adapter (PEFT, unmerged) within the stated tolerance."""

from __future__ import annotations

from pathlib import Path

from training.merge import BF16_MIN_TOP1, BF16_TOLERANCE, FP32_TOLERANCE, merge


def test_merge_fp32_matches_base_plus_adapter(lora_run, tmp_path: Path) -> None:
    adapter, _ = lora_run
    report = merge(adapter, tmp_path / "merged32", dtype="float32")
    assert report.passed
    assert report.max_abs_logit_diff <= FP32_TOLERANCE
    assert report.top1_agreement == 1.0
    assert (tmp_path / "merged32" / "model.safetensors").is_file()


def test_merge_bf16_within_tolerance(lora_run, tmp_path: Path) -> None:
    adapter, _ = lora_run
    report = merge(adapter, tmp_path / "merged16")  # bf16, the served dtype
    assert report.passed
    assert report.max_abs_logit_diff <= BF16_TOLERANCE
    assert report.top1_agreement >= BF16_MIN_TOP1
    assert report.artifact_bytes > 200 * 2**20  # a full model, unlike the adapter
