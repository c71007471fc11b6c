"""Check that a PEFT LoRA adapter fits the served base model and loads in the engine.

The rule: an adapter this module accepts always loads in vLLM. `adapter_config.json` is read
against an allow-list of keys with types and ranges (anything else is refused with the key's
name), and the config that is stored is re-serialised from the validated fields only, so the
engine never reads a value we did not check (`rank_pattern` / `alpha_pattern` keys, which vLLM
runs as regular expressions, must be plain module names). Every tensor must be a LoRA A or B
matrix on one of the supported target modules (`adapters.targets`) that exists in the base
model, with the shape that module's weight and the adapter's rank imply, in a float dtype and
with finite values. The base model is described by the names and shapes of its projections,
computed from its config.json (`BaseModelSpec.from_config`), so a quantized base (packed
weights) validates like a full-precision one; the checkpoint's safetensors headers cross-check
the config where the weights are plain (no weights are loaded)."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE
from adapters.errors import InvalidAdapter
from adapters.targets import LORA_TARGET_MODULES

# Projections vLLM's LoRA layers handle for decoder-only transformers (packed into qkv_proj and
# gate_up_proj inside the engine). Embeddings and lm_head are not accepted.
SUPPORTED_TARGET_MODULES = frozenset(LORA_TARGET_MODULES)
MAX_LORA_ALPHA = 1e6
MAX_PATTERN_ENTRIES = 1024
MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 4 << 20
# Inits that only set the starting weights (vLLM's list): a saved adapter is a plain LoRA.
ENGINE_NEUTRAL_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
WEIGHT_DTYPES = frozenset({"F16", "BF16", "F32"})
# A plain (dotted) module name: no regular-expression syntax beyond the literal dot.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


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

    @classmethod
    def from_config(cls, name: str, folder: Path) -> BaseModelSpec:
        """Shapes of the seven projections (`adapters.targets`) of a Llama-style decoder,
        computed from `config.json` (hidden size, heads, kv heads, head dim, intermediate size,
        layers), so they hold for any checkpoint vLLM loads: a quantized one packs its weights
        (GPTQ/AWQ `qweight`, bitsandbytes, FP8 with scales), and its tensor shapes say nothing
        about what an adapter must fit. Raises ValueError when the config lacks a field."""
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config") or config  # multimodal wrappers nest the decoder
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            intermediate, layers = (
                int(config["intermediate_size"]),
                int(config["num_hidden_layers"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json of {name} lacks a decoder size field: {exc}") from exc
        per_layer = {
            "self_attn.q_proj": (heads * head_dim, hidden),
            "self_attn.k_proj": (kv_heads * head_dim, hidden),
            "self_attn.v_proj": (kv_heads * head_dim, hidden),
            "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (intermediate, hidden),
            "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate),
        }
        shapes = {
            f"model.layers.{i}.{module}.weight": shape
            for i in range(layers)
            for module, shape in per_layer.items()
        }
        return cls(name=name, shapes=shapes)

    @classmethod
    def for_base(cls, name: str, folder: Path) -> BaseModelSpec:
        """The spec the server validates against. A quantized checkpoint (`quantization_config`
        in its config): from the config. A plain one: the config's shapes, cross-checked with
        the checkpoint's (a mismatch stops the start-up); the checkpoint's own when the config
        does not describe a Llama-style decoder (other module names or size fields)."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in config or "quantization_config" in config.get(
            "text_config", {}
        ):
            return cls.from_config(name, folder)
        plain = cls.from_checkpoint(name, folder)
        try:
            spec = cls.from_config(name, folder)
        except ValueError:
            return plain
        if not spec.shapes.keys() <= plain.shapes.keys():
            return plain  # another module layout than the Llama family's
        wrong = [k for k, v in spec.shapes.items() if plain.shapes[k] != v]
        if wrong:
            raise ValueError(
                f"{name}: config.json does not match the checkpoint for {wrong[0]} "
                f"({spec.shapes[wrong[0]]} vs {plain.shapes[wrong[0]]})"
            )
        return spec

    def linear_shape(self, module: str) -> tuple[int, int] | None:
        shape = self.shapes.get(f"{module}.weight")
        if shape is None or len(shape) != 2:
            return None
        return shape[0], shape[1]

    def modules(self) -> list[str]:
        """Names of the base's 2-D weights' modules."""
        return [k.removesuffix(".weight") for k, v in self.shapes.items() if len(v) == 2]


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name: str | None
    num_tensors: int
    # The config to store: the validated fields only.
    config: dict[str, Any] = field(default_factory=dict, repr=False)


def _bad(key: str, why: str, code: str = "invalid_config") -> InvalidAdapter:
    return InvalidAdapter(f"adapter_config.json: `{key}` {why}", code)


def _unsupported(key: str, what: str) -> InvalidAdapter:
    return _bad(key, f"({what}) is not supported by the engine", "unsupported_adapter")


# ---- field checks: each returns the value to store, or _DROP ----------------------------------

_DROP = object()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _short_text(limit: int, keep: bool) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or len(v) > limit):
            raise _bad(key, f"must be a string of at most {limit} characters")
        return v if keep and v is not None else _DROP

    return check


def _off(what: str) -> Callable[[str, Any], Any]:
    """A feature flag the engine does not implement: only false / empty / null pass."""

    def check(key: str, v: Any) -> Any:
        if v in (None, False, [], {}, ""):
            return _DROP
        raise _unsupported(key, what)

    return check


def _bool(keep: bool) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, bool):
            raise _bad(key, "must be true or false")
        return v if keep else _DROP

    return check


def _init_only_config(key: str, v: Any) -> Any:
    """Settings of an initialisation method: they shape the first weights, not the adapter."""
    if v is not None and not isinstance(v, dict):
        raise _bad(key, "must be an object or null")
    return _DROP


def _peft_type(key: str, v: Any) -> Any:
    if not isinstance(v, str) or v.upper() != "LORA":
        raise InvalidAdapter(
            f"adapter_config.json has peft_type {v!r}; only LORA adapters are served",
            "not_a_lora_adapter",
        )
    return "LORA"


def _bias(key: str, v: Any) -> Any:
    if v not in (None, "none"):
        raise _unsupported(key, "LoRA bias training")
    return "none"


def _init_lora_weights(key: str, v: Any) -> Any:
    if isinstance(v, bool) or (isinstance(v, str) and v.lower() in ENGINE_NEUTRAL_INITS):
        return _DROP
    raise _unsupported(
        key,
        f"{v!r}: inits such as PiSSA, OLoRA, CorDA and LoftQ change the base model's weights; "
        "convert the adapter to a plain LoRA first",
    )


def _dropout(key: str, v: Any) -> Any:
    if not _is_number(v) or not 0 <= v < 1:
        raise _bad(key, "must be a number in [0, 1)")
    return _DROP


def _none_or_each(ok: Callable[[Any], bool], why: str) -> Callable[[str, Any], Any]:
    """Null, one value or a list of values that each pass `ok`; not stored."""

    def check(key: str, v: Any) -> Any:
        values = v if isinstance(v, list) else [v]
        if v is not None and not all(ok(x) for x in values):
            raise _bad(key, why)
        return _DROP

    return check


def _plain_name(x: Any) -> bool:
    return isinstance(x, str) and bool(_PLAIN_NAME.match(x))


def _qalora_group_size(key: str, v: Any) -> Any:
    if not _is_int(v) or v < 1:
        raise _bad(key, "must be a positive integer")
    return _DROP


def _auto_mapping(key: str, v: Any) -> Any:
    if v is not None and not (
        isinstance(v, dict)
        and len(v) <= 8
        and all(isinstance(x, str | None) and len(x or "") <= 256 for x in v.values())
    ):
        raise _bad(key, "must be null or a small object of names")
    return _DROP


def _exclude_modules(key: str, v: Any) -> Any:
    if v is None or v == []:
        return _DROP
    if isinstance(v, list) and all(_plain_name(x) for x in v):
        return _DROP
    raise _bad(key, "must be null or a list of plain module names (no regular expressions)")


# Keys the engine reads are checked in `_check_config`; the rest here.
_FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "peft_type": _peft_type,
    "bias": _bias,
    "use_rslora": _bool(keep=True),
    "task_type": _short_text(64, keep=True),
    "base_model_name_or_path": _short_text(512, keep=True),
    "revision": _short_text(256, keep=False),
    "peft_version": _short_text(64, keep=False),
    "megatron_core": _short_text(64, keep=False),
    "inference_mode": _bool(keep=False),
    "ensure_weight_tying": _bool(keep=False),
    "auto_mapping": _auto_mapping,
    "lora_dropout": _dropout,
    "init_lora_weights": _init_lora_weights,
    "layers_to_transform": _none_or_each(
        lambda x: _is_int(x) and 0 <= x < 100_000,
        "must be null, a layer index or a list of layer indexes",
    ),
    "layers_pattern": _none_or_each(_plain_name, "must be null or plain module names"),
    "exclude_modules": _exclude_modules,
    "qalora_group_size": _qalora_group_size,
    "loftq_config": _init_only_config,
    "eva_config": _init_only_config,
    "lora_ga_config": _init_only_config,
    "corda_config": _init_only_config,
    "fan_in_fan_out": _off("transposed Conv1D weights"),
    "use_dora": _off("DoRA"),
    "lora_bias": _off("LoRA bias"),
    "modules_to_save": _off("fully trained extra modules, modules_to_save"),
    "layer_replication": _off("layer replication"),
    "alora_invocation_tokens": _off("activated LoRA"),
    "use_qalora": _off("QALoRA"),
    "use_bdlora": _off("block-diagonal LoRA"),
    "trainable_token_indices": _off("trainable token embeddings"),
    "target_parameters": _off("LoRA on parameters"),
    "megatron_config": _off("Megatron layers"),
    "arrow_config": _off("Arrow routing"),
    "kasa_config": _off("KaSA"),
    "monteclora_config": _off("MonteCLoRA"),
    "velora_config": _off("VeLoRA"),
}
_ENGINE_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
ALLOWED_CONFIG_KEYS = frozenset(_FIELD_CHECKS) | frozenset(_ENGINE_KEYS)


def _load_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{CONFIG_FILE} is larger than 1 MiB", "invalid_config")
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is missing", "missing_file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}", "invalid_config") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object", "invalid_config")
    return config


def _no_constant(name: str) -> float:
    raise InvalidAdapter(
        f"{CONFIG_FILE} holds {name}: only finite numbers are accepted", "invalid_config"
    )


def _rank(key: str, v: Any, max_rank: int) -> int:
    if not _is_int(v) or v < 1:
        raise InvalidAdapter(
            f"adapter rank {key}={v!r} must be a positive integer", "invalid_config"
        )
    if v > max_rank:
        raise InvalidAdapter(
            f"adapter rank {v} ({key}) exceeds this server's max_lora_rank {max_rank}",
            "rank_too_large",
        )
    return v


def _alpha(key: str, v: Any) -> int | float:
    if not _is_number(v) or not math.isfinite(v) or not 0 < v <= MAX_LORA_ALPHA:
        raise _bad(key, f"must be a finite number in (0, {MAX_LORA_ALPHA:g}], got {v!r}")
    return v


def _module_name(key: str, name: Any) -> str:
    """A plain module name whose last part is a supported target module."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or len(name) > 256:
        raise InvalidAdapter(
            f"adapter_config.json: `{key}` entry {str(name)[:80]!r} is not a plain module name "
            "(regular expressions are not accepted)",
            "unsupported_target_modules",
        )
    if name.rsplit(".", 1)[-1] not in SUPPORTED_TARGET_MODULES:
        raise InvalidAdapter(
            f"adapter_config.json: `{key}` names {name!r}, which is not a supported target "
            f"module (supported: {sorted(SUPPORTED_TARGET_MODULES)})",
            "unsupported_target_modules",
        )
    return name


def _pattern(key: str, v: Any, value: Callable[[str, Any], Any]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_PATTERN_ENTRIES:
        raise _bad(key, f"must be an object of at most {MAX_PATTERN_ENTRIES} module names")
    return {_module_name(key, k): value(f"{key}[{k}]", x) for k, x in v.items()}


def _check_config(config: dict, max_rank: int) -> dict[str, Any]:
    """Validate every key; return the config to store."""
    _peft_type("peft_type", config.get("peft_type"))  # another PEFT method: say so first
    unknown = sorted(k for k in config if k not in ALLOWED_CONFIG_KEYS)
    if unknown:
        raise InvalidAdapter(
            f"adapter_config.json: key `{str(unknown[0])[:80]}` is not accepted (unknown to "
            "this server, or not supported by the engine)",
            "unsupported_config_key",
        )
    stored: dict[str, Any] = {}
    for key, check in _FIELD_CHECKS.items():
        if key in config:
            value = check(key, config[key])
            if value is not _DROP:
                stored[key] = value
    rank = _rank("r", config.get("r"), max_rank)
    alpha = _alpha("lora_alpha", config.get("lora_alpha", rank))
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise InvalidAdapter(
            "target_modules as a regular expression is not accepted; list the module names",
            "unsupported_target_modules",
        )
    if not isinstance(targets, list) or not targets or len(targets) > MAX_PATTERN_ENTRIES:
        raise InvalidAdapter("target_modules must be a non-empty list of names", "invalid_config")
    stored.update(
        peft_type="LORA",
        bias="none",
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted({_module_name("target_modules", t) for t in targets}),
        rank_pattern=_pattern(
            "rank_pattern", config.get("rank_pattern"), lambda k, x: _rank(k, x, max_rank)
        ),
        alpha_pattern=_pattern("alpha_pattern", config.get("alpha_pattern"), _alpha),
    )
    return stored


# ---- weights -----------------------------------------------------------------------------------


def _pattern_value(pattern: dict[str, Any], module: str) -> Any:
    """vLLM's (and PEFT's) rule: the first key that is a dot-bounded suffix of the name wins.
    Keys are plain names (checked), so the expression below cannot backtrack badly."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _targeted(module: str, targets: list[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_patterns_match(config: dict[str, Any], base: BaseModelSpec) -> None:
    modules = base.modules()
    for key in ("rank_pattern", "alpha_pattern"):
        for name in config[key]:
            if not any(_pattern_value({name: True}, m) for m in modules):
                raise _bad(key, f"entry {name!r} matches no module of base model {base.name}")


def _check_header_size(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file", "corrupt_weights")
    (size,) = struct.unpack("<Q", head)
    if size > MAX_SAFETENSORS_HEADER_BYTES:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} declares a {size}-byte header (limit "
            f"{MAX_SAFETENSORS_HEADER_BYTES}): not an adapter",
            "corrupt_weights",
        )


def _check_weights(folder: Path, base: BaseModelSpec, config: dict[str, Any]) -> int:
    import torch
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing", "missing_file")
    _check_header_size(path)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            for key in keys:
                module, ab = _lora_tensor(key, config["target_modules"])
                piece = fh.get_slice(key)
                if piece.get_dtype() not in WEIGHT_DTYPES:
                    raise InvalidAdapter(
                        f"tensor {key!r} has dtype {piece.get_dtype()}; only F16, BF16 and F32 "
                        "weights are accepted",
                        "corrupt_weights",
                    )
                if ab in pairs.setdefault(module, {}):
                    raise InvalidAdapter(f"tensor {key!r} appears twice", "corrupt_weights")
                pairs[module][ab] = tuple(piece.get_shape())
            _check_shapes(pairs, base, config)
            for key in keys:  # one tensor in memory at a time
                if not bool(torch.isfinite(fh.get_tensor(key)).all()):
                    raise InvalidAdapter(
                        f"tensor {key!r} holds non-finite values", "corrupt_weights"
                    )
    except SafetensorError as exc:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}", "corrupt_weights"
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} could not be read: {exc}", "corrupt_weights") from exc
    return len(keys)


def _lora_tensor(key: str, targets: list[str]) -> tuple[str, str]:
    match = _LORA_KEY.match(key)
    if match is None:
        raise InvalidAdapter(
            f"tensor {key[:200]!r} is not a LoRA weight (expected "
            "base_model.model.<module>.lora_A/lora_B.weight)",
            "unexpected_tensor",
        )
    module = match["module"]
    if not _PLAIN_NAME.match(module):
        raise InvalidAdapter(f"tensor {key[:200]!r} has a malformed name", "unexpected_tensor")
    if module.rsplit(".", 1)[-1] not in SUPPORTED_TARGET_MODULES:
        raise InvalidAdapter(
            f"tensor {key!r} is on module {module!r}, which is not a supported target module "
            f"(supported: {sorted(SUPPORTED_TARGET_MODULES)})",
            "unsupported_target_modules",
        )
    if not _targeted(module, targets):
        raise InvalidAdapter(
            f"tensor {key!r} is on a module adapter_config.json's target_modules does not list",
            "unexpected_tensor",
        )
    return module, match["ab"]


def _check_shapes(
    pairs: dict[str, dict[str, tuple[int, ...]]], base: BaseModelSpec, config: dict[str, Any]
) -> None:
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
        rank = _pattern_value(config["rank_pattern"], module) or config["r"]
        out_features, in_features = base_shape
        want_a, want_b = (rank, in_features), (out_features, rank)
        if ab["A"] != want_a or ab["B"] != want_b:
            raise InvalidAdapter(
                f"module {module!r}: lora_A {list(ab['A'])} / lora_B {list(ab['B'])} do not fit "
                f"base model {base.name} (expected {list(want_a)} / {list(want_b)} for rank "
                f"{rank}): the adapter was trained for another base model",
                "base_model_mismatch",
            )


def validate_adapter(folder: Path, base: BaseModelSpec, max_rank: int) -> AdapterInfo:
    """Raise InvalidAdapter naming the problem, or describe the adapter and its config to store."""
    config = _check_config(_load_config(folder), max_rank)
    _check_patterns_match(config, base)
    num = _check_weights(folder, base, config)
    return AdapterInfo(
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        target_modules=tuple(config["target_modules"]),
        base_model_name=config.get("base_model_name_or_path"),
        num_tensors=num,
        config=config,
    )


def write_config(folder: Path, info: AdapterInfo) -> None:
    """Replace the adapter's config with the validated one (what the engine will read)."""
    text = json.dumps(info.config, indent=2, sort_keys=True, allow_nan=False)
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
