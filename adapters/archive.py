"""Safe unpacking of uploaded adapter archives (.tar.gz / .tgz / .zip) and copying of folders.

Every check runs on headers, before a member's data is inflated: only gzip-compressed tar and
zip (stored or deflated) are read; member count, name and header-record sizes and the total
inflated size (ignored files included) are capped; absolute paths, `..`, links, device files,
duplicate names and files other than a PEFT LoRA adapter's are refused. Tar headers are parsed
one 512-byte block at a time (never `tarfile`'s reader, which reads a GNU long name or pax record
of any declared size into memory); a zip's central directory is bounded from its end record
before `zipfile` reads it. Corrupt, truncated, encrypted or otherwise unreadable archives raise
`InvalidAdapter` with code `invalid_archive`."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters.errors import AdapterTooLarge, InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE})
# Harmless extras that `PeftModel.save_pretrained` and `tenantlora train` write beside the
# adapter; they are dropped, not stored (but their size counts against the limit).
IGNORED_FILES = frozenset({"README.md", ".gitattributes", "training_report.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

MAX_MEMBERS = 32  # entries of any kind, folders included
MAX_NAME_BYTES = 1024  # a member's full path
MAX_HEADER_RECORD_BYTES = 8192  # a GNU long-name block or a pax header's records
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024  # a zip's central directory
ARCHIVE_OVERHEAD_BYTES = 1 << 20  # tar headers, padding and end blocks beyond the members' data
_COPY_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE

_MAGIC_REFUSED = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x5d\x00\x00": "lzma",
    b"7z\xbc\xaf": "7-Zip",
    b"Rar!": "RAR",
}
_ONLY = "only a .tar.gz (gzip-compressed tar) or a .zip (stored or deflated) archive is accepted"


def _invalid(message: str) -> InvalidAdapter:
    return InvalidAdapter(message, "invalid_archive")


def _check_path(raw: str) -> PurePosixPath:
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise InvalidAdapter(
            f"archive member name is longer than {MAX_NAME_BYTES} bytes", "unsafe_archive"
        )
    if "\x00" in raw:
        raise InvalidAdapter("archive member name holds a NUL byte", "unsafe_archive")
    path = PurePosixPath(raw.replace("\\", "/"))
    if raw.startswith(("/", "\\")) or path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise InvalidAdapter(f"archive member {raw!r} has an absolute path", "unsafe_archive")
    if ".." in path.parts:
        raise InvalidAdapter(
            f"archive member {raw!r} escapes the archive with '..'", "unsafe_archive"
        )
    return path


@dataclass
class _Collector:
    """Checks members one header at a time; says which to extract and under which name."""

    max_bytes: int
    members: int = 0
    total: int = 0
    layout: str | None = None  # "" when flat, else the one enclosing folder's name
    seen: set[str] = field(default_factory=set)
    wanted: set[str] = field(default_factory=set)

    def add(self, path: PurePosixPath, size: int, *, is_dir: bool, executable: bool) -> str | None:
        """Return the adapter file name to extract this member as, or None to skip it."""
        self.count()
        key = "/".join(path.parts)
        if key in self.seen:
            raise InvalidAdapter(f"archive holds {key!r} more than once", "unsafe_archive")
        self.seen.add(key)
        if is_dir or not path.parts:
            if len(path.parts) > 1:
                self._layout_error()
            return None
        self._check_layout(path)
        self.total += size
        if self.total > self.max_bytes:
            raise AdapterTooLarge(
                f"archive unpacks to more than the limit of {self.max_bytes} bytes"
            )
        name = path.name
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(
                f"{name} is a pickle file; only safetensors weights are accepted "
                "(save with safe_serialization=True)",
                "pickle_weights_refused",
            )
        if name in IGNORED_FILES:
            return None
        if name not in REQUIRED_FILES:
            raise InvalidAdapter(f"unexpected file {name!r} in the archive", "unexpected_file")
        if executable:
            raise InvalidAdapter(f"{name} is marked executable", "unexpected_file")
        self.wanted.add(name)
        return name

    def count(self) -> None:
        """One more entry (a member or a header record)."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise _invalid(f"archive holds more than {MAX_MEMBERS} entries")

    def _check_layout(self, path: PurePosixPath) -> None:
        if len(path.parts) > 2:
            self._layout_error()
        layout = path.parts[0] if len(path.parts) == 2 else ""
        if self.layout is None:
            self.layout = layout
        elif self.layout != layout:
            self._layout_error()

    @staticmethod
    def _layout_error() -> None:
        raise InvalidAdapter(
            "archive must hold adapter_config.json and adapter_model.safetensors at its top "
            "level or inside one folder",
            "invalid_archive_layout",
        )

    def finish(self) -> None:
        missing = REQUIRED_FILES - self.wanted
        if missing:
            raise InvalidAdapter(f"archive lacks {', '.join(sorted(missing))}", "missing_file")


def extract_archive(archive: Path | BinaryIO, dest: Path, max_bytes: int) -> Path:
    """Unpack `archive` (a path or a seekable binary file) into the new folder `dest`. Members
    are checked from their headers as the archive streams by; on any error `dest` is removed."""
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if isinstance(archive, Path | str):
            with open(archive, "rb") as fh:
                _extract(fh, dest, max_bytes)
        else:
            archive.seek(0)
            _extract(archive, dest, max_bytes)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _extract(fh: BinaryIO, dest: Path, max_bytes: int) -> None:
    head = fh.read(8)
    fh.seek(0)
    if head.startswith(b"\x1f\x8b"):
        _extract_tar_gz(fh, dest, max_bytes)
    elif head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        _extract_zip(fh, dest, max_bytes)
    else:
        kind = next((k for magic, k in _MAGIC_REFUSED.items() if head.startswith(magic)), None)
        if kind is None and _looks_like_tar(fh):
            kind = "uncompressed tar"
        raise _invalid(f"upload is a {kind} archive; {_ONLY}" if kind else f"{_ONLY}")


def _looks_like_tar(fh: BinaryIO) -> bool:
    fh.seek(0)
    block = fh.read(_BLOCK)
    fh.seek(0)
    return len(block) == _BLOCK and block[257:262] == b"ustar"


# ---- tar.gz ------------------------------------------------------------------------------------


class _Inflater:
    """A gzip stream read in exact amounts, with a cap on the bytes it may inflate."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._limit = limit
        self.inflated = 0

    def read(self, n: int, *, allow_eof: bool = False) -> bytes:
        if self.inflated + n > self._limit:
            raise AdapterTooLarge("archive inflates past the size limit")
        parts, left = [], n
        while left:
            try:
                chunk = self._gz.read(min(left, _COPY_CHUNK))
            except (OSError, EOFError, zlib.error) as exc:
                raise _invalid(f"corrupt or truncated gzip data: {exc}") from exc
            if not chunk:
                if allow_eof and left == n:
                    return b""
                raise _invalid("truncated archive: it ends inside a member")
            parts.append(chunk)
            left -= len(chunk)
            self.inflated += len(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        """Read the rest (tar end padding), so that gzip checks its CRC and length."""
        while self.read(_BLOCK, allow_eof=True):
            pass


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise _invalid("malformed pax header")
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise _invalid("malformed pax header")
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise _invalid("malformed pax header")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _record_data(stream: _Inflater, size: int, what: str) -> bytes:
    if size > MAX_HEADER_RECORD_BYTES:
        raise _invalid(f"{what} of {size} bytes is over the limit of {MAX_HEADER_RECORD_BYTES}")
    return stream.read(_padded(size))[:size]


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


_PAX_REFUSED = ("linkpath", "GNU.sparse.")


def _extract_tar_gz(fh: BinaryIO, dest: Path, max_bytes: int) -> None:
    stream = _Inflater(fh, max_bytes + ARCHIVE_OVERHEAD_BYTES)
    collector = _Collector(max_bytes)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = stream.read(_BLOCK, allow_eof=True)
        if not block or block == b"\x00" * _BLOCK:
            break
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _invalid(f"corrupt tar header: {exc}") from exc
        if info.size < 0:
            raise _invalid("corrupt tar header: negative size")
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = (
                _record_data(stream, info.size, "GNU long name")
                .rstrip(b"\x00")
                .decode("utf-8", "surrogateescape")
            )
            collector.count()
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            records = _pax_records(_record_data(stream, info.size, "pax header"))
            collector.count()
            if any(k.startswith(_PAX_REFUSED) for k in records):
                raise InvalidAdapter("archive holds links or sparse files", "unsafe_archive")
            if info.type == tarfile.XGLTYPE:
                if {"path", "size"} & records.keys():
                    raise _invalid("pax global header sets a path or size")
            else:
                pax = records
            continue
        name = pax.get("path") or long_name or info.name
        size = info.size
        if "size" in pax:
            if not pax["size"].isdigit():
                raise _invalid("malformed pax size")
            size = int(pax["size"])
        long_name, pax = None, {}
        path = _check_path(name)
        if info.issym() or info.islnk():
            raise InvalidAdapter(f"archive member {name!r} is a link", "unsafe_archive")
        if not (info.isfile() or info.isdir()) or info.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidAdapter(f"archive member {name!r} is not a regular file", "unsafe_archive")
        target = collector.add(path, size, is_dir=info.isdir(), executable=bool(info.mode & 0o111))
        data_blocks = _padded(size) if info.isfile() else 0
        if target is None:
            _skip(stream, data_blocks)
            continue
        with (dest / target).open("wb") as out:
            left = size
            while left:
                chunk = stream.read(min(left, _COPY_CHUNK))
                out.write(chunk)
                left -= len(chunk)
        _skip(stream, data_blocks - size)
    if long_name is not None or pax:
        raise _invalid("truncated archive: a header record without its member")
    stream.drain()
    collector.finish()


def _skip(stream: _Inflater, n: int) -> None:
    while n:
        n -= len(stream.read(min(n, _COPY_CHUNK)))


# ---- zip ---------------------------------------------------------------------------------------

_END_RECORD = struct.Struct("<4s4H2LH")


def _check_zip_directory(fh: BinaryIO) -> None:
    """Bound the central directory from the end record, before `zipfile` reads it."""
    size = fh.seek(0, os.SEEK_END)
    tail_len = min(size, _END_RECORD.size + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    fh.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(tail):
        raise _invalid("corrupt zip archive: no end of central directory record")
    _, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, _ = _END_RECORD.unpack_from(
        tail, at
    )
    if 0xFFFF in (disk_entries, entries) or 0xFFFFFFFF in (cd_size, cd_offset):
        raise _invalid("ZIP64 archives are not accepted (an adapter never needs one)")
    if disk or cd_disk or disk_entries != entries:
        raise _invalid("multi-part zip archives are not accepted")
    if entries > MAX_MEMBERS:
        raise _invalid(f"archive holds more than {MAX_MEMBERS} entries")
    if cd_size > MAX_ZIP_DIRECTORY_BYTES:
        raise _invalid(f"zip central directory is larger than {MAX_ZIP_DIRECTORY_BYTES} bytes")


def _extract_zip(fh: BinaryIO, dest: Path, max_bytes: int) -> None:
    _check_zip_directory(fh)
    try:
        with zipfile.ZipFile(fh) as zf:
            collector = _Collector(max_bytes)
            wanted: list[tuple[zipfile.ZipInfo, str]] = []
            for info in zf.infolist():
                mode = info.external_attr >> 16
                path = _check_path(info.filename)
                if stat.S_ISLNK(mode):
                    raise InvalidAdapter(
                        f"archive member {info.filename!r} is a link", "unsafe_archive"
                    )
                if info.flag_bits & 0x1:
                    raise _invalid(f"archive member {info.filename!r} is encrypted")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise _invalid(
                        f"archive member {info.filename!r} uses compression method "
                        f"{info.compress_type}; {_ONLY}"
                    )
                is_dir = info.is_dir()
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise InvalidAdapter(
                        f"archive member {info.filename!r} is not a regular file",
                        "unsafe_archive",
                    )
                target = collector.add(
                    path, info.file_size, is_dir=is_dir, executable=bool(mode & 0o111)
                )
                if target is not None:
                    wanted.append((info, target))
            collector.finish()
            for info, target in wanted:
                with zf.open(info) as src, (dest / target).open("wb") as out:
                    _copy_bounded(src, out, info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise _invalid(f"corrupt zip archive: {exc}") from exc
    except OSError as exc:
        raise _invalid(f"unreadable zip archive: {exc.strerror or exc}") from exc


def _copy_bounded(src: BinaryIO, out: BinaryIO, declared: int) -> None:
    """Copy at most the declared size: a member that inflates past its header is refused."""
    copied = 0
    while chunk := src.read(_COPY_CHUNK):
        copied += len(chunk)
        if copied > declared:
            raise _invalid("archive member is larger than its header says")
        out.write(chunk)


# ---- folders -----------------------------------------------------------------------------------


def copy_adapter_folder(
    src: Path, dest: Path, max_bytes: int, *, links_within: Path | None = None
) -> Path:
    """Copy the two adapter files of a server-side PEFT folder into the new folder `dest`.

    Other files in the folder are ignored and never named in an error (the folder is the
    server's, not the caller's). The two files must be regular files; links are refused unless
    `links_within` is given (a hub cache's snapshot links into its blobs), and then they must
    resolve inside it. Messages never show a server path."""
    if not src.is_dir():
        raise InvalidAdapter("the adapter source is not a folder", "not_a_folder")
    opened: list[tuple[str, int]] = []
    try:
        for name in sorted(REQUIRED_FILES):
            opened.append((name, _open_regular(src / name, links_within)))
        total = sum(os.fstat(fd).st_size for _, fd in opened)
        if total > max_bytes:
            raise AdapterTooLarge(f"adapter is {total} bytes, over the limit of {max_bytes}")
        dest.mkdir(parents=True, exist_ok=False)
        for name, fd in opened:
            with os.fdopen(os.dup(fd), "rb") as fin, (dest / name).open("wb") as out:
                _copy_bounded(fin, out, os.fstat(fd).st_size)
    finally:
        for _, fd in opened:
            os.close(fd)
    return dest


def _open_regular(path: Path, links_within: Path | None) -> int:
    name = path.name
    if links_within is not None and path.is_symlink():
        resolved = path.resolve()
        if not resolved.is_relative_to(links_within.resolve()):
            raise InvalidAdapter(f"{name} links outside the hub cache", "unsafe_archive")
        path = resolved
    if not path.exists() and not path.is_symlink():
        if name == WEIGHTS_FILE and path.with_name("adapter_model.bin").exists():
            raise InvalidAdapter(
                "the folder holds pickle weights (adapter_model.bin); only safetensors weights "
                "are accepted (save with safe_serialization=True)",
                "pickle_weights_refused",
            )
        raise InvalidAdapter(f"the folder lacks {name}", "missing_file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidAdapter(f"{name} is a link or cannot be read", "unsafe_archive") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidAdapter(f"{name} is not a regular file", "unsafe_archive")
    return fd
