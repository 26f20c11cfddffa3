"""`vengine serve`: the OpenAI-compatible server, with the engine flags of `chat`.

The flags, the port and the model path are checked before the model loads; fastapi and uvicorn
are an optional extra, so without them the command says how to install them.
"""

from __future__ import annotations

import argparse
import math

from vengine.cli.options import add_model_args, engine_options, load_llm, resolve_model_flag
from vengine.cli.options import sampling_flags
from vengine.errors import ConfigError


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, "
                       "/v1/completions, /v1/models, /health; a chat page at /)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--batch-size", type=int, default=8, help="most requests decoded at once")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running batch; more get 429 (default 64)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="SIGTERM: seconds in-flight requests get to finish (default 10)")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("vengine serve needs fastapi and uvicorn: "
                          "pip install 'vengine[serve]'") from None
    from vengine.server.app import ServerSettings, bind, serve

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ConfigError(f"--shutdown-timeout must be a number >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key must not be empty")
    sampling = sampling_flags(args)
    options = engine_options(args, max_batch=args.batch_size)
    source = resolve_model_flag(args.model)
    sock = bind(args.host, args.port)
    try:
        llm = load_llm(options)
        settings = ServerSettings(model_id=source.path.stem, api_key=args.api_key,
                                  max_queue=args.max_queue, defaults=sampling,
                                  shutdown_timeout=args.shutdown_timeout)
        return serve(llm, settings, sock)
    finally:
        sock.close()
