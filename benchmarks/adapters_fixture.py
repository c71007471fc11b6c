"""Benchmark fixtures: random-but-nonzero PEFT LoRA adapters and merged full models, cached in a
work directory so repeated runs reuse them.

Adapters are real PEFT checkpoints (r=16, alpha=32, all seven projections of a Llama block) whose
``lora_A``/``lora_B`` hold small random values, so every adapter changes the model's outputs and
costs the engine the same as a trained one. Merged models are ``merge_and_unload()`` of one of them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from adapters.targets import LORA_TARGET_MODULES

log = logging.getLogger(__name__)


def _marker(path: Path) -> Path:
    # Beside the folder, not in it: servers validate adapter folders strictly.
    return path.with_name(path.name + ".fixture.json")


def _is_complete(path: Path, kind: str) -> bool:
    marker = _marker(path)
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == kind
    except (OSError, ValueError):
        return False


def _write_marker(path: Path, **info: object) -> None:
    _marker(path).write_text(json.dumps(info, indent=1))


def _load_base(base_model: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)


def adapter_name(index: int) -> str:
    """Name of the index-th benchmark adapter (also its tenant's adapter name on the server)."""
    return f"lora{index:03d}"


def make_adapters(
    base_model: str,
    work_dir: Path,
    count: int,
    rank: int = 16,
    alpha: int = 32,
    scale: float = 0.02,
) -> dict[str, Path]:
    """Create (or reuse) ``count`` random PEFT adapters under ``work_dir/adapters``.

    Returns name -> adapter directory. Adapter ``i`` is seeded with ``i`` so a cache is stable.
    """
    root = Path(work_dir) / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    names = {adapter_name(i): root / adapter_name(i) for i in range(count)}
    missing = [n for n, p in names.items() if not _is_complete(p, f"adapter-r{rank}")]
    if not missing:
        return names

    import torch
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    base = _load_base(base_model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(LORA_TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config, autocast_adapter_dtype=False)  # bf16, ~10 MB
    lora_params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    for k, name in enumerate(missing):
        index = int(name.removeprefix("lora"))
        gen = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, param in lora_params:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * scale
                param.copy_(noise.to(param.dtype))
        out = names[name]
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(str(out))
        _write_marker(out, kind=f"adapter-r{rank}", seed=index, base_model=str(base_model))
        if (k + 1) % 16 == 0 or k + 1 == len(missing):
            log.info("adapters: %d/%d written", k + 1, len(missing))
    log.info("made %d adapters in %.1fs", len(missing), time.perf_counter() - t0)
    return names


def make_merged_models(
    base_model: str, work_dir: Path, adapters: dict[str, Path], count: int
) -> dict[str, Path]:
    """Create (or reuse) merged full models for the first ``count`` adapters.

    Returns tenant/adapter name -> merged checkpoint directory (weights + tokenizer).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    root = Path(work_dir) / "merged"
    root.mkdir(parents=True, exist_ok=True)
    chosen = list(adapters.items())[:count]
    result: dict[str, Path] = {}
    tokenizer = None
    for name, adapter_dir in chosen:
        out = root / name
        result[name] = out
        if _is_complete(out, "merged"):
            continue
        t0 = time.perf_counter()
        base = _load_base(base_model)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        if out.exists():
            shutil.rmtree(out)
        merged.save_pretrained(str(out))
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model)
        tokenizer.save_pretrained(str(out))
        _write_marker(out, kind="merged", adapter=str(adapter_dir), base_model=str(base_model))
        log.info("merged model %s written in %.1fs", name, time.perf_counter() - t0)
    return result


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
