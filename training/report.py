"""`training_report.json`: what a run cost and what it reached."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Files that are bookkeeping, not part of the servable artifact.
NOT_ARTIFACT = {"training_report.json", "merge_report.json", "README.md"}


@dataclass
class TrainingReport:
    method: str
    base: str
    data: str
    eval_data: str | None
    trainable_params: int
    total_params: int
    trainable_share: float
    steps: int
    examples_seen: int
    train_tokens: int  # non-padding tokens through the model during training
    wall_time_s: float  # the training loop (model loading and evaluation excluded)
    tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "process_max_rss" (CPU) or "gpu_max_allocated"
    artifact_bytes: int
    train_loss_first: float | None
    train_loss_final: float | None
    train_loss_mean: float
    eval_loss_before: float | None
    eval_loss_final: float | None
    device: str
    torch_threads: int
    config: dict = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> TrainingReport:
        return cls(**json.loads(Path(path).read_text()))


def peak_memory_bytes() -> int:
    """Peak allocated GPU memory on a GPU, else this process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def artifact_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in Path(folder).rglob("*")
        if p.is_file() and p.name not in NOT_ARTIFACT
    )


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    from serving.hardware import cpu_model_name

    return f"cpu: {cpu_model_name()}, {os.cpu_count()} cores"
