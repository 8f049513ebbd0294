"""`kvlm serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics) and the live cache view (/cache) in front of one engine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvlm.cli.common import CLIError, add_model_options, add_prefix_adapter_option, engine_kwargs
from kvlm.cli.serve_ray import add_ray_options, run_ray, uses_ray
from kvlm.engine.config import EngineConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# kvlm.server.limits.DEFAULT_MAX_REQUEST_BYTES (a test holds them equal); not imported, so the
# server's dependencies load only when it runs.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP (OpenAI-compatible API)",
        description="Serve the model over an OpenAI-compatible HTTP API: POST /v1/completions "
        "and /v1/chat/completions (streaming with stream=true), GET /v1/models, /health, "
        "/metrics (Prometheus) and /cache (the KV cache, live, in a browser). Stop with Ctrl-C.",
    )
    add_model_options(parser)
    add_prefix_adapter_option(
        parser,
        "repeatable; a request picks one with 'prefix_adapter' or the model name "
        "'<served name>:NAME'",
    )
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=DEFAULT_HOST, help=f"address ({DEFAULT_HOST})")
    group.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 = any free ({DEFAULT_PORT})"
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 and /cache routes (a browser opens "
        "/cache?api_key=KEY)",
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as 'model' (default: the --model value)",
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=32, help="requests batched together at most (32)"
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="refuse (413) request bodies larger than this, before reading them "
        f"({DEFAULT_MAX_REQUEST_BYTES:,})",
    )
    group.add_argument(
        "--session-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep session files here: POST /v1/sessions/NAME saves a conversation's K/V, "
        "POST /v1/sessions/NAME/restore brings it back (default: sessions off)",
    )
    group.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (info)",
    )
    add_ray_options(parser)
    parser.set_defaults(run=run)


def server_engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**engine_kwargs(args), max_num_seqs=args.max_num_seqs)


def run(args: argparse.Namespace) -> int:
    # Imported here: the server's dependencies load only for this command.
    from kvlm.engine.async_engine import AsyncLLMEngine
    from kvlm.engine.engine import LLMEngine
    from kvlm.server import build_app
    from kvlm.server.launch import bind_socket, make_server, socket_url

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_num_seqs < 1:
        raise CLIError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if args.max_request_bytes < 1:
        raise CLIError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.session_dir is not None and not args.session_dir.is_dir():
        raise CLIError(f"--session-dir {args.session_dir} is not a folder; create it first")
    config = server_engine_config(args)  # checked before the model loads
    if uses_ray(args):
        return run_ray(args, config)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        raise CLIError(
            f"cannot listen on {args.host}:{args.port}: {e.strerror or e}; "
            "pick another --port (0 = any free one)"
        ) from e
    engine = AsyncLLMEngine(LLMEngine(config))
    name = args.served_model_name or args.model
    try:
        app = build_app(engine, name, args.api_key, args.max_request_bytes, args.session_dir)
        url = socket_url(sock)
        print(
            f"kvlm: serving {name!r} ({engine.engine.config.weight_format} weights) at {url}/v1 "
            f"(health: {url}/health, cache view: {url}/cache)",
            flush=True,
        )
        make_server(app, args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C
        pass
    finally:
        engine.shutdown()
        engine.engine.close()  # offload tiers: finish queued writes
        sock.close()
    return 0
