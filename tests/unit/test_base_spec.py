"""Quantized bases (issue 15): the shapes an adapter must fit come from the base's config.json,
not its checkpoint tensors, so a packed (GPTQ-style) checkpoint validates adapters like the
full-precision one; a plain checkpoint cross-checks the config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.errors import InvalidAdapter
from adapters.validation import BaseModelSpec, validate_adapter

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False}


def _packed_checkpoint(base: Path, dest: Path) -> Path:
    """A GPTQ-looking checkpoint of the base: its config plus `quantization_config`, and
    int32-packed `qweight` / `qzeros`, fp16 `scales` and `g_idx` instead of each projection's
    `weight` (eight 4-bit values per int32 along the input dimension)."""
    dest.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = GPTQ
    (dest / "config.json").write_text(json.dumps(config))
    shapes = BaseModelSpec.from_config("base", base).shapes
    tensors = {"model.embed_tokens.weight": torch.zeros(8, config["hidden_size"])}
    for key, (out_f, in_f) in list(shapes.items())[:14]:  # two layers are enough to look at
        module = key.removesuffix(".weight")
        tensors[f"{module}.qweight"] = torch.zeros(in_f // 8, out_f, dtype=torch.int32)
        tensors[f"{module}.qzeros"] = torch.zeros(in_f // 64, out_f // 8, dtype=torch.int32)
        tensors[f"{module}.scales"] = torch.zeros(in_f // 64, out_f, dtype=torch.float16)
        tensors[f"{module}.g_idx"] = torch.zeros(in_f, dtype=torch.int32)
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_config_shapes_match_the_plain_checkpoint(base_model_path):
    from_config = BaseModelSpec.from_config("smol", base_model_path)
    plain = BaseModelSpec.from_checkpoint("smol", base_model_path)
    assert len(from_config.shapes) == 30 * 7
    assert all(plain.shapes[k] == v for k, v in from_config.shapes.items())
    assert BaseModelSpec.for_base("smol", base_model_path).shapes == from_config.shapes


def test_packed_checkpoint_validates_adapters_from_its_config(
    tmp_path, base_model_path, adapter_dirs
):
    packed = _packed_checkpoint(base_model_path, tmp_path / "gptq")
    # the checkpoint's tensors are packed: read as shapes, every adapter would be refused
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(adapter_dirs["a"], BaseModelSpec.from_checkpoint("gptq", packed), 16)
    assert err.value.code == "base_model_mismatch"
    spec = BaseModelSpec.for_base("gptq", packed)
    info = validate_adapter(adapter_dirs["a"], spec, 16)
    assert info.rank == 8 and len(info.target_modules) == 7


def test_an_adapter_for_another_base_is_still_refused(tmp_path, base_model_path, adapter_dirs):
    other = tmp_path / "wider"
    other.mkdir()
    config = json.loads((base_model_path / "config.json").read_text())
    config.update(hidden_size=640, head_dim=64, num_attention_heads=10, quantization_config=GPTQ)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapter) as err:
        validate_adapter(adapter_dirs["a"], BaseModelSpec.for_base("wider", other), 16)
    assert err.value.code == "base_model_mismatch"


def test_plain_checkpoint_cross_checks_the_config(tmp_path, base_model_path):
    liar = tmp_path / "liar"
    shutil.copytree(base_model_path, liar)
    config = json.loads((liar / "config.json").read_text())
    config["intermediate_size"] = 2048
    (liar / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        BaseModelSpec.for_base("liar", liar)


def test_other_layouts_fall_back_to_the_checkpoint(tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_embd": 8, "n_layer": 1}))
    save_file({"h.0.attn.c_attn.weight": torch.zeros(24, 8)}, folder / "model.safetensors")
    spec = BaseModelSpec.for_base("gpt2ish", folder)
    assert spec.shapes == {"h.0.attn.c_attn.weight": (24, 8)}
