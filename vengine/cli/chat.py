"""`vengine chat`: an interactive prompt on a TTY; one user turn per line when piped."""

from __future__ import annotations

import sys
from typing import Any


def run_chat(llm, system: str | None, sampling: dict[str, Any]) -> int:
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if interactive:
        print("vengine chat: /reset clears the conversation, /exit quits", file=sys.stderr)
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
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(llm.chat_ids(messages), **sampling):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
