"""`tenantlora serve` and `tenantlora models prepare`."""

from __future__ import annotations

import argparse
import os

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
    "max_num_seqs": {"type": int},
    "max_adapter_bytes": {"type": int},
    "tenant_max_adapters": {"type": int},
    "tenant_max_bytes": {"type": int},
    "log_level": {"type": str},
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
    serve.set_defaults(func=run_serve)

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
