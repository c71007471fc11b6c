"""Shared, session-scoped training runs: one short LoRA run on the real base model, reused by the
loss, serving and merge tests (training it once keeps CI cheap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig
from training.report import TrainingReport
from training.tasks import generate, write_jsonl


@pytest.fixture(scope="session")
def base_model_dir(base_model_path: Path) -> Path:
    """The embedded base, prepared once by the root conftest (the same one the server serves)."""
    return base_model_path


@pytest.fixture(scope="session")
def intent_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("intent-data")
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    write_jsonl(train, generate("intent", "train", 48, seed=0))
    write_jsonl(held_out, generate("intent", "eval", 8, seed=0))
    return train, held_out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, base_model_dir, intent_data) -> tuple[Path, TrainingReport]:
    """8 LoRA steps on the intent task: enough to move the greedy output to the label format."""
    from training.trainer import train

    train_path, eval_path = intent_data
    out = tmp_path_factory.mktemp("lora") / "adapter"
    cfg = TrainConfig(
        method="lora",
        base=str(base_model_dir),
        data=train_path,
        eval_data=eval_path,
        out=out,
        learning_rate=1e-3,
        max_steps=8,
        batch_size=4,
        max_length=128,
        logging_steps=1,
    )
    return out, train(cfg)
