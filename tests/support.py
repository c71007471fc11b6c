"""Helpers the tests share: random-but-real PEFT adapters and archives of them."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

from adapters.targets import LORA_TARGET_MODULES

ALL_PROJECTIONS = list(LORA_TARGET_MODULES)


def tie_logprob_gap(dtype: str) -> float:
    """The largest gap between two tokens' log-probabilities that still counts as a tie when two
    runs of the same model part there. In bf16 the logits' step at |logit| in [16, 32) is 0.125,
    so a smaller gap is a tie at the model's own precision; float32 sums agree to ~1e-6."""
    return 0.125 if dtype == "bfloat16" else 1e-3


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
                    # bf16-exact values: an engine storing adapters in bf16 (lora_dtype) holds
                    # the same numbers as one storing them in float32.
                    param.copy_((noise * scale / param.shape[-1] ** 0.5).bfloat16().float())
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


def adapter_files(folder: Path, **extra: bytes) -> dict[str, bytes | Path]:
    """An adapter folder's two files (plus `extra` members) for `tar_gz_bytes` / `zip_bytes`."""
    return {
        "adapter_config.json": folder / "adapter_config.json",
        "adapter_model.safetensors": folder / "adapter_model.safetensors",
        **extra,
    }


def upload_archive(
    server, key: str, name: str, data: bytes, filename: str = "adapter.tar.gz", timeout: float = 300
):
    """POST an adapter archive to `server` as tenant `key`; the httpx response."""
    import httpx

    return httpx.post(
        f"{server.base_url}/adapters",
        headers={"Authorization": f"Bearer {key}"},
        data={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
        timeout=timeout,
    )


def adapter_archive(folder: Path) -> bytes:
    return tar_gz_bytes(
        {
            "adapter_config.json": folder / "adapter_config.json",
            "adapter_model.safetensors": folder / "adapter_model.safetensors",
        }
    )


# ---- hostile archives (issue 13): each is small on the wire and refused from its headers ----


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=9)


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One 512-byte tar header block declaring `size` bytes of data (none follow)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def long_name_bomb(declared: int = 4 << 30) -> bytes:
    """A GNU long-name record declaring `declared` bytes of name: a reader that trusts it
    allocates that much."""
    return tar_header("././@LongLink", declared, tarfile.GNUTYPE_LONGNAME) + b"\0" * 1024


def many_members_tar_gz(count: int = 200_000) -> bytes:
    """`count` empty folder entries, each named apart."""
    blocks = (tar_header(f"{i}/", 0, tarfile.DIRTYPE) for i in range(count))
    return gzip_bytes(b"".join(blocks) + b"\0" * 1024)


def declared_huge_member_tar_gz(declared: int = 4 << 30) -> bytes:
    return gzip_bytes(tar_header("adapter_model.safetensors", declared) + b"\0" * 4096)


def zip_with_huge_directory(entries: int = 30_000, name_len: int = 150) -> bytes:
    """A zip of `entries` empty members with long names: a big central directory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(entries):
            zf.writestr(f"{i:0{name_len}d}", b"")
    return buf.getvalue()


def patch_zip_member(
    data: bytes, member: str, *, flag_bits: int = 0, method: int | None = None
) -> bytes:
    """Set general-purpose flag bits or the compression method of `member` in both its local
    header and its central directory entry."""
    import struct

    out = bytearray(data)
    name = member.encode()
    for sig, flag_at, method_at, name_len_at, name_at in (
        (b"PK\x03\x04", 6, 8, 26, 30),
        (b"PK\x01\x02", 8, 10, 28, 46),
    ):
        pos = out.find(sig)
        while pos >= 0:
            (n,) = struct.unpack_from("<H", out, pos + name_len_at)
            if bytes(out[pos + name_at : pos + name_at + n]) == name:
                (flags,) = struct.unpack_from("<H", out, pos + flag_at)
                struct.pack_into("<H", out, pos + flag_at, flags | flag_bits)
                if method is not None:
                    struct.pack_into("<H", out, pos + method_at, method)
            pos = out.find(sig, pos + 4)
    return bytes(out)
