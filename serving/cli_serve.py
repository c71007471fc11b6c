"""`tenantlora serve`, `tenantlora models prepare` and `tenantlora settings`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import get_args

from serving.cli import LOG_LEVELS
from serving.settings import Settings

# CLI flag -> settings field, for flags that map one to one.
_SERVE_FLAGS: dict[str, dict] = {
    "host": {"type": str},
    "port": {"type": int},
    "base_model": {"type": str},
    "served_model_name": {"type": str},
    "data_dir": {"type": str},
    "database_url": {"type": str},
    "max_loras": {"type": int},
    "max_cpu_loras": {"type": int},
    "max_lora_rank": {"type": int},
    "max_model_len": {"type": int},
    "memory_share": {"type": float},
    "kv_cache_gib": {"type": float},
    "dtype": {"type": str},
    "lora_dtype": {
        "type": str,
        "choices": get_args(Settings.model_fields["lora_dtype"].annotation),
    },
    "max_num_seqs": {"type": int},
    "cpu_threads": {"type": int},
    "max_adapter_bytes": {"type": int},
    "tenant_max_adapters": {"type": int},
    "tenant_max_bytes": {"type": int},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="Run the OpenAI-compatible multi-LoRA server.")
    for field, kwargs in _SERVE_FLAGS.items():
        info = Settings.model_fields[field]
        serve.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            default=None,
            help=info.description,
            **kwargs,
        )
    serve.add_argument(
        "--lora",
        dest="loras",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="Register a local PEFT adapter folder at start-up (repeatable).",
    )
    serve.add_argument(
        "--cpu-lora-ops",
        dest="cpu_lora_ops",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tenantlora's grouped CPU LoRA ops (vLLM plugin; on by default, "
        "--no-cpu-lora-ops runs vLLM's own).",
    )
    serve.add_argument(
        "--cpu-worker-process",
        dest="cpu_worker_process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=Settings.model_fields["cpu_worker_process"].description,
    )
    serve.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_true",
        default=None,
        help=Settings.model_fields["enforce_eager"].description,
    )
    serve.add_argument(
        "--require-auth",
        dest="auth_required",
        action="store_true",
        default=None,
        help="Require a tenant API key on the OpenAI routes.",
    )
    serve.add_argument(
        "--log-level",
        dest="log_level",
        type=str.lower,
        choices=LOG_LEVELS,
        # Unset here leaves the global `tenantlora --log-level` (or its default) in place.
        default=argparse.SUPPRESS,
        help=Settings.model_fields["log_level"].description
        + " Also vLLM's (VLLM_LOGGING_LEVEL) and uvicorn's.",
    )
    serve.set_defaults(func=run_serve)

    table = subparsers.add_parser(
        "settings", help="Print the settings table (environment, flag, default) as Markdown."
    )
    table.set_defaults(func=run_settings)

    models = subparsers.add_parser("models", help="Base model utilities.")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser(
        "prepare", help="Prepare the base model (convert the embedded SmolLM2 GGUF to safetensors)."
    )
    prepare.add_argument("--base-model", dest="base_model", default=None)
    prepare.add_argument("--data-dir", dest="data_dir", default=None)
    prepare.add_argument("--force", action="store_true", help="Convert again even if prepared.")
    prepare.set_defaults(func=run_prepare)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment variables first, then any flag given on the command line."""
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key in Settings.model_fields and value is not None
    }
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app

    settings = settings_from_args(args)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.log_level.upper())
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    )
    app.state.server = server
    server.run()
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from serving.base_model import DEFAULT_BASE_MODEL, prepare_embedded, resolve_base_model

    settings = settings_from_args(args)
    if settings.base_model == DEFAULT_BASE_MODEL:
        path = prepare_embedded(settings.models_dir, force=args.force)
    else:
        path = resolve_base_model(settings.base_model, settings.models_dir)
    print(path)
    return 0


def serve_flags() -> dict[str, str]:
    """Settings field -> the `tenantlora serve` flag that sets it, as the README shows it."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    flags: dict[str, str] = {}
    for action in serve._actions:  # noqa: SLF001
        longs = [s for s in action.option_strings if s.startswith("--")]
        if action.dest not in Settings.model_fields or not longs:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            flags[action.dest] = "--[no-]" + longs[0].removeprefix("--")
        elif action.metavar:
            flags[action.dest] = f"{longs[0]} {action.metavar}"
        else:
            flags[action.dest] = longs[0]
    return flags


def _default_cell(name: str) -> str:
    info = Settings.model_fields[name]
    value = info.get_default(call_default_factory=True)
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        home = str(Path.home())
        return f"`{str(value).replace(home, '~', 1)}`"
    return f"`{value}`"


def settings_table() -> str:
    """The README's settings table, generated from the settings object."""
    flags = serve_flags()
    lines = ["| environment | flag | default | meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        flag = f"`{flags[name]}`" if name in flags else "(environment only)"
        description = (info.description or "").replace("|", "\\|")
        lines.append(
            f"| `TENANTLORA_{name.upper()}` | {flag} | {_default_cell(name)} | {description} |"
        )
    return "\n".join(lines)


def run_settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0
