"""`tenantlora tenants ...` and `tenantlora adapters ...`: talk to a running server over HTTP.

The server address and key come from flags or from TENANTLORA_URL and TENANTLORA_API_KEY
(TENANTLORA_ADMIN_KEY for tenant management)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import httpx

from adapters.archive import CONFIG_FILE, WEIGHTS_FILE


def _common(parser: argparse.ArgumentParser, admin: bool = False) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("TENANTLORA_URL", "http://127.0.0.1:8000"),
        help="Server URL.",
    )
    env = "TENANTLORA_ADMIN_KEY" if admin else "TENANTLORA_API_KEY"
    parser.add_argument("--key", default=os.environ.get(env), help=f"API key (default: ${env}).")


def register(subparsers: argparse._SubParsersAction) -> None:
    tenants = subparsers.add_parser("tenants", help="Manage tenants on a running server (admin).")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tsub.add_parser("create", help="Create a tenant; prints its API key once.")
    create.add_argument("name")
    create.add_argument("--max-adapters", type=int)
    create.add_argument("--max-bytes", type=int)
    _common(create, admin=True)
    create.set_defaults(func=_tenants_create)
    tlist = tsub.add_parser("list", help="List tenants.")
    _common(tlist, admin=True)
    tlist.set_defaults(func=_tenants_list)

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


def _call(args, method: str, path: str, **kwargs) -> dict:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    response = httpx.request(
        method, args.url.rstrip("/") + path, headers=headers, timeout=600, **kwargs
    )
    body = response.json()
    if response.status_code >= 400:
        error = body.get("error", {})
        sys.exit(f"error {response.status_code} ({error.get('code')}): {error.get('message')}")
    return body


def _print(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


def _tenants_create(args) -> int:
    body = {"name": args.name, "max_adapters": args.max_adapters, "max_bytes": args.max_bytes}
    return _print(_call(args, "POST", "/v1/tenants", json={k: v for k, v in body.items() if v}))


def _tenants_list(args) -> int:
    return _print(_call(args, "GET", "/v1/tenants")["data"])


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
