"""The attention-backend seam: explicit step boundaries, a backend per layer, a registry by name."""

from __future__ import annotations

import pytest

import vengine
from vengine.attention.base import AttentionBackend
from vengine.attention.full import FullAttention
from vengine.attention import registry
from vengine.attention.registry import backend_names, register_backend
from vengine.errors import ConfigError

PROMPT = "Write one sentence about a lighthouse keeper."


@pytest.fixture(scope="module")
def llm() -> vengine.LLM:
    return vengine.LLM(device="cpu", max_context=512)


class Recording(FullAttention):
    """Full attention that logs the engine's calls, to check the step protocol."""

    def __init__(self, pool, log: list) -> None:
        super().__init__(pool)
        self.log = log

    def begin_step(self, seqs, is_prefill):
        self.log.append(("begin", is_prefill, tuple(s.seq_id for s in seqs)))

    def prefill(self, layer, q, k, v, ctx):
        self.log.append(("prefill", layer))
        return super().prefill(layer, q, k, v, ctx)

    def decode(self, layer, q, k, v, ctx):
        self.log.append(("decode", layer))
        return super().decode(layer, q, k, v, ctx)

    def step_stats(self):
        self.log.append(("stats",))

    def end_step(self, seq_ids, stats):
        self.log.append(("end", seq_ids))


def test_every_step_is_begun_run_layer_by_layer_and_ended(llm, monkeypatch):
    log: list = []
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # undone after the test
    register_backend("recording", lambda settings, pool, cfg, device: Recording(pool, log))
    assert "recording" in backend_names()
    engine = llm.with_attention("recording")
    assert isinstance(engine.backends[0], AttentionBackend)
    done = engine.generate([PROMPT], max_new_tokens=3, ignore_eos=True)[0]
    L = llm.model.config.num_layers
    seq_id = log[0][2]
    prefill = [("begin", True, seq_id)] + [("prefill", i) for i in range(L)]
    decode = ([("begin", False, seq_id)] + [("decode", i) for i in range(L)]
              + [("stats",), ("end", seq_id)])
    assert log == prefill + decode * (len(done.token_ids) - 1)


def test_layers_may_use_different_backends(llm):
    """Exact attention in even layers, vAttention (exact here: sink and window cover the
    context) in odd ones: the greedy tokens of full attention, with both backends used."""
    exact_sparse = vengine.VAttention(sink=0, window=4096, seed=0)
    L = llm.model.config.num_layers
    mixed = llm.with_attention(["full" if i % 2 == 0 else exact_sparse for i in range(L)])
    assert mixed.backends[0].name == "full" and mixed.backends[1].name == "vattention"
    assert mixed.backends[1] is mixed.backends[3], "equal specs share one backend"
    assert mixed.config.offloaded
    want = llm.generate([PROMPT], max_new_tokens=12, ignore_eos=True)[0]
    got = mixed.generate([PROMPT], max_new_tokens=12, ignore_eos=True)[0]
    assert got.token_ids == want.token_ids
    assert got.stats["sparse_steps"] == 11 and got.stats["density"] == 1.0


def test_bad_specs_name_the_field(llm):
    with pytest.raises(ConfigError, match="attention: expected one of full, vattention") as e:
        vengine.LLM(device="cpu", attention="sparse-ish")
    assert e.value.field == "attention"
    with pytest.raises(ConfigError, match="one per layer"):
        llm.with_attention(["full", "full"])
