"""Refactors must not change a token: the default model's output against tokens recorded before
them (tests/record_golden.py at the commit stored in the file), with full attention and with
vAttention, batched, queued, preempted and seeded, and a two-turn chat reusing its KV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vengine
from vengine.engine.chat import ChatSession

pytestmark = pytest.mark.slow

RECORD = json.loads((Path(__file__).parent / "data" / "golden_tokens.json").read_text())


def _engine(llm: vengine.LLM, case: dict) -> vengine.LLM:
    attention = (vengine.VAttention(seed=0, exact_below=0) if case["attention"] == "vattention"
                 else "full")  # exact_below=0: recorded before the short-context rule
    options = {k: case[k] for k in ("max_batch", "host_mem") if k in case}
    if options:
        return vengine.LLM(device="cpu", attention=attention, **options)
    return llm.with_attention(attention)


@pytest.fixture(scope="module")
def llm() -> vengine.LLM:
    return vengine.LLM(device="cpu")


@pytest.mark.parametrize("case", RECORD["cases"], ids=[c["name"] for c in RECORD["cases"]])
def test_tokens_as_recorded(llm, case):
    engine = _engine(llm, case)
    prefills = []
    prefill = engine.runner.prefill
    engine.runner.prefill = lambda seq, **kw: prefills.append(seq.seq_id) or prefill(seq, **kw)
    done = engine.generate(case["prompts"], **case["sampling"])
    got = [c.token_ids for c in done]
    for i, (want, have) in enumerate(zip(case["tokens"], got)):
        assert have == want, f"prompt {i}: first difference at token " + str(next(
            (j for j, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have))))
    assert len(got) == len(case["tokens"])
    if case["attention"] == "vattention":  # the prompts outgrow sink + window: really sparse
        assert all(c.stats["density"] < 1 for c in done), [c.stats["density"] for c in done]
    if "host_mem" in case:  # the pool is too small for the batch: someone was preempted
        assert len(prefills) > len(case["prompts"]), prefills
        assert engine.pool.allocator.num_free == engine.pool.num_pages


def test_chat_turns_as_recorded(llm):
    rec = RECORD["chat"]
    session = ChatSession(llm, system=rec["system"])
    for turn, want in zip(rec["turns"], rec["tokens"]):
        "".join(session.send(turn, max_new_tokens=rec["max_new_tokens"]))
        assert session.last.token_ids == want
    assert session.prefilled_tokens < session.context_tokens(), "the second turn reused no KV"
    session.reset()
