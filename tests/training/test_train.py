"""Real training on the real base model, on the CPU: a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.config import TrainConfig
from training.evaluate import EngineSpec, Run, run_engine_subprocess
from training.report import TrainingReport


def test_lora_steps_lower_the_loss_and_write_the_report(lora_run) -> None:
    out, report = lora_run
    assert report.train_loss_final < report.train_loss_first
    assert report.eval_loss_final < report.eval_loss_before
    assert 0 < report.trainable_share < 0.02  # r=8 on all projections: about 1.8 %
    assert (out / "adapter_model.safetensors").is_file()
    on_disk = json.loads((out / "training_report.json").read_text())
    for key in (
        "method",
        "trainable_params",
        "trainable_share",
        "wall_time_s",
        "tokens_per_s",
        "peak_memory_bytes",
        "artifact_bytes",
        "train_loss_final",
        "eval_loss_final",
        "device",
    ):
        assert on_disk[key] is not None, key
    assert on_disk["method"] == "lora" and on_disk["steps"] == 8
    assert report.tokens_per_s > 0 and report.peak_memory_bytes > 100 * 2**20
    assert 1 * 2**20 < report.artifact_bytes < 20 * 2**20  # adapter only, not the base


def test_short_full_fine_tune_checkpoint_serves(
    tmp_path: Path, base_model_dir, intent_data
) -> None:
    from training.trainer import train

    train_path, eval_path = intent_data
    out = tmp_path / "full"
    report = train(
        TrainConfig(
            method="full",
            base=str(base_model_dir),
            data=train_path,
            out=out,
            max_steps=2,
            batch_size=2,
            max_length=96,
            logging_steps=1,
        )
    )
    assert report.trainable_share == 1.0 and report.steps == 2
    assert report.config["learning_rate"] == 1e-5
    assert TrainingReport.read(out / "training_report.json").method == "full"
    # The update survives saving: float32, and most weights differ from the base. (A bf16 save
    # rounds updates of ~lr back to the base's values: that lost whole fine-tunes once.)
    from safetensors import safe_open

    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(out / "model.safetensors", "pt") as tuned:
        w = tuned.get_tensor(name)
    with safe_open(base_model_dir / "model.safetensors", "pt") as base:
        w0 = base.get_tensor(name).float()
    assert w.dtype == torch.float32
    assert (w != w0).float().mean() > 0.5
    # The checkpoint serves in vLLM (own engine, own process: vLLM spawns workers).
    cells = run_engine_subprocess(
        EngineSpec(
            model=str(out),
            runs=[Run("full", "intent", str(eval_path), "intent")],
            enforce_eager=True,
            kv_cache_gib=0.5,
            max_num_seqs=8,
        )
    )
    assert cells[0].n == 8
    assert all(sample["output"].strip() for sample in cells[0].samples)
