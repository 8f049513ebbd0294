"""`kvlm serve --replicas N`: the same server, as a Ray Serve application of N engine
replicas (the optional `ray` extra; see docs/scaling.md)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kvlm.cli.common import CLIError
from kvlm.engine.config import EngineConfig

ROUTING_CHOICES = ("prefix", "round_robin", "pow2")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Ray Serve (scale out; needs `pip install kvlm[ray]`)",
        "With --replicas or --autoscaling-config, the server runs on Ray Serve: one engine per "
        "replica (each with --threads), sharing the --kv-offload tiers (give a redis:// tier "
        "so replicas share prefixes), behind one ingress on --host/--port.",
    )
    group.add_argument("--replicas", type=int, default=None, metavar="N", help="engine replicas")
    group.add_argument(
        "--autoscaling-config",
        default=None,
        metavar="JSON",
        help="Serve's autoscaling_config instead of --replicas, e.g. "
        '\'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}\'',
    )
    group.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        help="Ray CPUs each replica reserves (default: --threads, else 1)",
    )
    group.add_argument(
        "--replica-gpus", type=float, default=0.0, help="Ray GPUs each replica reserves (0)"
    )
    group.add_argument(
        "--routing",
        default="prefix",
        choices=ROUTING_CHOICES,
        help="prefix: the replica that holds the prompt's prefix unless it is busy (default); "
        "round_robin; pow2: Serve's default (the less loaded of two random replicas)",
    )
    group.add_argument(
        "--max-imbalance",
        type=int,
        default=None,
        help="prefix routing: a replica this many ongoing requests above the least-loaded "
        "one is busy, and new prompts go elsewhere (default 4)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. auto, ray://head:10001) instead of starting one",
    )


def uses_ray(args: argparse.Namespace) -> bool:
    return args.replicas is not None or args.autoscaling_config is not None


def serve_app_config(args: argparse.Namespace, engine: EngineConfig) -> Any:
    """The checked `ServeAppConfig` (typed Any: kvlm.ray_serve imports Ray)."""
    try:
        from kvlm.ray_serve.config import ServeAppConfig, ServeAppConfigError
    except ImportError as e:
        raise CLIError(f"--replicas needs Ray Serve ({e}): pip install 'kvlm[ray]'") from e
    autoscaling = None
    if args.autoscaling_config is not None:
        try:
            autoscaling = json.loads(args.autoscaling_config)
        except json.JSONDecodeError as e:
            raise CLIError(f"--autoscaling-config is not JSON: {e}") from e
    optional = {} if args.max_imbalance is None else {"max_imbalance": args.max_imbalance}
    try:
        return ServeAppConfig(
            engine=engine,
            served_model_name=args.served_model_name or args.model,
            api_key=args.api_key,
            max_request_bytes=args.max_request_bytes,
            session_dir=None if args.session_dir is None else str(args.session_dir.resolve()),
            num_replicas=args.replicas,
            autoscaling=autoscaling,
            replica_cpus=float(args.threads or 1)
            if args.replica_cpus is None
            else args.replica_cpus,
            replica_gpus=args.replica_gpus,
            routing=args.routing,
            **optional,
        )
    except ServeAppConfigError as e:
        raise CLIError(str(e)) from e


def run_ray(args: argparse.Namespace, engine: EngineConfig) -> int:
    """Start the application, print the URL, serve until Ctrl-C, then stop it."""
    config = serve_app_config(args, engine)
    from kvlm.ray_serve import local

    if args.port == 0:
        raise CLIError("--port 0 is not supported with --replicas: Serve's proxy needs a port")
    try:
        url = local.start(config, args.host, args.port, args.ray_address)
        replicas = config.num_replicas or f"autoscaling {config.autoscaling}"
        print(
            f"kvlm: serving {config.served_model_name!r} on Ray Serve ({replicas} replicas, "
            f"{args.routing} routing) at {url}/v1 (health: {url}/health, metrics by replica: "
            f"{url}/metrics, cache view of one replica: {url}/cache?replica=ID)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        local.stop()
    return 0
