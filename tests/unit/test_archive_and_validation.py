"""Upload safety and adapter validation, on real adapters, without the engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import adapter_archive, tar_gz_bytes, zip_bytes

from adapters.archive import extract_archive
from adapters.errors import AdapterTooLarge, InvalidAdapter
from adapters.targets import LORA_TARGET_MODULES
from adapters.validation import (
    ALLOWED_CONFIG_KEYS,
    BaseModelSpec,
    validate_adapter,
    write_config,
)


@pytest.fixture(scope="module")
def base_spec(base_model_path: Path) -> BaseModelSpec:
    return BaseModelSpec.from_checkpoint("SmolLM2-135M-Instruct", base_model_path)


def _extract(tmp_path: Path, data: bytes, max_bytes: int = 50_000_000) -> Path:
    archive = tmp_path / "upload.bin"
    archive.write_bytes(data)
    return extract_archive(archive, tmp_path / "out", max_bytes)


def test_good_tar_and_zip_extract_and_validate(tmp_path, adapter_dirs, base_spec):
    folder = adapter_dirs["a"]
    out = _extract(tmp_path, adapter_archive(folder))
    info = validate_adapter(out, base_spec, max_rank=16)
    assert info.rank == 8
    assert set(info.target_modules) == set(LORA_TARGET_MODULES)
    assert info.num_tensors == 30 * 7 * 2
    zipped = zip_bytes(
        {
            "my-adapter/adapter_config.json": folder / "adapter_config.json",
            "my-adapter/adapter_model.safetensors": folder / "adapter_model.safetensors",
            "my-adapter/README.md": b"notes",
            "my-adapter/training_report.json": b"{}",
        }
    )
    out2 = extract_archive(_write(tmp_path / "z.zip", zipped), tmp_path / "out2", 50_000_000)
    assert sorted(p.name for p in out2.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("members", "code"),
    [
        ({"/etc/adapter_config.json": b"{}"}, "unsafe_archive"),
        ({"../adapter_config.json": b"{}"}, "unsafe_archive"),
        ({"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"}, "pickle_weights_refused"),
        ({"adapter_config.json": b"{}", "run.sh": b"#!/bin/sh"}, "unexpected_file"),
        ({"adapter_config.json": b"{}"}, "missing_file"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, members, code):
    with pytest.raises(InvalidAdapter) as err:
        _extract(tmp_path, tar_gz_bytes(members))
    assert err.value.code == code
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_links_and_non_archives_are_refused(tmp_path):
    with pytest.raises(InvalidAdapter) as err:
        _extract(
            tmp_path,
            tar_gz_bytes(
                {"adapter_config.json": b"{}"},
                symlinks={"adapter_model.safetensors": "/etc/passwd"},
            ),
        )
    assert err.value.code == "unsafe_archive"
    with pytest.raises(InvalidAdapter) as err:
        (tmp_path / "x").mkdir()
        _extract(tmp_path / "x", b"this is not an archive")
    assert err.value.code == "invalid_archive"


def test_size_limit_is_checked_before_unpacking(tmp_path, adapter_dirs):
    with pytest.raises(AdapterTooLarge):
        _extract(tmp_path, adapter_archive(adapter_dirs["a"]), max_bytes=1_000_000)


def _variant(tmp_path: Path, source: Path, **config_changes) -> Path:
    out = tmp_path / "variant"
    out.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "adapter_model.safetensors").write_bytes(
        (source / "adapter_model.safetensors").read_bytes()
    )
    return out


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "not_a_lora_adapter"),
        ({"r": 64}, "rank_too_large"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "unsupported_target_modules"),
        ({"use_dora": True}, "unsupported_adapter"),
        ({"r": 4}, "base_model_mismatch"),  # config says rank 4, tensors are rank 8
    ],
)
def test_bad_configs_are_refused(tmp_path, adapter_dirs, base_spec, changes, code):
    folder = _variant(tmp_path, adapter_dirs["a"], **changes)
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert err.value.code == code


def test_unparseable_config_and_corrupt_weights(tmp_path, adapter_dirs, base_spec):
    folder = _variant(tmp_path, adapter_dirs["a"])
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert err.value.code == "invalid_config"
    folder2 = (
        _variant(tmp_path / "2", adapter_dirs["a"]) if (tmp_path / "2").mkdir() is None else None
    )
    weights = folder2 / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder2, base_spec, max_rank=16)
    assert err.value.code == "corrupt_weights"


def test_adapter_for_another_base_model_is_refused(tmp_path, adapter_dirs, base_model_path):
    """Shapes are checked against the base: a base with another hidden size refuses it."""
    spec = BaseModelSpec.from_checkpoint("real", base_model_path)
    other = BaseModelSpec(
        name="other-base",
        shapes={k: (v[0] * 2, v[1] * 2) if len(v) == 2 else v for k, v in spec.shapes.items()},
    )
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(adapter_dirs["a"], other, max_rank=16)
    assert err.value.code == "base_model_mismatch"
    assert "another base model" in str(err.value)


# ---- issue 13: the config allow-list; what is accepted always loads in the engine --------------

REDOS_KEYS = ["(?:.|.){0,20}[0-9]", "(.|.)*[0-9]", "q_proj|k_proj", ".*q_proj"]


@pytest.mark.parametrize("key", ["alpha_pattern", "rank_pattern"])
@pytest.mark.parametrize("pattern", REDOS_KEYS)
def test_regex_patterns_are_refused_naming_the_key(tmp_path, adapter_dirs, base_spec, key, pattern):
    folder = _variant(tmp_path, adapter_dirs["a"], **{key: {pattern: 8}})
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("changes", "code", "named"),
    [
        ({"lora_bias": True}, "unsupported_adapter", "lora_bias"),
        ({"init_lora_weights": "pissa"}, "unsupported_adapter", "init_lora_weights"),
        ({"init_lora_weights": "olora"}, "unsupported_adapter", "init_lora_weights"),
        ({"layer_replication": [[0, 4]]}, "unsupported_adapter", "layer_replication"),
        ({"use_dora": True}, "unsupported_adapter", "use_dora"),
        ({"fan_in_fan_out": True}, "unsupported_adapter", "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "unsupported_adapter", "modules_to_save"),
        ({"lora_alpha": 0}, "invalid_config", "lora_alpha"),
        ({"lora_alpha": -16}, "invalid_config", "lora_alpha"),
        ({"lora_alpha": "16"}, "invalid_config", "lora_alpha"),
        ({"vllm_lora_scaling_factor": 100.0}, "unsupported_config_key", "vllm_lora_scaling_factor"),
        ({"surprise": 1}, "unsupported_config_key", "surprise"),
        ({"layers_to_transform": ["x"]}, "invalid_config", "layers_to_transform"),
        ({"exclude_modules": ".*q_proj"}, "invalid_config", "exclude_modules"),
        ({"rank_pattern": {"q_proj": 64}}, "rank_too_large", "rank_pattern"),
        ({"rank_pattern": {"lm_head": 8}}, "unsupported_target_modules", "rank_pattern"),
        ({"alpha_pattern": {"model.layers.99.self_attn.q_proj": 8}}, "invalid_config", "alpha_pattern"),
        ({"rank_pattern": {"q_proj": 4}}, "base_model_mismatch", "q_proj"),
        ({"target_modules": ["q_proj", "v_proj"]}, "unexpected_tensor", "target_modules"),
        ({"target_modules": ["(q|v)_proj"]}, "unsupported_target_modules", "target_modules"),
    ],
)  # fmt: skip
def test_config_allow_list(tmp_path, adapter_dirs, base_spec, changes, code, named):
    folder = _variant(tmp_path, adapter_dirs["a"], **changes)
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert err.value.code == code and named in str(err.value), err.value


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_alpha_is_refused(tmp_path, adapter_dirs, base_spec, literal):
    folder = _variant(tmp_path, adapter_dirs["a"])
    config = (folder / "adapter_config.json").read_text()
    config = re.sub(r'"lora_alpha": [0-9.]+', f'"lora_alpha": {literal}', config)
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert err.value.code == "invalid_config"


def test_tensors_on_embeddings_are_refused(tmp_path, adapter_dirs, base_spec):
    import torch
    from safetensors.torch import load_file, save_file

    folder = _variant(tmp_path, adapter_dirs["a"])
    tensors = load_file(folder / "adapter_model.safetensors")
    vocab, hidden = base_spec.shapes["model.embed_tokens.weight"]
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(8, vocab)
    tensors["base_model.model.model.embed_tokens.lora_B.weight"] = torch.zeros(hidden, 8)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(folder, base_spec, max_rank=16)
    assert err.value.code == "unsupported_target_modules" and "embed_tokens" in str(err.value)


def test_stored_config_is_the_validated_fields_only(tmp_path, adapter_dirs, base_spec):
    folder = _variant(
        tmp_path,
        adapter_dirs["a"],
        init_lora_weights="gaussian",
        lora_dropout=0.05,
        peft_version="0.21.2",
        use_rslora=True,
        rank_pattern={"model.layers.0.self_attn.q_proj": 8},
        alpha_pattern={"v_proj": 4},
    )
    info = validate_adapter(folder, base_spec, max_rank=16)
    write_config(folder, info)
    stored = json.loads((folder / "adapter_config.json").read_text())
    assert set(stored) <= ALLOWED_CONFIG_KEYS
    assert "lora_dropout" not in stored and "peft_version" not in stored
    assert "init_lora_weights" not in stored
    assert stored["use_rslora"] is True and stored["alpha_pattern"] == {"v_proj": 4}
    assert stored["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8}
    assert validate_adapter(folder, base_spec, max_rank=16).config == stored  # a fixed point
