"""`tenantlora tenants|keys|usage|adapters ...`: talk to a running server over HTTP.

The server address comes from `--url` or TENANTLORA_URL; the key from `--key`, else
TENANTLORA_ADMIN_KEY for admin commands (tenants, and keys/usage with `--tenant`) and
TENANTLORA_API_KEY for a tenant's own (adapters, keys and usage without `--tenant`). No command
prints an API key except the one it has just created."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import httpx

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE
from adapters.registry import TENANT_LIMITS

# Per-tenant settings the admin sets: flag type by field (unset limits use the server default).
TENANT_FIELDS: dict[str, type] = {
    "max_adapters": int,
    "max_bytes": int,
    **{limit: int for limit in TENANT_LIMITS},
    "weight": float,
}


def _common(parser: argparse.ArgumentParser, admin: bool | None = False) -> None:
    """--url and --key. `admin` None: the key's default depends on --tenant (see `_key`)."""
    parser.add_argument(
        "--url",
        default=os.environ.get("TENANTLORA_URL", "http://127.0.0.1:8000"),
        help="Server URL.",
    )
    default_env = {True: "$TENANTLORA_ADMIN_KEY", False: "$TENANTLORA_API_KEY"}.get(
        admin, "$TENANTLORA_ADMIN_KEY with --tenant, else $TENANTLORA_API_KEY"
    )
    parser.add_argument("--key", help=f"API key (default: {default_env}).")
    parser.set_defaults(admin=admin)


def _tenant_flags(parser: argparse.ArgumentParser) -> None:
    for field, kind in TENANT_FIELDS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind, metavar="N")


def register(subparsers: argparse._SubParsersAction) -> None:
    tenants = subparsers.add_parser("tenants", help="Manage tenants on a running server (admin).")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tsub.add_parser("create", help="Create a tenant; prints its first API key once.")
    create.add_argument("name")
    _tenant_flags(create)
    _common(create, admin=True)
    create.set_defaults(func=_tenants_create)
    tlist = tsub.add_parser("list", help="List tenants with their quotas and limits.")
    _common(tlist, admin=True)
    tlist.set_defaults(func=_tenants_list)
    show = tsub.add_parser("show", help="Show one tenant (JSON).")
    show.add_argument("name")
    _common(show, admin=True)
    show.set_defaults(func=_tenants_show)
    update = tsub.add_parser(
        "update", help="Change quotas and limits; --reset FIELD returns a limit to the default."
    )
    update.add_argument("name")
    _tenant_flags(update)
    update.add_argument(
        "--reset", action="append", default=[], choices=TENANT_LIMITS, metavar="LIMIT",
        help=f"Back to the server's default (repeatable): {', '.join(TENANT_LIMITS)}.",
    )  # fmt: skip
    _common(update, admin=True)
    update.set_defaults(func=_tenants_update)
    delete = tsub.add_parser(
        "delete", help="Delete a tenant: its keys stop at once, its adapters are removed."
    )
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="Do it (required).")
    _common(delete, admin=True)
    delete.set_defaults(func=_tenants_delete)

    keys = subparsers.add_parser(
        "keys", help="Manage API keys: your own, or any tenant's with --tenant (admin)."
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kcreate = ksub.add_parser("create", help="Create a key; prints it once.")
    kcreate.add_argument("--name", help="A label to tell keys apart.")
    expiry = kcreate.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=int, metavar="SECONDS", help="Expire after N s.")
    expiry.add_argument(
        "--expires-at", metavar="TIME", help="Expire at a UTC time: 2030-01-31 or 2030-01-31T12:00."
    )
    klist = ksub.add_parser("list", help="List keys by prefix, creation and state.")
    revoke = ksub.add_parser("revoke", help="Revoke a key by id (it stops working at once).")
    revoke.add_argument("key_id")
    for parser, func in ((kcreate, _keys_create), (klist, _keys_list), (revoke, _keys_revoke)):
        parser.add_argument("--tenant", help="Act for this tenant (needs the admin key).")
        _common(parser, admin=None)
        parser.set_defaults(func=func)

    usage = subparsers.add_parser(
        "usage", help="Requests and tokens per day and model (yours; all tenants for the admin)."
    )
    usage.add_argument("--start", help="First UTC day, YYYY-MM-DD (default: 30 days ago).")
    usage.add_argument("--end", help="Last UTC day, YYYY-MM-DD (default: today).")
    usage.add_argument("--tenant", help="One tenant only (admin).")
    usage.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    _common(usage, admin=None)
    usage.set_defaults(func=_usage)

    adapters = subparsers.add_parser("adapters", help="Manage your adapters on a running server.")
    asub = adapters.add_subparsers(dest="adapters_command", required=True)
    add = asub.add_parser("add", help="Upload a PEFT adapter folder or archive under a name.")
    add.add_argument("name")
    add.add_argument("path", type=Path, help="PEFT adapter folder, .tar.gz or .zip.")
    _common(add)
    add.set_defaults(func=_adapters_add)
    alist = asub.add_parser("list", help="List the adapters you can use.")
    _common(alist)
    alist.set_defaults(func=_adapters_list)
    rm = asub.add_parser("rm", help="Delete an adapter (all versions, or NAME@N).")
    rm.add_argument("name")
    _common(rm)
    rm.set_defaults(func=_adapters_rm)


def _key(args) -> str | None:
    if args.key:
        return args.key
    admin = args.admin if args.admin is not None else bool(getattr(args, "tenant", None))
    if admin:
        return os.environ.get("TENANTLORA_ADMIN_KEY")
    return os.environ.get("TENANTLORA_API_KEY") or os.environ.get("TENANTLORA_ADMIN_KEY")


def _call(args, method: str, path: str, **kwargs) -> dict:
    key = _key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(
            method, args.url.rstrip("/") + path, headers=headers, timeout=600, **kwargs
        )
    except httpx.HTTPError as exc:
        sys.exit(f"error: cannot reach {args.url}: {exc}")
    try:
        body = response.json()
    except ValueError:
        sys.exit(f"error {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        sys.exit(f"error {response.status_code} ({error.get('code')}): {error.get('message')}")
    return body


def _print(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def _table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _when(timestamp: int | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def _fields(args) -> dict:
    return {f: getattr(args, f) for f in TENANT_FIELDS if getattr(args, f) is not None}


def _tenants_create(args) -> int:
    return _print(_call(args, "POST", "/v1/tenants", json={"name": args.name, **_fields(args)}))


def _tenants_list(args) -> int:
    rows = _call(args, "GET", "/v1/tenants")["data"]
    _table(
        ["name", *TENANT_FIELDS, "created"],
        [[t["name"], *(t[f] for f in TENANT_FIELDS), _when(t["created"])] for t in rows],
    )
    return 0


def _tenants_show(args) -> int:
    return _print(_call(args, "GET", f"/v1/tenants/{args.name}"))


def _tenants_update(args) -> int:
    body = {**_fields(args), **dict.fromkeys(args.reset)}
    if not body:
        sys.exit("error: nothing to change: give --FIELD VALUE or --reset LIMIT")
    return _print(_call(args, "PATCH", f"/v1/tenants/{args.name}", json=body))


def _tenants_delete(args) -> int:
    if not args.yes:
        sys.exit(f"error: deleting {args.name!r} removes its keys and adapters; add --yes")
    return _print(_call(args, "DELETE", f"/v1/tenants/{args.name}"))


def _keys_path(args) -> str:
    return f"/v1/tenants/{args.tenant}/keys" if args.tenant else "/v1/keys"


def _keys_create(args) -> int:
    body: dict = {"name": args.name} if args.name else {}
    if args.expires_in is not None:
        body["expires_in_seconds"] = args.expires_in
    if args.expires_at:
        try:
            when = datetime.fromisoformat(args.expires_at)
        except ValueError:
            sys.exit("error: --expires-at expects a time like 2030-01-31 or 2030-01-31T12:00")
        body["expires_at"] = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    return _print(_call(args, "POST", _keys_path(args), json=body))


def _keys_list(args) -> int:
    rows = _call(args, "GET", _keys_path(args))["data"]
    _table(
        ["id", "prefix", "name", "created", "expires", "revoked", "last used", "active"],
        [
            [
                k["id"],
                k["prefix"] or "(initial)",
                k["name"],
                _when(k["created"]),
                _when(k["expires_at"]),
                _when(k["revoked_at"]),
                _when(k["last_used_at"]),
                "yes" if k["active"] else "no",
            ]
            for k in rows
        ],
    )
    return 0


def _keys_revoke(args) -> int:
    return _print(_call(args, "DELETE", f"{_keys_path(args)}/{args.key_id}"))


def _usage(args) -> int:
    params = {k: getattr(args, k) for k in ("start", "end", "tenant") if getattr(args, k)}
    body = _call(args, "GET", "/v1/usage", params=params)
    if args.json:
        return _print(body)
    rows = body["data"]
    counts = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    totals = [sum(r[c] for r in rows) for c in counts]
    print(f"usage {body['start']} .. {body['end']} (UTC days)")
    _table(
        ["date", "tenant", "model", "requests", "prompt", "completion", "total"],
        [[r["date"], r["tenant"], r["model"], *(r[c] for c in counts)] for r in rows]
        + [["total", "", "", *totals]],
    )
    return 0


def archive_folder(folder: Path) -> bytes:
    """A .tar.gz of the two files the server accepts from a PEFT adapter folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            tf.add(folder / name, arcname=name)
    return buf.getvalue()


def _adapters_add(args) -> int:
    data = archive_folder(args.path) if args.path.is_dir() else args.path.read_bytes()
    files = {"file": (args.path.name + (".tar.gz" if args.path.is_dir() else ""), data)}
    return _print(_call(args, "POST", "/v1/adapters", data={"name": args.name}, files=files))


def _adapters_list(args) -> int:
    rows = _call(args, "GET", "/v1/adapters")["data"]
    for row in rows:
        print(
            f"{row['id']:<32} owner={row['owner']:<12} rank={row['rank']:<3} {row['size_bytes']:>10} B"
        )
    return 0


def _adapters_rm(args) -> int:
    return _print(_call(args, "DELETE", f"/v1/adapters/{args.name}"))
