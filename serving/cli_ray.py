"""`tenantlora ray serve`: tenantlora on Ray Serve (serving/ray_serve.py), N engine replicas
behind a gateway that routes requests for an adapter to the replicas that already loaded it.

    tenantlora ray serve --replicas 2 --port 8000       # starts a local Ray cluster
    tenantlora ray serve --address auto --replicas 4    # on a running Ray cluster
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    ray = subparsers.add_parser("ray", help="Scale out on Ray Serve (pip install -e '.[ray]').")
    sub = ray.add_subparsers(dest="ray_command", required=True)
    serve = sub.add_parser(
        "serve",
        help="Run N engine replicas behind an adapter-aware gateway.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--address", default=None, help="Ray cluster (default: start a local one)")
    serve.add_argument("--replicas", type=int, default=2)
    serve.add_argument("--engine-cpus", type=float, default=1.0)
    serve.add_argument("--host", default=None, help="default: TENANTLORA_HOST")
    serve.add_argument("--port", type=int, default=None, help="default: TENANTLORA_PORT")
    serve.set_defaults(func=run_ray_serve)


def run_ray_serve(args: argparse.Namespace) -> int:
    """Start (or join) a Ray cluster, deploy tenantlora, serve until SIGTERM or Ctrl-C."""
    import ray
    from ray import serve

    from serving.ray_serve import build_deployments
    from serving.settings import Settings

    settings = Settings()
    host, port = args.host or settings.host, args.port or settings.port
    if args.address:
        ray.init(address=args.address)
    else:
        # A local cluster: keep Ray's own services on loopback (Ray otherwise binds them to the
        # machine's address, ready for other nodes to join).
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's own processes
        ray_constants.ENABLE_RAY_CLUSTER = False  # this one (read when ray was imported)
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(
        build_deployments(settings, replicas=args.replicas, engine_cpus=args.engine_cpus),
        name="tenantlora",
        route_prefix="/",
    )
    print(f"tenantlora on Ray Serve: http://{host}:{port}/v1 ({args.replicas} replicas)")

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)  # containers and process managers stop with SIGTERM
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
