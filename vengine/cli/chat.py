"""`vengine chat`: an interactive prompt on a TTY; one user turn per line when piped.

Piped, stdout carries the replies and nothing else (one per turn), so it can be scripted.
"""

from __future__ import annotations

import sys
from typing import Any

from vengine.errors import ContextLengthError

HELP = "/reset clears the conversation, /stats shows usage, /exit quits"


def run_chat(llm, system: str | None, sampling: dict[str, Any]) -> int:
    from vengine.engine.chat import ChatSession

    session = ChatSession(llm, system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"vengine chat ({llm.model.config.arch}, {llm.config.max_context} tokens): {HELP}",
              file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return 0
        if not interactive and not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            continue
        if line == "/stats":
            print(format_stats(llm, session), file=sys.stderr if not interactive else sys.stdout)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}", file=sys.stderr)
            continue
        try:
            for piece in session.send(line, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextLengthError as e:
            print(f"vengine: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def format_stats(llm, session) -> str:
    import torch

    used, limit = session.context_tokens(), llm.config.max_context
    parts = [f"context {used}/{limit} tokens ({100 * used / limit:.1f}%)"]
    if session.last is not None:
        st = session.last.stats
        parts.append(f"last reply {st['completion_tokens']} tokens at "
                     f"{st['decode_tokens_per_s']:.1f} tokens/s, prefilled {session.prefilled_tokens}")
        parts.append(f"density {st.get('density', 1.0):.3f}")
    pool = llm.pool
    page_bytes = (pool.k.nbytes + pool.v.nbytes) // pool.num_pages
    in_use = pool.num_pages - pool.allocator.num_free
    parts.append(f"KV pool ({pool.device.type}) {in_use * page_bytes / 2**20:.1f} MiB in use of "
                 f"{pool.num_pages * page_bytes / 2**30:.2f} GiB")
    if torch.cuda.is_available():
        parts.append(f"GPU memory {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated")
    return "; ".join(parts)
