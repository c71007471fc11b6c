"""Check that a PEFT LoRA adapter fits the served base model before it is stored or loaded.

The base model is described by the names and shapes of its weights, read from the safetensors
headers of its checkpoint (no weights are loaded). Every LoRA tensor must sit on a module that
exists in the base, with `lora_A` of shape (r, in_features) and `lora_B` of shape
(out_features, r) matching that module's (out_features, in_features) weight."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE
from adapters.errors import InvalidAdapter

# Projections vLLM's LoRA layers handle for decoder-only transformers (packed into qkv_proj and
# gate_up_proj inside the engine). Embeddings and lm_head are not accepted.
SUPPORTED_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True)
class BaseModelSpec:
    """Names and shapes of the base model's weights."""

    name: str
    shapes: dict[str, tuple[int, ...]] = field(repr=False)

    @classmethod
    def from_checkpoint(cls, name: str, folder: Path) -> BaseModelSpec:
        from safetensors import safe_open

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {folder}")
        shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        return cls(name=name, shapes=shapes)

    def linear_shape(self, module: str) -> tuple[int, int] | None:
        shape = self.shapes.get(f"{module}.weight")
        if shape is None or len(shape) != 2:
            return None
        return shape[0], shape[1]


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name: str | None
    num_tensors: int


def _load_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is missing", "missing_file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", "invalid_config") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", "invalid_config")
    return config


def _check_config(config: dict, max_rank: int) -> tuple[int, float, tuple[str, ...]]:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"adapter_config.json has peft_type {config.get('peft_type')!r}; only LORA adapters "
            "are served",
            "not_a_lora_adapter",
        )
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(
            f"adapter rank r={rank!r} must be a positive integer", "invalid_config"
        )
    if rank > max_rank:
        raise InvalidAdapter(
            f"adapter rank {rank} exceeds this server's max_lora_rank {max_rank}", "rank_too_large"
        )
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters are not supported by the engine", "unsupported_adapter")
    if config.get("modules_to_save"):
        raise InvalidAdapter(
            "modules_to_save (fully trained extra modules) are not supported by the engine",
            "unsupported_adapter",
        )
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(
            "LoRA bias training is not supported by the engine", "unsupported_adapter"
        )
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapter(f"lora_alpha={alpha!r} must be a number", "invalid_config")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise InvalidAdapter(
            "target_modules as a regular expression is not accepted; list the module names",
            "unsupported_target_modules",
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter("target_modules must be a non-empty list of names", "invalid_config")
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - SUPPORTED_TARGET_MODULES)
    if unsupported:
        raise InvalidAdapter(
            f"target modules {unsupported} are not supported by the engine "
            f"(supported: {sorted(SUPPORTED_TARGET_MODULES)})",
            "unsupported_target_modules",
        )
    return rank, float(alpha), tuple(sorted(set(targets)))


def _check_weights(folder: Path, base: BaseModelSpec, rank: int) -> int:
    import torch
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing", "missing_file")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                match = _LORA_KEY.match(key)
                if match is None:
                    raise InvalidAdapter(
                        f"tensor {key!r} is not a LoRA weight (expected "
                        "base_model.model.<module>.lora_A/lora_B.weight)",
                        "unexpected_tensor",
                    )
                tensor = fh.get_tensor(key)
                if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                    raise InvalidAdapter(
                        f"tensor {key!r} holds non-finite values", "corrupt_weights"
                    )
                pairs.setdefault(match["module"], {})[match["ab"]] = tuple(tensor.shape)
    except SafetensorError as exc:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}", "corrupt_weights"
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} could not be read: {exc}", "corrupt_weights") from exc
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors", "corrupt_weights")
    for module, ab in sorted(pairs.items()):
        base_shape = base.linear_shape(module)
        if base_shape is None:
            raise InvalidAdapter(
                f"module {module!r} does not exist in base model {base.name}: the adapter was "
                "trained for another base model",
                "base_model_mismatch",
            )
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"module {module!r} lacks lora_A or lora_B", "corrupt_weights")
        out_features, in_features = base_shape
        want_a, want_b = (rank, in_features), (out_features, rank)
        if ab["A"] != want_a or ab["B"] != want_b:
            raise InvalidAdapter(
                f"module {module!r}: lora_A {list(ab['A'])} / lora_B {list(ab['B'])} do not fit "
                f"base model {base.name} (expected {list(want_a)} / {list(want_b)} for rank "
                f"{rank}): the adapter was trained for another base model",
                "base_model_mismatch",
            )
    return len(keys)


def validate_adapter(folder: Path, base: BaseModelSpec, max_rank: int) -> AdapterInfo:
    """Raise InvalidAdapter naming the problem, or describe the adapter."""
    config = _load_config(folder)
    rank, alpha, targets = _check_config(config, max_rank)
    num = _check_weights(folder, base, rank)
    if math.isnan(alpha):
        raise InvalidAdapter("lora_alpha is NaN", "invalid_config")
    return AdapterInfo(
        rank=rank,
        alpha=alpha,
        target_modules=targets,
        base_model_name=config.get("base_model_name_or_path"),
        num_tensors=num,
    )
