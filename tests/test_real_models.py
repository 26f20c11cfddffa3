"""Real long-context models from the catalog against transformers' GGUF loader, on CPU in float32.

Each test skips, saying why, when the model is not in the cache (`vengine pull NAME` puts it
there; CI has neither the files nor the time). Per model the reference runs first and is freed
before vengine loads the same file: the 1.5B model is ~6 GB in float32 in each.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_models import TEXTS, assert_logits_close

import vengine
from vengine.models import catalog

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
# A few hundred tokens of code, prose and CJK, ending inside a function body.
PROMPT = (TEXTS["code"] + "\n\n# " + TEXTS["prose"] + "\n# " + TEXTS["multilingual"] + "\n\n"
          "def bfs(graph: dict[str, list[str]], start: str) -> list[str]:\n"
          "    seen, order, queue = {start}, [], [start]\n")
MIXED = ("Tabs\tand  double spaces, CRLF\r\nnumbers 3.14159 and 1234567890, an émoji 🤖👍🏽, "
         "ÜMLAUTS, 中文和日本語のテキスト, <|im_start|> spelled out, and code: "
         "`for (int i = 0; i < n; ++i) { x[i] *= 2; }`\n\n\n  trailing   ")
CHATS = {
    "default-system": [{"role": "user", "content": "Write a Python function that reverses a "
                        "linked list."}],
    "system-multiturn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in binary?"},
    ],
}
GREEDY_TOKENS = 16
# Max |d log p| over the reference's top-64 tokens on PROMPT (333 tokens), measured on 2 CPU
# threads: 3.8e-5 (0.5B), 2.8e-5 (1.5B), argmax equal at every position; 10x the larger leaves
# room for other BLAS builds and thread counts.
TOL = 4e-4


@dataclass
class Reference:
    """What transformers computed; its model is freed before vengine loads."""

    tok: Any
    prompt_ids: list[int]
    logits: torch.Tensor  # [len, vocab] float32
    chat_ids: dict[str, list[int]]
    greedy: list[int]  # GREEDY_TOKENS tokens after the default-system chat prompt


def _chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _reference(path: Path) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    prompt_ids = tok(PROMPT)["input_ids"]
    chat_ids = {k: _chat_ids(tok, m) for k, m in CHATS.items()}
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
        ids = chat_ids["default-system"]
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=GREEDY_TOKENS,
                             pad_token_id=tok.eos_token_id)
    del model
    gc.collect()
    return Reference(tok, prompt_ids, logits, chat_ids, out[0, len(ids):].tolist())


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    """(reference, vengine LLM) for one cached model; the previous model's pair is freed first."""
    path = catalog.find(request.param)
    if path is None:
        pytest.skip(f"{request.param} is not cached in {catalog.cache_dir()}: "
                    f"run `vengine pull {request.param}`")
    ref = _reference(path)
    llm = vengine.LLM(model=request.param, device="cpu", dtype="float32", max_context=2048)
    yield request.param, ref, llm
    del llm, ref
    gc.collect()


def test_prompt_is_a_few_hundred_tokens(real):
    _, ref, _ = real
    assert 250 <= len(ref.prompt_ids) <= 1000, len(ref.prompt_ids)


def test_config_matches_the_catalog(real):
    name, _, llm = real
    c = llm.model.config
    shapes = {"qwen2.5-coder-0.5b": (24, 14, 2, 64), "qwen2.5-coder-1.5b": (28, 12, 2, 128)}
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("qwen2",
                                                                             *shapes[name])
    assert c.max_position_embeddings == 32768


def test_logit_parity(real):
    name, ref, llm = real
    assert_logits_close(llm.logits(ref.prompt_ids), ref.logits, f"{name}/prompt", tol=TOL)


def test_greedy_tokens_match(real):
    name, ref, llm = real
    ids = ref.chat_ids["default-system"]
    ours = llm.generate([ids], max_new_tokens=GREEDY_TOKENS, temperature=0.0)[0].token_ids
    print(f"{name}: greedy {ref.tok.decode(ref.greedy)!r}")
    assert len(ref.greedy) == GREEDY_TOKENS  # a reply this long, not an early stop
    assert ours == ref.greedy, (f"ours: {ref.tok.decode(ours)!r}\n"
                                f"ref:  {ref.tok.decode(ref.greedy)!r}")


def test_tokenizer_encode_decode(real):
    name, ref, llm = real
    for text in (MIXED, PROMPT, *TEXTS.values()):
        ids = ref.tok(text)["input_ids"]
        assert llm.tokenizer.encode(text) == ids, f"{name}: {text[:40]!r}"
        assert llm.tokenizer.decode(ids) == ref.tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_template(real, chat):
    name, ref, llm = real
    text = ref.tok.apply_chat_template(CHATS[chat], add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.apply_chat_template(CHATS[chat], add_generation_prompt=True) == text
    assert llm.chat_ids(CHATS[chat]) == ref.chat_ids[chat], name


# -- Gemma 3 270M: a base model (no chat template) with 15 sliding-window layers of 3 global ----

LONG = (PROMPT + "\n\n") * 4  # about 1,300 tokens: past the 512-token window
GEMMA_GREEDY = 48


@pytest.fixture(scope="module")
def gemma():
    path = catalog.find("gemma3-270m")
    if path is None:
        pytest.skip(f"gemma3-270m is not cached in {catalog.cache_dir()}: "
                    "run `vengine pull gemma3-270m`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    ids = tok(LONG)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=GEMMA_GREEDY,
                             min_new_tokens=GEMMA_GREEDY)
    del model
    gc.collect()
    llm = vengine.LLM(model="gemma3-270m", device="cpu", dtype="float32", max_context=2048)
    yield tok, ids, logits, out[0, len(ids):].tolist(), llm
    del llm
    gc.collect()


def test_gemma3_config_and_pool(gemma):
    _, ids, _, _, llm = gemma
    c = llm.model.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "gemma3_text", 18, 4, 1, 256)
    assert c.layer_windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18))
    assert llm.pool.k.shape[0] == 3, "the host pool holds the 3 global layers only"
    assert len(ids) > 2 * 512


def test_gemma3_logit_parity_past_the_window(gemma):
    tok, ids, logits, _, llm = gemma
    assert llm.tokenizer.encode(LONG) == ids
    assert_logits_close(llm.logits(ids), logits, "gemma3-270m/long", tol=TOL)


def test_gemma3_greedy_48_tokens(gemma):
    tok, ids, _, greedy, llm = gemma
    ours = llm.generate([ids], max_new_tokens=GEMMA_GREEDY, ignore_eos=True)[0].token_ids
    assert ours == greedy, f"ours: {tok.decode(ours)!r}\nref:  {tok.decode(greedy)!r}"
