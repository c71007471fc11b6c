"""Issue 13, without the engine: archives are refused from their headers (fast, in little
memory), the store never loses files a live version uses, start-up reconciliation, allowed
folder roots, the hub cache layout, and the per-tenant upload slots."""

from __future__ import annotations

import io
import os
import tarfile
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import (
    adapter_archive,
    adapter_files,
    declared_huge_member_tar_gz,
    gzip_bytes,
    long_name_bomb,
    many_members_tar_gz,
    patch_zip_member,
    tar_gz_bytes,
    tar_header,
    zip_bytes,
    zip_with_huge_directory,
)

from adapters.archive import copy_adapter_folder, extract_archive
from adapters.errors import AdapterTooLarge, InvalidAdapter, QuotaExceeded, SourceNotAllowed
from adapters.registry import Registry
from adapters.service import AdapterService
from adapters.sources import fetch_hub_adapter, resolve_allowed_folder
from adapters.store import STALE_STAGING_SECONDS, AdapterStore
from adapters.validation import BaseModelSpec
from serving.errors import APIError
from serving.uploads import UploadSlots

MB = 1 << 20


def _refused(tmp_path: Path, data: bytes, max_bytes: int = 50 * MB) -> tuple[Exception, float, int]:
    """Extract `data`; return the error, the seconds and the peak bytes Python allocated."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises((InvalidAdapter, AdapterTooLarge)) as err:
            extract_archive(io.BytesIO(data), tmp_path / "out", max_bytes)
        return err.value, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert not (tmp_path / "out").exists()  # nothing left behind


@pytest.mark.parametrize(
    ("name", "data", "error"),
    [
        ("gnu long name, plain tar", long_name_bomb(), "invalid_archive"),
        ("gnu long name, gzip", gzip_bytes(long_name_bomb()), "invalid_archive"),
        ("200k members", many_members_tar_gz(), "invalid_archive"),
        ("4 GiB member", declared_huge_member_tar_gz(), "adapter_too_large"),
        ("pax record of 1 GiB", gzip_bytes(tar_header("x", 1 << 30, tarfile.XHDTYPE)), "invalid_archive"),
        ("11 MB zip directory", zip_with_huge_directory(), "invalid_archive"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "",
)  # fmt: skip
def test_hostile_archives_are_refused_from_headers(tmp_path, name, data, error):
    err, seconds, peak = _refused(tmp_path, data)
    assert err.code == error, (name, err)
    assert seconds < 1.0, (name, seconds)
    assert peak < 4 * MB, (name, peak)


def test_ignored_files_count_against_the_limit_and_are_not_inflated(tmp_path, adapter_dirs):
    readme = b"\0" * (60 * MB)  # compresses to ~60 kB
    data = tar_gz_bytes(adapter_files(adapter_dirs["a"], **{"README.md": readme}))
    err, seconds, peak = _refused(tmp_path, data, max_bytes=50 * MB)
    assert err.code == "adapter_too_large"
    assert peak < 4 * MB


@pytest.mark.parametrize("fmt", ["bz2", "xz"])
def test_only_gzip_tar_and_zip(tmp_path, adapter_dirs, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{fmt}") as tf:
        for name, path in adapter_files(adapter_dirs["a"]).items():
            tf.add(path, arcname=name)
    err, _, _ = _refused(tmp_path, buf.getvalue())
    assert err.code == "invalid_archive" and fmt.replace("bz2", "bzip2") in str(err)


def test_duplicate_names_are_refused(tmp_path, adapter_dirs):
    folder = adapter_dirs["a"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("adapter_config.json", (folder / "adapter_config.json").read_bytes())
        zf.writestr("adapter_model.safetensors", b"first")
        zf.writestr("adapter_model.safetensors", b"second")
    assert _refused(tmp_path, buf.getvalue())[0].code == "unsafe_archive"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tf:
        for content in (b"{}", b"{ }"):
            info = tarfile.TarInfo("adapter_config.json")
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    assert _refused(tmp_path, raw.getvalue())[0].code == "unsafe_archive"


def test_corrupt_archives_are_invalid_archive(tmp_path, adapter_dirs):
    good_tar = adapter_archive(adapter_dirs["a"])
    good_zip = zip_bytes(adapter_files(adapter_dirs["a"]))
    weights_at = good_zip.find(b"adapter_model.safetensors") + 200
    bad_crc = bytearray(good_zip)
    bad_crc[weights_at] ^= 0xFF
    cases = {
        "truncated gzip": good_tar[: len(good_tar) // 2],
        "gzip trailer cut": good_tar[:-4],
        "bad zip crc": bytes(bad_crc),
        "encrypted zip": patch_zip_member(good_zip, "adapter_model.safetensors", flag_bits=1),
        "unknown method": patch_zip_member(good_zip, "adapter_model.safetensors", method=99),
        "bzip2 member": patch_zip_member(good_zip, "adapter_config.json", method=12),
        "truncated zip": good_zip[: len(good_zip) // 2],
    }
    for name, data in cases.items():
        err, _, _ = _refused(tmp_path, data)
        assert err.code == "invalid_archive", (name, err)


def test_legitimate_long_names_and_folders_still_extract(tmp_path, adapter_dirs):
    folder = "x" * 150  # needs a GNU long-name record (tarfile's default format)
    data = tar_gz_bytes({f"{folder}/{k}": v for k, v in adapter_files(adapter_dirs["a"]).items()})
    out = extract_archive(io.BytesIO(data), tmp_path / "out", 50 * MB)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, path in adapter_files(adapter_dirs["a"]).items():
            tf.add(path, arcname=f"{'é' * 120}/{name}")  # pax path records
    extract_archive(io.BytesIO(buf.getvalue()), tmp_path / "out2", 50 * MB)


# ---- store: nothing a live version uses is ever removed ----------------------------------------


@pytest.fixture
def service(tmp_path, base_model_path) -> AdapterService:
    spec = BaseModelSpec.from_checkpoint("SmolLM2-135M-Instruct", base_model_path)
    return AdapterService(
        Registry(tmp_path / "registry.db"),
        AdapterStore(tmp_path / "store"),
        spec,
        max_rank=16,
        max_bytes=50 * MB,
    )


def _live_files_exist(service: AdapterService) -> None:
    for v in service.registry.live_versions():
        assert service.store.holds(Path(v.path)), v.engine_name


def test_failed_registration_keeps_files_another_registration_pinned(service, adapter_dirs):
    reg = service.registry
    full, _ = reg.create_tenant("full", max_adapters=1, max_bytes=1 << 30)
    ok, _ = reg.create_tenant("ok", max_adapters=10, max_bytes=1 << 30)
    service.register_folder(full, "first", adapter_dirs["b"])
    # `ok` is between its commit and its row (holds a pin) when `full`'s registration fails
    staged = service.store.new_staging_dir()
    copy_adapter_folder(adapter_dirs["a"], staged, 50 * MB)
    from adapters.validation import validate_adapter, write_config

    info = validate_adapter(staged, service.base, 16)
    write_config(staged, info)
    digest = service.store.digest(staged)
    pin = reg.pin_digest(digest)
    path, size = service.store.commit(staged, digest)
    with pytest.raises(QuotaExceeded):
        service.register_folder(full, "second", adapter_dirs["a"])  # same bytes, over quota
    assert service.store.holds(path)
    version = reg.add_version(
        ok, "mine", digest=digest, path=path, size_bytes=size, rank=8, alpha=16.0,
        target_modules=info.target_modules, base_model="b", source="upload", pin=pin,
    )  # fmt: skip
    _live_files_exist(service)
    # a purge of another tenant's deleted copy of the same bytes leaves `ok`'s files alone
    service.purge_files(service.delete(full, "first") + [version])
    assert service.store.holds(path)


def test_dedup_race_rounds_never_lose_live_files(service, adapter_dirs):
    """Two tenants register the same bytes at once, one over quota; others delete and purge
    the same content meanwhile. After every round each live version still has its files."""
    reg = service.registry
    for round_ in range(4):
        full, _ = reg.create_tenant(f"full{round_}", max_adapters=0, max_bytes=1 << 30)
        ok, _ = reg.create_tenant(f"ok{round_}", max_adapters=10, max_bytes=1 << 30)
        doomed, _ = reg.create_tenant(f"doomed{round_}", max_adapters=10, max_bytes=1 << 30)
        gone = service.register_folder(doomed, "tmp", adapter_dirs["c"])

        def fail(full=full):
            with pytest.raises(QuotaExceeded):
                service.register_folder(full, "x", adapter_dirs["c"])

        def purge(doomed=doomed):
            service.purge_files(service.delete(doomed, "tmp"))

        with ThreadPoolExecutor(3) as pool:
            jobs = [
                pool.submit(fail),
                pool.submit(service.register_folder, ok, "x", adapter_dirs["c"]),
                pool.submit(purge),
            ]
            for job in jobs:
                job.result()
        assert gone.digest == reg.find_live(ok, "x").digest
        _live_files_exist(service)


def test_purge_removes_unused_files_only(service, adapter_dirs):
    reg = service.registry
    t, _ = reg.create_tenant("t", max_adapters=10, max_bytes=1 << 30)
    one = service.register_folder(t, "one", adapter_dirs["a"])
    two = service.register_folder(t, "two", adapter_dirs["a"])
    assert one.path == two.path
    service.purge_files(service.delete(t, "one"))
    assert service.store.holds(Path(two.path))
    service.purge_files(service.delete(t, "two"))
    assert not Path(two.path).exists()


def test_commit_fsyncs_the_parent_folders(service, adapter_dirs, monkeypatch):
    import adapters.store as store_module

    synced: list[Path] = []
    real = store_module.fsync_dir
    monkeypatch.setattr(store_module, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    t, _ = service.registry.create_tenant("t", max_adapters=10, max_bytes=1 << 30)
    version = service.register_folder(t, "one", adapter_dirs["a"])
    final = Path(version.path)
    assert final.parent in synced and service.store.root in synced
    assert synced.index(final.parent) > 0  # after the staged folder itself


def test_start_up_reconciliation(service, adapter_dirs, caplog):
    reg, store = service.registry, service.store
    t, _ = reg.create_tenant("t", max_adapters=10, max_bytes=1 << 30)
    kept = service.register_folder(t, "kept", adapter_dirs["a"])
    lost = service.register_folder(t, "lost", adapter_dirs["b"])
    unpurged = service.register_folder(t, "unpurged", adapter_dirs["c"])
    service.delete(t, "unpurged")  # deleted; the purge task never ran (shutdown)
    for f in Path(lost.path).iterdir():
        f.unlink()
    orphan = store.path_for("ab" * 32)
    orphan.mkdir(parents=True)
    (orphan / "adapter_config.json").write_text("{}")
    stale = store.staging / "old-upload"
    stale.mkdir()
    fresh = store.staging / "in-progress"
    fresh.mkdir()
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    with reg._tx() as db:  # a pin an interrupted registration left
        db.execute("INSERT INTO store_pins (digest, created_at) VALUES (?, ?)", ("cd" * 32, old))
    with caplog.at_level("INFO"):
        result = service.reconcile()
    assert result.missing == (lost.engine_name,)
    assert result.orphans_removed == 2 and result.staging_removed == 1 and result.stale_pins == 1
    assert not orphan.exists() and not Path(unpurged.path).exists()
    assert not stale.exists() and fresh.exists()
    assert store.holds(Path(kept.path))
    assert reg.find_live(t, "lost") is not None  # reported, never dropped
    assert lost.engine_name in caplog.text


# ---- admin sources -----------------------------------------------------------------------------


def test_folder_roots(tmp_path, adapter_dirs):
    root = tmp_path / "root"
    inside = root / "adapter"
    inside.mkdir(parents=True)
    with pytest.raises(SourceNotAllowed):
        resolve_allowed_folder(str(inside), [])
    assert resolve_allowed_folder(str(inside), [root]) == inside.resolve()
    (root / "escape").symlink_to(adapter_dirs["a"])  # a link inside the root leading out
    for raw in (str(adapter_dirs["a"]), str(root / "escape"), f"{root}/../{adapter_dirs['a']}"):
        with pytest.raises(SourceNotAllowed) as err:
            resolve_allowed_folder(raw, [root])
        assert "/" not in str(err.value).replace("`path`", "")  # no server path echoed
    with pytest.raises(InvalidAdapter) as err:
        resolve_allowed_folder("relative/x", [root])
    assert err.value.code == "invalid_path"


def test_folder_copy_refuses_fifos_and_links_and_names_no_files(tmp_path, adapter_dirs):
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_bytes(
        (adapter_dirs["a"] / "adapter_config.json").read_bytes()
    )
    (src / "secret-plan.txt").write_text("x")
    os.mkfifo(src / "adapter_model.safetensors")
    started = time.monotonic()
    with pytest.raises(InvalidAdapter) as err:
        copy_adapter_folder(src, tmp_path / "out", 50 * MB)
    assert err.value.code == "unsafe_archive" and time.monotonic() - started < 2
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.safetensors").symlink_to(adapter_dirs["a"] / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapter) as err:
        copy_adapter_folder(src, tmp_path / "out", 50 * MB)
    assert err.value.code == "unsafe_archive"
    (src / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapter) as err:
        copy_adapter_folder(src, tmp_path / "out", 50 * MB)
    assert err.value.code == "missing_file"
    assert "secret-plan" not in str(err.value) and str(tmp_path) not in str(err.value)


def _hub_cache(cache: Path, folder: Path, revision: str = "c0ffee" * 6 + "abcd") -> Path:
    """The hub cache's layout: snapshots/<rev>/<file> -> ../../blobs/<sha>, refs/main."""
    import hashlib

    repo = cache / "models--acme--support-lora"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snap


def test_hub_registration_from_a_local_cache(tmp_path, service, adapter_dirs):
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, adapter_dirs["d"])
    for revision in (None, snap.name):
        snapshot, repo = fetch_hub_adapter(
            "acme/support-lora", revision, max_bytes=50 * MB, cache_dir=cache, local_files_only=True
        )
        assert snapshot == snap
    t, _ = service.registry.create_tenant("t", max_adapters=10, max_bytes=1 << 30)
    version = service.register_folder(
        t, "from-hub", snapshot, "hub:acme/support-lora", links_within=repo
    )
    assert version.public_dict()["source"] == "hub:acme/support-lora"
    assert service.store.holds(Path(version.path))
    with pytest.raises(AdapterTooLarge):
        copy_adapter_folder(snapshot, tmp_path / "small", 1000, links_within=repo)
    # a snapshot link that leads out of the repository's cache folder is refused
    (snap / "adapter_config.json").unlink()
    (snap / "adapter_config.json").symlink_to(adapter_dirs["d"] / "adapter_config.json")
    with pytest.raises(InvalidAdapter) as err:
        copy_adapter_folder(snapshot, tmp_path / "out", 50 * MB, links_within=repo)
    assert err.value.code == "unsafe_archive"
    with pytest.raises(InvalidAdapter) as err:
        fetch_hub_adapter("acme/missing", None, max_bytes=1, cache_dir=cache, local_files_only=True)
    assert err.value.code == "hub_fetch_failed" and str(cache) not in str(err.value)
    for bad in ("../etc", "a/b/c", "x y"):
        with pytest.raises(InvalidAdapter):
            fetch_hub_adapter(bad, None, max_bytes=1, cache_dir=cache, local_files_only=True)


def test_sources_never_show_server_paths(service, adapter_dirs):
    t, _ = service.registry.create_tenant("t", max_adapters=10, max_bytes=1 << 30)
    assert service.register_folder(t, "f", adapter_dirs["a"]).public_dict()["source"] == "folder"
    assert service.ensure_static("s", adapter_dirs["b"]).public_dict()["source"] == "static"
    with service.registry._tx() as db:  # a row written by an older version
        db.execute("UPDATE adapter_versions SET source = ?", (f"static:{adapter_dirs['b']}",))
    assert service.registry.find_live(t, "f").public_dict()["source"] == "static"


def test_quota_is_checked_before_the_body(service, adapter_dirs):
    t, _ = service.registry.create_tenant("t", max_adapters=1, max_bytes=1 << 30)
    service.check_room(t)
    service.register_folder(t, "one", adapter_dirs["a"])
    with pytest.raises(QuotaExceeded):
        service.check_room(t)


def test_upload_slots_per_tenant():
    slots = UploadSlots(1)
    with slots.hold(1):
        with slots.hold(2):  # another tenant is not limited by this one
            pass
        with pytest.raises(APIError) as err, slots.hold(1):
            pass
        assert err.value.status == 429 and err.value.code == "too_many_uploads"
        assert err.value.headers["Retry-After"]
    with slots.hold(1):
        pass
