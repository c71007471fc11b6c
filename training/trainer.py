"""LoRA, QLoRA and full fine-tuning with TRL's SFTTrainer, one function per stage.

Stages: resolve the base model -> load and validate the data -> load the model for the method ->
build the trainer -> train (and measure) -> save the artifact -> write `training_report.json`.
The loss is on the completion only (TRL's prompt/completion form), so the model learns the
answers, not the prompts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig
from training.data import load_jsonl
from training.report import TrainingReport, artifact_bytes, device_name, peak_memory_bytes

log = logging.getLogger(__name__)
REPORT_FILE = "training_report.json"


class TrainingError(RuntimeError):
    """A run cannot start on this machine; the message says why."""


@dataclass
class Loaded:
    model: object
    tokenizer: object
    trainable: int
    total: int


def load_datasets(cfg: TrainConfig):
    """Validated records as HF datasets in conversational prompt/completion form."""
    from datasets import Dataset

    train = Dataset.from_list([e.to_trl() for e in load_jsonl(cfg.data)])
    evaluation = None
    if cfg.eval_data is not None:
        evaluation = Dataset.from_list([e.to_trl() for e in load_jsonl(cfg.eval_data)])
    return train, evaluation


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_qlora_supported() -> None:
    """QLoRA needs bitsandbytes' NF4 kernels. They run on CUDA; on a CPU bitsandbytes 0.50 has
    a working but slow fallback (measured here: about 20x a LoRA step on SmolLM2-135M)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # import can fail with OSError/RuntimeError on odd builds
        raise TrainingError(
            f"QLoRA needs bitsandbytes with NF4 support, which does not import here: {exc}. "
            "Install bitsandbytes (pip install bitsandbytes) or use --method lora."
        ) from exc
    if not _on_gpu():
        log.warning(
            "QLoRA on a CPU: bitsandbytes runs NF4 through its slow CPU fallback; expect steps "
            "an order of magnitude slower than LoRA. QLoRA saves memory on a GPU, not here."
        )


def _count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_model(cfg: TrainConfig, base: Path) -> Loaded:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    gpu = _on_gpu()
    # fp32 master weights on a CPU (bf16 autocast training on CPU is not faster here); bf16 on GPU.
    dtype = torch.bfloat16 if gpu else torch.float32
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        check_qlora_supported()
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            base,
            quantization_config=quant,
            dtype=dtype,
            device_map={"": 0 if gpu else "cpu"},
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
        # The real parameter count: a packed NF4 tensor holds two weights per element.
        _, packed_total = _count(model)
        total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
        del packed_total
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        total = None
    if cfg.uses_adapter:
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable, counted = _count(model)
    return Loaded(model, tokenizer, trainable, total + trainable if total else counted)


def build_trainer(cfg: TrainConfig, loaded: Loaded, train, evaluation):
    from trl import SFTConfig, SFTTrainer

    gpu = _on_gpu()
    args = SFTConfig(
        output_dir=str(cfg.out / "_trainer"),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        completion_only_loss=True,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="no",  # evaluated explicitly before and after training
        save_strategy="no",
        report_to="none",
        bf16=gpu,
        use_cpu=not gpu,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    return SFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=loaded.tokenizer,
    )


def save_artifact(cfg: TrainConfig, loaded: Loaded, base: Path) -> None:
    """Adapters: PEFT's adapter folder (vLLM and the server load it as is). Full: a complete
    checkpoint in `save_dtype` with the tokenizer and chat template, servable like the base."""
    import shutil

    import torch

    cfg.out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    if cfg.uses_adapter:
        model.save_pretrained(cfg.out)
        # Adapters are used with the base's tokenizer; record where the base was.
        config_path = cfg.out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(base)
        config_path.write_text(json.dumps(config, indent=2))
    else:
        model.to(getattr(torch, cfg.save_dtype)).save_pretrained(cfg.out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(cfg.out)
        if (base / "generation_config.json").is_file():
            shutil.copy(base / "generation_config.json", cfg.out / "generation_config.json")
    shutil.rmtree(cfg.out / "_trainer", ignore_errors=True)


def train(cfg: TrainConfig) -> TrainingReport:
    """Run one training job end to end and return (and write) its report."""
    import torch
    from transformers import set_seed

    from serving.base_model import resolve_base_model
    from serving.settings import Settings

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_seed(cfg.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    base = resolve_base_model(cfg.base, Settings().models_dir)
    train_ds, eval_ds = load_datasets(cfg)
    loaded = load_model(cfg, base)
    log.info(
        "%s: %d trainable of %d parameters (%.3f%%)",
        cfg.method,
        loaded.trainable,
        loaded.total,
        100 * loaded.trainable / loaded.total,
    )
    trainer = build_trainer(cfg, loaded, train_ds, eval_ds)

    eval_before = (
        trainer.evaluate()["eval_loss"] if eval_ds is not None and cfg.eval_before else None
    )
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    eval_after = trainer.evaluate()["eval_loss"] if eval_ds is not None else None

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    save_artifact(cfg, loaded, base)
    report = TrainingReport(
        method=cfg.method,
        base=str(base),
        data=str(cfg.data),
        eval_data=str(cfg.eval_data) if cfg.eval_data else None,
        trainable_params=loaded.trainable,
        total_params=loaded.total,
        trainable_share=loaded.trainable / loaded.total,
        steps=trainer.state.global_step,
        examples_seen=trainer.state.global_step * cfg.batch_size * cfg.grad_accum,
        train_tokens=tokens,
        wall_time_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(),
        peak_memory_kind="gpu_max_allocated" if torch.cuda.is_available() else "process_max_rss",
        artifact_bytes=artifact_bytes(cfg.out),
        train_loss_first=losses[0] if losses else None,
        train_loss_final=losses[-1] if losses else None,
        train_loss_mean=float(result.training_loss),
        eval_loss_before=eval_before,
        eval_loss_final=eval_after,
        device=device_name(),
        torch_threads=torch.get_num_threads(),
        config=cfg.to_dict(),
    )
    report.write(cfg.out / REPORT_FILE)
    return report
