"""The benchmark's quiet-machine meter and roofline arithmetic, without servers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.quiet import ForeignCpuMeter, _cpu_seconds, _own_pids
from benchmarks.roofline import matmul_rate, model_params


def test_foreign_cpu_counts_other_processes_not_our_children(tmp_path: Path) -> None:
    busy = "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
    child = subprocess.Popen([sys.executable, "-c", busy])  # ours: never foreign
    pidfile = tmp_path / "pid"
    # Not ours: its parent shell exits at once, so it is nobody's child here.
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{busy}' & echo $! > {pidfile}"], check=True)
    orphan = int(pidfile.read_text())
    meter = ForeignCpuMeter()
    meter.start()
    time.sleep(1.0)
    counted = _cpu_seconds(_own_pids())
    quiet = meter.stop()
    child.wait()
    assert child.pid in _own_pids() or child.poll() is not None
    assert child.pid not in counted and orphan in counted
    assert quiet.foreign_cpu_s >= 0.5  # at least the orphan's second of CPU
    assert 0 < quiet.foreign_share <= 1.0


def test_model_params_match_the_checkpoint(base_model_path: Path) -> None:
    """Matmul parameters from config.json equal the 2-D tensors in the safetensors file (the
    norms' vectors are not matmul weights)."""
    header_total = 0
    for f in base_model_path.glob("*.safetensors"):
        raw = f.read_bytes()[:8]
        n = int.from_bytes(raw, "little")
        with f.open("rb") as fh:
            fh.seek(8)
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and len(meta["shape"]) == 2:
                count = 1
                for d in meta["shape"]:
                    count *= d
                header_total += count
    assert model_params(base_model_path) == header_total


def test_matmul_rate_is_measured() -> None:
    rate = matmul_rate("float32", 1, (64, 256, 256))
    assert rate.gflops > 0.1 and rate.threads == 1
