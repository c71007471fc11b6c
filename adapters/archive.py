"""Safe unpacking of uploaded adapter archives (.tar.gz / .tgz / .tar / .zip).

Nothing is written until every member has been checked: no absolute paths, no `..`, no links or
device files, only the files a PEFT LoRA adapter consists of, and a bound on the unpacked size
(a zip bomb is refused from its headers, before anything is inflated)."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from adapters.errors import AdapterTooLarge, InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE})
# Harmless extras that `PeftModel.save_pretrained` and `tenantlora train` write beside the
# adapter; they are dropped, not stored.
IGNORED_FILES = frozenset({"README.md", ".gitattributes", "training_report.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class _Member:
    name: str  # the file name inside the adapter folder
    size: int


def _check_path(raw: str) -> PurePosixPath:
    path = PurePosixPath(raw.replace("\\", "/"))
    if raw.startswith(("/", "\\")) or path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise InvalidAdapter(f"archive member {raw!r} has an absolute path", "unsafe_archive")
    if ".." in path.parts:
        raise InvalidAdapter(
            f"archive member {raw!r} escapes the archive with '..'", "unsafe_archive"
        )
    return path


def _classify(paths: list[tuple[PurePosixPath, int, bool]]) -> dict[str, _Member]:
    """Map the archive's files onto adapter file names; allow one enclosing folder."""
    files = [(p, size, executable) for p, size, executable in paths if p.parts]
    roots = {p.parts[0] for p, _, _ in files if len(p.parts) > 1}
    flat = all(len(p.parts) == 1 for p, _, _ in files)
    if not flat and (len(roots) != 1 or any(len(p.parts) != 2 for p, _, _ in files)):
        raise InvalidAdapter(
            "archive must hold adapter_config.json and adapter_model.safetensors at its top "
            "level or inside one folder",
            "invalid_archive_layout",
        )
    members: dict[str, _Member] = {}
    for path, size, executable in files:
        name = path.name
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(
                f"{name} is a pickle file; only safetensors weights are accepted "
                "(save with safe_serialization=True)",
                "pickle_weights_refused",
            )
        if name in IGNORED_FILES:
            continue
        if name not in REQUIRED_FILES:
            raise InvalidAdapter(f"unexpected file {name!r} in the archive", "unexpected_file")
        if executable:
            raise InvalidAdapter(f"{name} is marked executable", "unexpected_file")
        members[name] = _Member(name, size)
    missing = REQUIRED_FILES - members.keys()
    if missing:
        raise InvalidAdapter(f"archive lacks {', '.join(sorted(missing))}", "missing_file")
    return members


def _check_size(members: dict[str, _Member], max_bytes: int) -> None:
    total = sum(m.size for m in members.values())
    if total > max_bytes:
        raise AdapterTooLarge(f"adapter unpacks to {total} bytes, over the limit of {max_bytes}")


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack `archive` into the (new, empty) folder `dest`; return `dest`."""
    dest.mkdir(parents=True, exist_ok=False)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, max_bytes)
    elif _is_tar(archive):
        _extract_tar(archive, dest, max_bytes)
    else:
        raise InvalidAdapter("upload is neither a .tar.gz nor a .zip archive", "invalid_archive")
    return dest


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except OSError:
        return False


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        entries = []
        for info in infos:
            mode = info.external_attr >> 16
            if (mode & 0o170000) == 0o120000:
                raise InvalidAdapter(
                    f"archive member {info.filename!r} is a link", "unsafe_archive"
                )
            entries.append((_check_path(info.filename), info.file_size, bool(mode & 0o111)))
        members = _classify(entries)
        _check_size(members, max_bytes)
        for info, (path, _, _) in zip(infos, entries, strict=True):
            if path.name in members:
                with zf.open(info) as src, (dest / path.name).open("wb") as out:
                    _copy_bounded(src, out, members[path.name].size)


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(archive, "r:*") as tf:
            infos = tf.getmembers()
            entries = []
            files = []
            for info in infos:
                path = _check_path(info.name)
                if info.isdir():
                    continue
                if info.issym() or info.islnk():
                    raise InvalidAdapter(
                        f"archive member {info.name!r} is a link", "unsafe_archive"
                    )
                if not info.isfile():
                    raise InvalidAdapter(
                        f"archive member {info.name!r} is not a regular file", "unsafe_archive"
                    )
                entries.append((path, info.size, bool(info.mode & 0o111)))
                files.append(info)
            members = _classify(entries)
            _check_size(members, max_bytes)
            for info, (path, _, _) in zip(files, entries, strict=True):
                if path.name in members:
                    src = tf.extractfile(info)
                    assert src is not None
                    with src, (dest / path.name).open("wb") as out:
                        _copy_bounded(src, out, members[path.name].size)
    except tarfile.TarError as exc:
        raise InvalidAdapter(f"corrupt tar archive: {exc}", "invalid_archive") from exc


def _copy_bounded(src, out, declared: int) -> None:
    """Copy at most the declared size: a member that inflates past its header is refused."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > declared:
            raise InvalidAdapter("archive member is larger than its header says", "invalid_archive")
        out.write(chunk)


def copy_adapter_folder(src: Path, dest: Path, max_bytes: int) -> Path:
    """Copy a server-side PEFT folder into `dest`, with the same checks as an archive."""
    if not src.is_dir():
        raise InvalidAdapter(f"{src} is not a folder", "not_a_folder")
    entries = []
    for path in sorted(src.iterdir()):
        if path.is_symlink():
            raise InvalidAdapter(f"{path.name} is a link", "unsafe_archive")
        if path.is_dir():
            continue
        entries.append((PurePosixPath(path.name), path.stat().st_size, False))
    members = _classify(entries)
    _check_size(members, max_bytes)
    dest.mkdir(parents=True, exist_ok=False)
    for name in members:
        shutil.copyfile(src / name, dest / name)
    return dest
