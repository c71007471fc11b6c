"""Write a Hugging Face Llama checkpoint folder as one GGUF file, for llama.cpp and Ollama.

Uses the `gguf` package's writer and llama.cpp's names: `llama.*` architecture metadata, the
byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`: tokens, token types, merges, special ids,
chat template) and the tensors under `gguf.get_tensor_name_map`'s names. Like llama.cpp's
converter, the Q and K projection rows are permuted from Hugging Face's rotate-half layout to the
interleaved rope layout llama.cpp expects (transformers' GGUF loader undoes it). Weight matrices
are stored in the chosen dtype; 1-D tensors (the norms) stay float32. Tied embeddings write no
`output.weight`: llama.cpp then reuses `token_embd.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


class GGUFExportError(ValueError):
    pass


def write_gguf(model_dir: Path, out_file: Path, dtype: str = "f16", pre: str | None = None) -> Path:
    """Convert `model_dir` (config.json, *.safetensors, tokenizer.json) to `out_file`.

    `pre` names llama.cpp's pre-tokenizer; by default it is read off tokenizer.json."""
    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise GGUFExportError(
            f"only Llama checkpoints are supported, {model_dir} is {config.get('model_type')!r}"
        )
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    tmp = out_file.with_name(out_file.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    try:
        _add_hparams(writer, config, model_dir.name, DTYPES[dtype][1])
        _add_tokenizer(writer, model_dir, config["vocab_size"], pre)
        _add_tensors(writer, model_dir, config, DTYPES[dtype][0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_file)
    return out_file


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise GGUFExportError(f"rope type {kind!r} is not supported (only the default rope)")
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _add_hparams(w: gguf.GGUFWriter, cfg: dict, name: str, ftype: gguf.LlamaFileType) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)


def _pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer: byte-level BPE with GPT-2's split
    ("gpt-2"), or with digits split one by one first (SmolLM's, "smollm")."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise GGUFExportError(f"unrecognised pre-tokenizer {kinds}; pass pre= (llama.cpp's name)")


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None) -> None:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    model = tokenizer["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError("only byte-level BPE tokenizers (GPT-2 style) are supported")
    by_id: dict[int, tuple[str, gguf.TokenType]] = {
        i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()
    }
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    size = max(vocab_size, max(by_id) + 1)
    unused = gguf.TokenType.UNUSED
    entries = [by_id.get(i, (f"[PAD{i}]", unused)) for i in range(size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or _pre_tokenizer(tokenizer))
    w.add_token_list([t for t, _ in entries])
    w.add_token_types([k for _, k in entries])
    w.add_add_space_prefix(bool((tokenizer.get("pre_tokenizer") or {}).get("add_prefix_space")))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=size)
    if not special.merges:
        raise GGUFExportError(f"{model_dir}/tokenizer.json has no BPE merges")
    if "bos" not in special.add_special_token:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        special.add_special_token["bos"] = bool(config.get("add_bos_token", False))
    special.add_to_gguf(w, quiet=True)


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rope rows (HF) -> interleaved pairs (llama.cpp), per head."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _add_tensors(
    w: gguf.GGUFWriter, model_dir: Path, cfg: dict, qtype: gguf.GGMLQuantizationType
) -> None:
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"no *.safetensors in {model_dir}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    tied = cfg.get("tie_word_embeddings", False)
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"no GGUF name for tensor {key!r}")
                data = f.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                kind = qtype if data.ndim > 1 else gguf.GGMLQuantizationType.F32
                w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
