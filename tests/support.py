"""Helpers the tests share: random-but-real PEFT adapters and archives of them."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from adapters.targets import LORA_TARGET_MODULES

ALL_PROJECTIONS = list(LORA_TARGET_MODULES)


def make_random_adapters(
    base_path: Path,
    outs: dict[Path, int],
    rank: int = 8,
    targets: list[str] | None = None,
    scale: float = 0.5,
) -> list[Path]:
    """Save PEFT LoRA adapters for the base model with random, non-zero A and B matrices.

    PEFT initialises B to zero (a no-op adapter); we fill both from a seeded generator so each
    adapter changes the model's outputs, differently per seed. `outs` maps folder -> seed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets or ALL_PROJECTIONS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    for out, seed in outs.items():
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    noise = torch.randn(param.shape, generator=gen)
                    param.copy_(noise * scale / param.shape[-1] ** 0.5)
        peft_model.save_pretrained(out, safe_serialization=True)
    return list(outs)


def tar_gz_bytes(
    files: dict[str, bytes | Path], *, symlinks: dict[str, str] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes | Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            zf.writestr(name, data)
    return buf.getvalue()


def adapter_archive(folder: Path) -> bytes:
    return tar_gz_bytes(
        {
            "adapter_config.json": folder / "adapter_config.json",
            "adapter_model.safetensors": folder / "adapter_model.safetensors",
        }
    )
