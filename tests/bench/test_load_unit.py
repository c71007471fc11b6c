"""The load generator's pure parts: distributions, Zipf popularity, schedule, percentiles."""

from __future__ import annotations

import random

import pytest

from benchmarks.load import LengthDist, LoadConfig, Target, percentiles, plan, zipf_weights


def test_length_distributions_parse_and_sample() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("64").sample(rng) == 64
    uni = LengthDist.parse("uniform:10:20")
    assert all(10 <= uni.sample(rng) <= 20 for _ in range(200))
    assert all(LengthDist.parse("normal:5:50").sample(rng) >= 1 for _ in range(200))
    with pytest.raises(ValueError):
        LengthDist.parse("poisson:3")


def test_zipf_weights_rank_order() -> None:
    w = zipf_weights(8, 1.1)
    assert abs(sum(w) - 1) < 1e-9
    assert all(a > b for a, b in zip(w, w[1:], strict=False))
    assert zipf_weights(4, 0.0) == [0.25] * 4


def test_plan_is_seeded_bounded_and_poisson() -> None:
    targets = [Target(f"m{i}", "http://127.0.0.1:1/v1") for i in range(16)]
    cfg = LoadConfig(targets=targets, rate=4.0, concurrency=None, requests=2000, zipf=1.2)
    a, b = plan(cfg), plan(cfg)
    assert [x.target for x in a] == [x.target for x in b]
    assert len(a) == 2000
    arrivals = [x.arrival for x in a]
    assert arrivals == sorted(arrivals)
    assert 3.5 < 2000 / arrivals[-1] < 4.5  # mean rate close to 4 req/s
    counts = {t.model: 0 for t in targets}
    for x in a:
        counts[x.target.model] += 1
    assert counts["m0"] > counts["m1"] > counts["m15"]


def test_config_requires_bounds() -> None:
    t = [Target("m", "http://127.0.0.1:1/v1")]
    with pytest.raises(ValueError):
        LoadConfig(targets=t, requests=0)
    with pytest.raises(ValueError):
        LoadConfig(targets=t, rate=None, concurrency=None)
    with pytest.raises(ValueError):
        LoadConfig(targets=[])


def test_percentiles() -> None:
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0], scale=1.0)
    assert p["p50"] == 3.0 and p["mean"] == 3.0
    assert 4.9 < p["p99"] <= 5.0
    assert percentiles([])["p50"] is None
