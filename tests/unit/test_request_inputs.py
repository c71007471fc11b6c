"""The request path's own input rules, without an engine: strict JSON bodies, model names that
can name no adapter, and the server-set prefix-cache salt."""

from __future__ import annotations

import json

import pytest

from serving.cache_salt import CacheSalts
from serving.errors import APIError
from serving.json_body import parse_json
from serving.resolver import parse_model_name


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": [1, -Infinity]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 70 + b"1" + b"}" * 70,
        b'{"a": 1',
        b"\xff\xfe",
    ],
)
def test_bad_json_is_a_400(raw):
    with pytest.raises(APIError) as exc:
        parse_json(raw, max_depth=64)
    assert exc.value.status == 400 and exc.value.code == "invalid_json"


def test_good_json_passes():
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    assert parse_json(json.dumps(body).encode(), max_depth=64) == body


@pytest.mark.parametrize(
    ("model", "parsed"),
    [
        ("support", ("support", None)),
        ("support@3", ("support", 3)),
        ("a@b@2", None),  # `@` is not allowed in names
        ("x@999999999999999999", None),
        ("x@²", None),
        ("x@", None),
        ("../x", None),
        ("", None),
        ("a" * 65, None),
    ],
)
def test_model_names(model, parsed):
    assert parse_model_name(model) == parsed


def test_cache_salts_are_per_tenant_and_namespace_client_salts():
    salts = CacheSalts()
    a, b = salts.salt_for(1, None, on_base=True), salts.salt_for(2, None, on_base=True)
    assert a and b and a != b
    assert salts.salt_for(1, "x", on_base=False) != salts.salt_for(2, "x", on_base=False)
    assert salts.salt_for(1, "x", on_base=False) != "x"
    assert salts.salt_for(1, None, on_base=False) == a  # stable within the process
    assert CacheSalts().salt_for(1, None, on_base=True) != a  # a new secret per process
    shared = CacheSalts(share_base=True)
    assert shared.salt_for(1, None, on_base=True) is None
    assert shared.salt_for(1, None, on_base=False) is not None
    assert shared.salt_for(1, "mine", on_base=True) is not None
