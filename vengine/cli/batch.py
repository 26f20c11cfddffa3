"""`vengine generate --input prompts.jsonl --output out.jsonl`: batch generation that loses nothing.

Every finished request is appended to the output as one whole line and flushed at once. A rerun
skips the ids already written (a torn last line from a killed run is cut off first), Ctrl-C stops
after writing what is finished. Every input line and the output are checked before the model
loads (`prepare_batch`); prompt lengths, which need the tokenizer, before anything is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vengine.cli.outfile import OutputFile, done_ids  # noqa: F401  (tests import it here)
from vengine.errors import ConfigError, VengineError

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                   "seed", "stop", "epsilon", "delta")
ROLES = ("system", "user", "assistant", "tool")


def read_requests(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Parse and check every input line; errors name the file and line number."""
    from vengine.engine.sampling import SamplingParams

    try:
        # split on "\n" only: splitlines() would also cut at U+2028 inside a JSON string
        lines = path.read_text(encoding="utf-8").split("\n")
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
        except (ValueError, RecursionError) as e:  # an int of over 4300 digits, deep nesting
            raise ConfigError(f"{where}: not valid JSON here ({type(e).__name__})") from None
        try:  # a lone surrogate ("\\ud800") decodes as JSON but cannot be tokenised or written
            line.encode("utf-8")
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}: holds a lone surrogate escape, not valid Unicode") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ConfigError(f"{where}: expected an object with an \"id\"")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise ConfigError(f"{where}: \"id\" must be a string or an integer")
        if row["id"] in seen:
            raise ConfigError(f"{where}: duplicate id {_short(row['id'])}")
        seen.add(row["id"])
        unknown = set(row) - {"id", "prompt", "messages", *SAMPLING_FIELDS}
        if unknown:
            raise ConfigError(f"{where}: unknown field {_short(sorted(unknown)[0])}")
        has_prompt, has_messages = "prompt" in row, "messages" in row
        if has_prompt == has_messages:
            raise ConfigError(f"{where}: give exactly one of \"prompt\" or \"messages\"")
        if has_prompt and not (isinstance(row["prompt"], str) and row["prompt"]):
            raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
        if has_messages and not (
            isinstance(row["messages"], list) and row["messages"] and all(
                isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str) for m in row["messages"])
        ):
            raise ConfigError(f"{where}: \"messages\" must be a list of {{role, content}} objects "
                              f"with role one of {', '.join(ROLES)}")
        try:
            params = SamplingParams(**{**defaults, **{k: row[k] for k in SAMPLING_FIELDS if k in row}})
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
        requests.append({"id": row["id"], "prompt": row.get("prompt"),
                         "messages": row.get("messages"), "params": params, "line": n})
    if not requests:
        raise ConfigError(f"{path}: no requests")
    return requests


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def prepare_batch(input_path: Path | None, output_path: Path | None, resume: bool,
                  defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], OutputFile]:
    """Every check that needs no model: the input parsed in full, the output proven to be a
    vengine output (or new), locked, and truncatable where the run will have to truncate it."""
    if output_path is None:
        raise ConfigError("--output is required with --input")
    if not input_path.is_file():
        why = "not a regular file" if input_path.exists() else "no such file"
        raise ConfigError(f"--input {input_path}: {why}")
    requests = read_requests(input_path, defaults)
    out = OutputFile(output_path, input_path)
    try:
        out.check_truncatable(resume)
    except BaseException:
        out.close()
        raise
    return requests, out


def run_batch(engine, input_path: Path, out: OutputFile, resume: bool,
              requests: list[dict[str, Any]]) -> int:
    """Generate what --output lacks. engine: an LLM, or a vengine.distributed.EnginePool (its
    workers generate, this process alone writes): both have `prompt_ids` and `completions`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    todo = [r for r in requests if not resume or r["id"] not in out.ids]
    for r in todo:  # tokenise and check lengths up front: no surprise after hours of work
        try:
            r["ids"] = engine.prompt_ids(r["messages"] or r["prompt"])
        except VengineError as e:
            raise type(e)(f"{input_path}:{r['line']}: {e}") from None
    finished = out.start(resume)
    todo = [r for r in todo if r["id"] not in finished]
    console = Console(stderr=True)
    start, tokens, done = time.perf_counter(), 0, 0
    progress = Progress(TextColumn("[bold]generate"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} requests"),
                        TextColumn("{task.fields[rate]:.1f} tokens/s"), TimeRemainingColumn(),
                        console=console, transient=True)
    try:
        with progress:
            task = progress.add_task("", total=len(requests), completed=len(requests) - len(todo),
                                     rate=0.0)
            stream = engine.completions((r["id"], r["ids"], r["params"]) for r in todo)
            for key, c in stream:
                out.append({"id": key, "text": c.text,
                            "prompt_tokens": c.stats["prompt_tokens"],
                            "completion_tokens": c.stats["completion_tokens"],
                            "finish_reason": c.finish_reason,
                            "seconds": round(c.stats["seconds"], 3),
                            "time_to_first_token_s": round(c.stats["time_to_first_token_s"], 3),
                            "prefill_tokens_per_s": round(c.stats["prefill_tokens_per_s"], 1),
                            "decode_tokens_per_s": round(c.stats["decode_tokens_per_s"], 2),
                            "kv_bytes": c.stats["kv_bytes"],
                            "density": round(c.stats.get("density", 1.0), 4),
                            "certificate_violation_rate": round(
                                c.stats.get("certificate_violation_rate", 0.0), 4)})
                done += 1
                tokens += c.stats["completion_tokens"]
                rate = tokens / (time.perf_counter() - start)
                progress.update(task, advance=1, rate=rate)
    except KeyboardInterrupt:
        console.print(f"interrupted: {done} requests written to {out.path}; "
                      "run the same command again to finish the rest", soft_wrap=True)
        return 130
    elapsed = time.perf_counter() - start
    console.print(f"{done} requests generated ({len(requests) - len(todo)} already done) in "
                  f"{elapsed:.1f} s, {tokens} tokens, {tokens / max(elapsed, 1e-9):.1f} tokens/s "
                  f"-> {out.path}", soft_wrap=True)
    return 0
