"""End to end on the default model (CPU): needle-in-a-haystack retrieval at about 4K tokens,
vAttention against full attention, and greedy agreement of the two over a long generation.

Cost is what shapes this module: a ~4K-token prefill takes the best part of a minute on two CPU
cores, so (1) the cases share one filler text and run deepest needle first through a
ChatSession, which keeps the KV cache of the common prefix and prefills only the rest, and
(2) both modes decode over the very same prefilled KV: the backend is vAttention's, with a
switch that makes decode exact (the code of FullAttention's decode), so a case is prefilled once
for the two modes. Prefill is exact in both modes anyway; only decode differs.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pytest

import vengine
from vengine.attention.full import decode_attention
from vengine.attention.vattention import VAttentionBackend
from vengine.engine.chat import ChatSession
from vengine.eval.tasks import Case, make_cases, score

pytestmark = pytest.mark.slow

CONTEXT = 3800  # tokens per case
NUM_CASES = 10
AGREE_TOKENS = 64  # greedy agreement length (the issue asks 256: see the module docstring;
# 64 since the suite neared CI's 15 minutes)
# top_k 0.09 per KV group: the exact-row budget of the former union of the 3 query heads' 3% sets.
# With 0.03 per group (a third of those rows) vAttention solved 2 of the cases full attention's 5.
SETTINGS = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.09,
                              pilot=128, seed=0, exact_below=0)  # sparse at every length


class _Switchable(VAttentionBackend):
    """vAttention, or exact decode over the same pool while `exact` is set (no stats then)."""

    exact = False

    def decode(self, layer, q, k, v, ctx):
        if not self.exact:
            return super().decode(layer, q, k, v, ctx)
        self.store(layer, k, v, ctx)
        kc, vc = self.pool.gather_pages(layer, ctx.block_tables, q.dtype)
        return decode_attention(q, kc, vc, ctx.context_lens)


@dataclass(frozen=True)
class _SwitchableSpec:
    cfg: vengine.VAttention

    def make_backend(self, pool, mc, device):
        return _Switchable(self.cfg, pool, mc, device)


@dataclass(frozen=True)
class Turn:
    text: str
    token_ids: list[int]
    density: float  # mean over this turn's decode steps (1.0 when exact)


class Runner:
    """One ChatSession; each ask is an independent one-message conversation whose prompt shares
    the cached prefix of the previous one."""

    def __init__(self) -> None:
        self.llm = vengine.LLM(max_context=4608, max_batch=1, attention=_SwitchableSpec(SETTINGS))
        self.chat = ChatSession(self.llm)

    def ask(self, prompt: str, exact: bool, **sampling) -> Turn:
        self.llm.backends[0].exact = exact  # one backend object serves every layer
        before = self._density_steps()
        self.chat.messages.clear()
        text = "".join(self.chat.send(prompt, **sampling))
        after = self._density_steps()
        steps = after[1] - before[1]
        density = 1.0 if exact else (after[0] - before[0]) / steps
        return Turn(text, self.chat.last.token_ids, density)

    def _density_steps(self) -> tuple[float, int]:
        """The session's cumulative (density x sparse steps, sparse steps)."""
        if self.chat.last is None:
            return 0.0, 0
        s = self.chat.last.stats
        return s["density"] * s["sparse_steps"], s["sparse_steps"]


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


@pytest.fixture(scope="module")
def cases(runner) -> list[Case]:
    found = make_cases("niah_single", runner.llm.tokenizer, CONTEXT, NUM_CASES, seed=0,
                       shared=True)
    return sorted(found, key=lambda c: -c.depth)  # deepest first: the longest shared prefixes


@pytest.fixture(scope="module")
def results(runner, cases) -> list[tuple[Case, Turn, Turn]]:
    out = []
    for case in cases:
        full = runner.ask(case.prompt, exact=True, max_new_tokens=28, stop=["."])
        sparse = runner.ask(case.prompt, exact=False, max_new_tokens=28, stop=["."])
        out.append((case, full, sparse))
    return out


def test_needle_retrieval_vattention_matches_full(results):
    print(f"\n{'depth':>5} {'tokens':>6} {'expected':>9} {'ok':>3} {'full answer':<48} "
          f"{'ok':>3} {'vattention answer':<48} {'density':>7}")
    for case, full, sparse in results:
        print(f"{case.depth:5.2f} {case.context_tokens:6d} {case.answers[0]:>9} "
              f"{score(case, full.text):3.0f} {full.text[-48:]:<48} "
              f"{score(case, sparse.text):3.0f} {sparse.text[-48:]:<48} {sparse.density:7.3f}")
    full_ok = sum(score(c, f.text) for c, f, _ in results)
    sparse_ok = sum(score(c, s.text) for c, _, s in results)
    density = statistics.mean(s.density for _, _, s in results)
    print(f"correct: full {full_ok:.0f}/{len(results)}, vattention {sparse_ok:.0f}/{len(results)} "
          f"at mean density {density:.3f}")
    assert len(results) >= 10
    assert len({round(c.depth, 2) for c, _, _ in results}) == len(results)  # varied depth
    assert full_ok >= 5, "full attention must solve enough cases for the comparison to mean much"
    assert sparse_ok >= full_ok
    assert density <= 0.25


def test_greedy_agreement_with_full_attention(runner, cases, results):
    """Reported, not gated: how long greedy vAttention follows full attention's tokens."""
    case = cases[-1]
    prompt = case.prompt[: case.prompt.rindex("\n")] + "\nSummarize the text above in detail."
    full = runner.ask(prompt, exact=True, max_new_tokens=AGREE_TOKENS, ignore_eos=True)
    sparse = runner.ask(prompt, exact=False, max_new_tokens=AGREE_TOKENS, ignore_eos=True)
    a, b = full.token_ids, sparse.token_ids
    lead = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
    print(f"\ngreedy agreement over {AGREE_TOKENS} tokens: {lead} leading tokens agree, "
          f"{same:.1%} of positions agree, vattention density {sparse.density:.3f}")
    assert len(a) == len(b) == AGREE_TOKENS
    assert sparse.density <= 0.5
