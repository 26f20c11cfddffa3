"""`vengine chat`: an interactive prompt on a TTY; one user turn per line when piped.

On a TTY, input() gets line editing and history from `readline`, and Ctrl-C stops the reply
being written (a second one interrupts at once), not the session. Piped, stdout carries exactly
one line per user turn: the reply with backslash, newline and carriage return escaped as `\\`,
`\n`, `\r` (an empty line where the turn was refused, the reason on stderr), or with `--json`
one object per turn; a line that is not UTF-8 is refused alone, the rest of stdin still read.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

from vengine.errors import ContextLengthError, HostMemoryError

HELP = "/reset clears the conversation, /stats shows usage, /exit quits"


def run_chat(llm, system: str | None, sampling: dict[str, Any], json_lines: bool = False) -> int:
    from vengine.engine.chat import ChatSession

    session = ChatSession(llm, system)
    try:
        if sys.stdin.isatty():
            return _interactive(llm, session, sampling)
        return _piped(llm, session, sampling, json_lines)
    finally:
        session.reset()  # its pages go back to the pool


def _command(line: str, llm, session, out) -> bool:
    """Handle a /command; True when it was one."""
    if line == "/reset":
        session.reset()
    elif line == "/stats":
        print(format_stats(llm, session), file=out)
    elif line.startswith("/") and line != "/exit":
        print(f"unknown command {line.split()[0]}: {HELP}", file=sys.stderr)
    else:
        return False
    return True


def _interactive(llm, session, sampling: dict[str, Any]) -> int:
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:  # Python built without it: plain input() still works
        pass
    print(f"vengine chat ({llm.model.config.arch}, {llm.config.max_context} tokens): {HELP}; "
          "Ctrl-C stops a reply, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print()
            continue
        except UnicodeDecodeError:
            print("vengine: error: that line is not valid UTF-8; nothing sent", file=sys.stderr)
            continue
        if not line:
            continue
        if line == "/exit":
            return 0
        if _command(line, llm, session, sys.stdout):
            continue
        try:
            stopped = _stream(session.send(line, **sampling))
        except (ContextLengthError, HostMemoryError) as e:
            print(f"vengine: {e}", file=sys.stderr)
            continue
        if stopped:
            sys.stdout.write("\n[stopped by Ctrl-C; this turn is not kept in the conversation]")
        elif session.last.finish_reason == "length":
            sys.stdout.write(f"\n[cut: {_cut_reason(llm, session, sampling)}]")
        sys.stdout.write("\n")
        sys.stdout.flush()


def _stream(pieces: Iterator[str]) -> bool:
    """Write the reply as it comes; True when Ctrl-C stopped it. The first Ctrl-C stops after
    the token being computed, so that the session stays consistent; a second one at once."""
    stop = False

    def on_sigint(signum, frame) -> None:
        nonlocal stop
        if stop:
            raise KeyboardInterrupt
        stop = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            if stop:
                break
    except KeyboardInterrupt:
        stop = True
    finally:
        signal.signal(signal.SIGINT, previous)
        pieces.close()  # frees the unfinished turn's pages; earlier turns stay
    return stop


def _cut_reason(llm, session, sampling: dict[str, Any]) -> str:
    if session.last.stats["completion_tokens"] >= sampling["max_new_tokens"]:
        return f"--max-new-tokens {sampling['max_new_tokens']} reached"
    return f"the context of {llm.config.max_context} tokens is full; /reset or a larger --ctx"


def _piped(llm, session, sampling: dict[str, Any], json_lines: bool) -> int:
    refused = 0

    def refuse(n: int, why: str) -> None:
        nonlocal refused
        refused += 1
        print(f"vengine: error: stdin line {n}: {why}", file=sys.stderr)
        print(json.dumps({"line": n, "error": why}) if json_lines else "", flush=True)

    source = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, so bad UTF-8 is one line's fault
    for n, raw in enumerate(source, 1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            refuse(n, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                      "turn skipped")
            continue
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if _command(line, llm, session, sys.stderr):
            continue
        try:
            text = "".join(session.send(line, **sampling))
        except (ContextLengthError, HostMemoryError) as e:
            refuse(n, str(e))
            continue
        if json_lines:
            last = session.last
            row = {"line": n, "reply": text, "finish_reason": last.finish_reason,
                   "completion_tokens": last.stats["completion_tokens"]}
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            print(escaped, flush=True)
    return 2 if refused else 0


def format_stats(llm, session) -> str:
    import torch

    used, limit = session.context_tokens(), llm.config.max_context
    parts = [f"context {used}/{limit} tokens ({100 * used / limit:.1f}%)"]
    if session.last is not None:
        st = session.last.stats
        parts.append(f"last reply {st['completion_tokens']} tokens at "
                     f"{st['decode_tokens_per_s']:.1f} tokens/s, prefilled {session.prefilled_tokens}")
        parts.append(f"density {st.get('density', 1.0):.3f}")
        if "certificate_violation_rate" in st:
            parts.append(f"certificate: {st['certificate_violation_rate']:.3f} heads capped, "
                         f"{st['predictor_miss_rate']:.3f} predictor misses")
    pool = llm.pool
    page_bytes = (pool.k.nbytes + pool.v.nbytes) // pool.num_pages
    in_use = pool.num_pages - pool.allocator.num_free
    parts.append(f"KV pool ({pool.device.type}) {in_use * page_bytes / 2**20:.1f} MiB in use of "
                 f"{pool.num_pages * page_bytes / 2**30:.2f} GiB"
                 + (f", {pool.pinned_bytes / 2**30:.2f} GiB pinned" if pool.pinned_pages else ""))
    if torch.cuda.is_available():
        parts.append(f"GPU memory {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated")
    return "; ".join(parts)
