"""Record the default model's tokens for test_golden.py (run once, at the commit named inside).

Refactors must not change a token (full attention's are those of 14a1099; vAttention's were
re-recorded at b5bc63b, when its predictor changed on purpose): greedy and seeded decoding with full
attention and with vAttention, batched, queued (more prompts than slots) and preempted (a pool
too small for the batch), and a two-turn chat that reuses its KV. Prompt ids are stored too, so
the test does not depend on how the prompts are built.

    python tests/record_golden.py COMMIT   # writes tests/data/golden_tokens.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import vengine
from vengine.eval.activations import corpus_text

OUT = Path(__file__).parent / "data" / "golden_tokens.json"
PAGES = 14  # the preempted case's pool


def cases(llm) -> list[dict]:
    text = corpus_text()
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    long_a, long_b, long_c = ids[:600], ids[5000:5450], ids[9000:9350]  # past sink + window
    # three 250-token prompts in a pool of 14 pages of 64 tokens: all three are admitted, and at
    # the first page boundary of their replies the newest is preempted (and recomputed later)
    tight = [ids[12000:12250], ids[14000:14250], ids[16000:16250]]
    short = llm.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    return [
        {"name": "full_greedy", "attention": "full", "prompts": [short, long_a],
         "sampling": {"max_new_tokens": 24}},
        {"name": "full_seeded", "attention": "full", "prompts": [short],
         "sampling": {"max_new_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 7}},
        {"name": "vattention_greedy", "attention": "vattention",
         "prompts": [long_a, long_b, long_c], "sampling": {"max_new_tokens": 24}},
        {"name": "vattention_queued", "attention": "vattention", "max_batch": 2,
         "prompts": [long_b, long_c, long_a], "sampling": {"max_new_tokens": 16}},
        {"name": "full_preempted", "attention": "full", "host_mem": PAGES * llm_page_bytes(llm),
         "prompts": tight, "sampling": {"max_new_tokens": 40}},
    ]


def llm_page_bytes(llm) -> int:
    return llm.model.config.kv_bytes_per_token(4) * 64


def run(llm, case: dict) -> list[list[int]]:
    attention = case["attention"]
    if attention == "vattention":
        attention = vengine.VAttention(seed=0, exact_below=0)  # as recorded: always sparse
    options = {k: case[k] for k in ("max_batch", "host_mem") if k in case}
    engine = vengine.LLM(device="cpu", attention=attention, **options) if options else (
        llm.with_attention(attention))
    done = engine.generate(case["prompts"], **case["sampling"])
    if "host_mem" in case:
        assert engine.pool.num_pages == PAGES, engine.pool.num_pages
    return [c.token_ids for c in done]


def chat_turns(llm) -> list[list[int]]:
    from vengine.engine.chat import ChatSession

    session, out = ChatSession(llm, system="You are brief."), []
    for text in ("Name a colour.", "And another one?"):
        "".join(session.send(text, max_new_tokens=16))
        out.append(session.last.token_ids)
    return out


def main() -> None:
    llm = vengine.LLM(device="cpu")
    record = {"commit": sys.argv[1], "cases": []}
    for case in cases(llm):
        record["cases"].append({**case, "tokens": run(llm, case)})
        print(case["name"], [len(t) for t in record["cases"][-1]["tokens"]], flush=True)
    record["chat"] = {"system": "You are brief.", "turns": ["Name a colour.", "And another one?"],
                      "max_new_tokens": 16, "tokens": chat_turns(llm)}
    OUT.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
