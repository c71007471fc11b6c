"""Upload safety and adapter validation, on real adapters, without the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import adapter_archive, tar_gz_bytes, zip_bytes

from adapters.archive import extract_archive
from adapters.errors import AdapterTooLarge, InvalidAdapter
from adapters.targets import LORA_TARGET_MODULES
from adapters.validation import BaseModelSpec, validate_adapter


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
