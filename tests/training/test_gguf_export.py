"""GGUF export: the merged model (and the plain base) written as GGUF and loaded back with
transformers' GGUF loader give the logits of base + adapter within the stated tolerance, and the
tokenizer read from the GGUF encodes chat prompts like the Hugging Face one."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from support import make_random_adapters

from training.gguf_export import write_gguf
from training.merge import (
    GGUF_TOLERANCES,
    MergeError,
    check_batches,
    check_gguf,
    gguf_logits,
    logits,
    merge,
)


@pytest.fixture(scope="module")
def adapter(base_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-adapter") / "adapter"
    make_random_adapters(base_model_dir, {out: 7}, rank=8)
    return out


@pytest.fixture(scope="module")
def checks(base_model_dir: Path, adapter: Path) -> tuple[list, list, list]:
    """The merge check's inputs, with base + adapter (PEFT, unmerged, fp32) and base logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batches = check_batches(AutoTokenizer.from_pretrained(base_model_dir))
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    reference = logits(model, batches)
    with model.disable_adapter():
        base = logits(model, batches)
    return batches, reference, base


@pytest.fixture(scope="module")
def merged_f16(base_model_dir: Path, adapter: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf-merge") / "merged"
    merge(adapter, out, base=str(base_model_dir), fmt="gguf")  # f16, the default
    return out, json.loads((out / "merge_report.json").read_text())


def test_merge_gguf_f16_within_tolerance(merged_f16) -> None:
    out, saved = merged_f16
    check = saved["gguf"]
    assert saved["passed"] and check["passed"] and check["dtype"] == "f16"
    assert check["file"] == str(out / "model-f16.gguf")
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"] == GGUF_TOLERANCES["f16"]
    assert check["next_token_agreement"] == 1.0 and check["top1_agreement"] > 0.9
    assert saved["max_abs_logit_diff"] <= 1e-3  # the HF checkpoint beside it: checked as before
    assert check["bytes"] < 0.6 * saved["artifact_bytes"]  # half of the fp32 checkpoint

    reader = gguf.GGUFReader(out / "model-f16.gguf")
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 30
    assert fields["llama.attention.head_count_kv"].contents() == 3
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # a name llama.cpp knows
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert len(types) == 2 + 30 * 9


def test_gguf_f32_matches_base_plus_adapter(merged_f16, checks) -> None:
    out, _ = merged_f16
    batches, reference, base = checks
    f32 = write_gguf(out, out / "model-f32.gguf", "f32")
    got = gguf_logits(f32, batches)
    result = check_gguf(f32, got, reference, "f32")
    assert result.passed, result
    assert result.max_abs_logit_diff <= 1e-3 and result.top1_agreement == 1.0
    wrong = check_gguf(f32, got, base, "f32")  # the check tells the adapter's effect apart
    assert not wrong.passed and wrong.max_abs_logit_diff > GGUF_TOLERANCES["f16"]


def test_base_folder_converts(base_model_dir: Path, checks, tmp_path) -> None:
    """The plain base folder (bf16 safetensors, no adapter) converts too; the tokenizer read
    from the GGUF encodes chat prompts (its chat template included) like the HF one."""
    batches, _, base = checks
    f16 = write_gguf(base_model_dir, tmp_path / "base-f16.gguf", "f16")
    result = check_gguf(f16, gguf_logits(f16, batches), base, "f16")
    assert result.passed, result

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(base_model_dir)
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f16.name)
    for text in ("What is the capital of France?", "Refund order #48213 (€12.50), ok?\n\tThanks"):
        chat = [{"role": "user", "content": text}]
        want = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        got = loaded.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert got == want
        assert loaded.decode(got) == hf.decode(want)


def test_gguf_format_refuses_a_bf16_merge(adapter: Path, base_model_dir: Path, tmp_path) -> None:
    with pytest.raises(MergeError, match="float32 merge"):
        merge(adapter, tmp_path / "m", base=str(base_model_dir), dtype="bfloat16", fmt="gguf")
