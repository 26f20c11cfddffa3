"""`vengine generate --input prompts.jsonl --output out.jsonl`: batch generation that loses nothing.

Every finished request is appended to the output as one whole line and flushed at once. A rerun
skips the ids already written (a torn last line from a killed run is cut off first), Ctrl-C stops
after writing what is finished, and a malformed input line is reported before any generation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vengine.errors import ConfigError, VengineError

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                   "seed", "stop")


def read_requests(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Parse and check every input line; errors name the file and line number."""
    from vengine.engine.sampling import SamplingParams

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    requests, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ConfigError(f"{where}: expected an object with an \"id\"")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise ConfigError(f"{where}: \"id\" must be a string or an integer")
        if row["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        unknown = set(row) - {"id", "prompt", "messages", *SAMPLING_FIELDS}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        has_prompt, has_messages = "prompt" in row, "messages" in row
        if has_prompt == has_messages:
            raise ConfigError(f"{where}: give exactly one of \"prompt\" or \"messages\"")
        if has_prompt and not (isinstance(row["prompt"], str) and row["prompt"]):
            raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
        if has_messages and not (
            isinstance(row["messages"], list) and row["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in row["messages"])
        ):
            raise ConfigError(f"{where}: \"messages\" must be a list of {{role, content}} objects")
        try:
            params = SamplingParams(**{**defaults, **{k: row[k] for k in SAMPLING_FIELDS if k in row}})
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        requests.append({"id": row["id"], "prompt": row.get("prompt"),
                         "messages": row.get("messages"), "params": params, "line": n})
    if not requests:
        raise ConfigError(f"{path}: no requests")
    return requests


def done_ids(path: Path) -> set:
    """Ids already in the output; a torn last line (a killed run) is cut off the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    ids = set()
    for line in data[:good].splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}: existing output has a malformed line; "
                              "move it away or pass --no-resume") from None
    return ids


def append_line(fd: int, row: dict[str, Any]) -> None:
    """One write of one whole line, then flushed to the OS: a kill never leaves half a row
    except from a crash inside write(), which done_ids repairs."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def run_batch(llm, input_path: Path, output_path: Path, resume: bool,
              defaults: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    requests = read_requests(input_path, defaults)
    for r in requests:  # tokenise and check lengths up front: no surprise after hours of work
        r["ids"] = llm.chat_ids(r["messages"]) if r["messages"] else None
        try:
            r["ids"] = llm._encode(r["ids"] if r["ids"] is not None else r["prompt"])
        except VengineError as e:
            raise type(e)(f"{input_path}:{r['line']}: {e}") from None
    if not resume and output_path.exists():
        output_path.write_bytes(b"")
    finished = done_ids(output_path)
    todo = [r for r in requests if r["id"] not in finished]
    console = Console(stderr=True)
    fd = os.open(output_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start, tokens, done = time.perf_counter(), 0, 0
    progress = Progress(TextColumn("[bold]generate"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} requests"),
                        TextColumn("{task.fields[rate]:.1f} tokens/s"), TimeRemainingColumn(),
                        console=console, transient=True)
    try:
        with progress:
            task = progress.add_task("", total=len(requests), completed=len(finished), rate=0.0)
            stream = llm.completions((r["id"], r["ids"], r["params"]) for r in todo)
            for key, c in stream:
                append_line(fd, {"id": key, "text": c.text,
                                 "prompt_tokens": c.stats["prompt_tokens"],
                                 "completion_tokens": c.stats["completion_tokens"],
                                 "finish_reason": c.finish_reason,
                                 "seconds": round(c.stats["seconds"], 3),
                                 "density": round(c.stats.get("density", 1.0), 4)})
                done += 1
                tokens += c.stats["completion_tokens"]
                rate = tokens / (time.perf_counter() - start)
                progress.update(task, advance=1, rate=rate)
    except KeyboardInterrupt:
        console.print(f"interrupted: {done} requests written to {output_path}; "
                      "run the same command again to finish the rest", soft_wrap=True)
        return 130
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    console.print(f"{done} requests generated ({len(finished)} already done) in {elapsed:.1f} s, "
                  f"{tokens} tokens, {tokens / max(elapsed, 1e-9):.1f} tokens/s -> {output_path}",
                  soft_wrap=True)
    return 0
