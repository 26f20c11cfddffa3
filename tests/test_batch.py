"""The engine users run: jsonl batch generation (resume, kill -9, bad input), chat sessions that
reuse their KV, preemption under a small page budget, and chat under a pseudo-terminal.

The run that is killed and the chat under a pseudo-terminal are real processes; the other CLI
runs call the entry point in-process (the `cli` fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from helpers import kill_9_mid_run

import vengine
from vengine.cli.batch import done_ids
from vengine.engine.chat import ChatSession
from vengine.engine.sampling import SamplingParams

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
VENGINE = [sys.executable, "-m", "vengine"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def llm():
    return vengine.LLM(max_context=2048)


def test_generate_jsonl_and_resume(tmp_path, llm, cli):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [
        {"id": 1, "prompt": "The capital of France is", "max_new_tokens": 6},
        {"id": "chat", "messages": [{"role": "user", "content": "Say hello."}]},
        {"id": 3, "prompt": "1, 2, 3,", "temperature": 0.7, "seed": 5},
    ])
    r = cli("generate", "--input", str(src), "--output", str(out), "--max-new-tokens", "12",
            "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in read_jsonl(out)}
    assert set(rows) == {1, "chat", 3}
    assert rows[1]["completion_tokens"] == 6 and rows[1]["finish_reason"] == "length"
    assert set(rows["chat"]) == {"id", "text", "prompt_tokens", "completion_tokens",
                                 "finish_reason", "seconds", "time_to_first_token_s",
                                 "prefill_tokens_per_s", "decode_tokens_per_s", "kv_bytes",
                                 "density", "certificate_violation_rate"}
    assert rows[1]["kv_bytes"] > 0 and rows[1]["prefill_tokens_per_s"] > 0
    # the greedy row equals what the library gives for the same prompt
    assert rows[1]["text"] == llm.generate("The capital of France is", max_new_tokens=6)[0].text
    before = out.read_text()
    r = cli("generate", "--input", str(src), "--output", str(out))
    assert r.returncode == 0 and out.read_text() == before, "a rerun must skip finished ids"
    assert "3 already done" in r.stderr


def test_rerun_after_kill_9_finishes_without_loss_or_duplicates(tmp_path, cli):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [f"r{i}" for i in range(8)]
    write_jsonl(src, [{"id": i, "prompt": f"Write a list of {n + 3} animals:"} for n, i in enumerate(ids)])
    args = ["generate", "--input", str(src), "--output", str(out), "--max-new-tokens", "24",
            "--batch-size", "2"]
    partial = kill_9_mid_run(args, out, len(ids), "r7", env=ENV)
    r = cli(*args)  # the same command again (in-process: only the killed run must be a process)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert sorted(row["id"] for row in rows) == sorted(ids), "each id exactly once"
    assert rows[: len(partial)] == partial, "finished rows are never rewritten"


def test_done_ids_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "text": "a"}\n{"id": 2, "te')
    assert done_ids(out) == {1}
    assert out.read_text() == '{"id": 1, "text": "a"}\n'


@pytest.mark.parametrize("line,message", [
    ('{"id": 1, "prompt": "ok"}\n{"id": 2, "promt": "typo"}\n', r"in\.jsonl:2: unknown field 'promt'"),
    ('{"id": 1, "prompt": "ok"}\nnot json\n', r"in\.jsonl:2: not valid JSON"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', r"in\.jsonl:2: duplicate id 1"),
    ('{"id": 1, "prompt": "a", "temperature": -2}\n', r"in\.jsonl:1: temperature must be"),
    ('{"id": 1, "messages": [{"role": "user"}]}\n', r"in\.jsonl:1: \"messages\" must be"),
    ('{"id": 1, "prompt": "' + "word " * 200 + '"}\n', r"in\.jsonl:1: the prompt has \d+ tokens"),
])
def test_bad_input_fails_before_generation(tmp_path, cli, line, message):
    import re

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line)
    out.write_text('{"id": 0, "text": "earlier work"}\n')
    r = cli("generate", "--input", str(src), "--output", str(out), "--ctx", "128")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert re.search(message, r.stderr), r.stderr
    assert out.read_text() == '{"id": 0, "text": "earlier work"}\n', "nothing written is lost"


def test_chat_session_reuses_kv_and_matches_stateless_chat(llm):
    session = ChatSession(llm, system="You are brief.")
    first = "".join(session.send("My name is Alice.", max_new_tokens=24))
    second = "".join(session.send("What is my name?", max_new_tokens=24))
    full = llm.chat_ids(session.messages[:3] and [{"role": "system", "content": "You are brief."}]
                        + session.messages[:3])
    assert session.prefilled_tokens < len(full) // 2, "the second turn must reuse the first's KV"
    ref = llm.chat([{"role": "system", "content": "You are brief."}] + session.messages[:3],
                   max_new_tokens=24)
    assert second == ref.text and first
    session.reset()
    assert llm.pool.allocator.num_free == llm.pool.num_pages


def test_preemption_under_a_small_page_budget_keeps_results(llm):
    prompts = [f"Tell me about {x}." for x in ("cats", "dogs", "birds", "fish")]
    # The reference is the same batch with pages to spare (batched equals one-by-one generation
    # is test_engine's test_batched_generation_matches_one_by_one): here only preemption differs.
    roomy = llm.generate(prompts, max_new_tokens=120, ignore_eos=True)
    assert llm.pool.num_pages >= 4 * 3, "the reference run must not be preempted itself"
    ref = [o.token_ids for o in roomy]
    per_token = llm.model.config.kv_bytes_per_token(4)
    small = vengine.LLM(max_context=512, max_batch=4, page_size=64, host_mem=per_token * 64 * 10)
    outs = small.generate(prompts, max_new_tokens=120, ignore_eos=True)
    assert [o.token_ids for o in outs] == ref
    assert small.pool.allocator.num_free == small.pool.num_pages


def test_completions_yield_as_requests_finish(llm):
    reqs = [("long", "Count from one to fifty:", SamplingParams(max_new_tokens=40, ignore_eos=True)),
            ("short", "Hi", SamplingParams(max_new_tokens=2, ignore_eos=True))]
    order = [key for key, _ in llm.completions(reqs)]
    assert order == ["short", "long"]


def test_chat_on_a_tty(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(VENGINE + ["chat", "--max-new-tokens", "12", "--ctx", "1024"],
                            stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    buf = b""

    def read_until(token: bytes, timeout: float = 180) -> None:
        nonlocal buf
        end = time.time() + timeout
        while token not in buf and time.time() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
        assert token in buf, buf.decode(errors="replace")

    read_until(b"> ")
    os.write(master, b"What is the capital of France?\n")
    read_until(b"Paris")
    read_until(b"> ")
    os.write(master, b"/stats\n")
    read_until(b"tokens/s")
    os.write(master, b"/exit\n")
    assert proc.wait(timeout=60) == 0
    os.close(master)
    assert b"/reset" in buf  # the banner tells the commands
