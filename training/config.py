"""One configuration dataclass for a training run, with per-method defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from adapters.targets import LORA_TARGET_MODULES

Method = Literal["lora", "qlora", "full"]
METHODS: tuple[str, ...] = ("lora", "qlora", "full")


# Learning rates: adapters train a small, zero-initialised update and take a large rate; full
# fine-tuning moves every pretrained weight and takes a small one.
# LoRA 3e-4: the recipe search's pick on intent and format (64 steps x 8; 2e-4 left intent at 84 %
# and format at 72 %, 6e-4 forgot 41-59 points of the general set): benchmarks/results/training_results.md
DEFAULT_LEARNING_RATE = {"lora": 3e-4, "qlora": 3e-4, "full": 1e-5}


@dataclass
class TrainConfig:
    method: Method
    base: str  # embedded spec, local checkpoint folder, or hub id (serving.base_model)
    data: Path  # training JSONL
    out: Path
    eval_data: Path | None = None  # held-out JSONL for eval loss
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATE[method]
    max_steps: int = 100
    epochs: float = 1.0  # used when max_steps <= 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    seed: int = 0
    gradient_checkpointing: bool = False
    logging_steps: int = 5
    eval_before: bool = True  # held-out loss before training too (costs one eval pass)
    # LoRA / QLoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    # full: the dtype the checkpoint is saved in (training itself runs in fp32). float32, because
    # rounding to bf16 erases updates below half a bf16 ulp of each weight: after 64 steps at
    # 1e-5 the bf16-saved checkpoints had lost the fine-tune (intent: held-out loss 0.07 in
    # training, greedy score 0 % served, against 84 % for LoRA).
    save_dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        self.data, self.out = Path(self.data), Path(self.out)
        if self.eval_data is not None:
            self.eval_data = Path(self.eval_data)
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE[self.method]
        self.target_modules = tuple(self.target_modules)

    @property
    def uses_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
