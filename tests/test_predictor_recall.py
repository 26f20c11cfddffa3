"""benchmarks/predictor_recall.py's predictors on a case whose answer is known: one key planted
along the group's query must be the top row (or in the top page) for every predictor, and the
evaluation must give exact keys recall 1."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "predictor_recall.py"
_spec = importlib.util.spec_from_file_location("predictor_recall", _PATH)
pr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pr)

T, HKV, G, D, Q = 1024, 2, 3, 64, 2
PLANTED = 700


def _case():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(T, HKV, D, generator=gen)
    k[..., 5] += 4.0  # an outlier channel, as real keys have
    q = torch.randn(Q, HKV, G, D, generator=gen) * 0.3 + torch.randn(1, HKV, 1, D, generator=gen)
    direction = q.sum(2).mean(0)  # [HKV, D]: the group's summed query
    k[PLANTED] = 6 * direction / direction.norm(dim=-1, keepdim=True) * math.sqrt(D)
    return k, q


def test_planted_key_is_found_by_every_predictor():
    k, q = _case()
    for bits in (64, 128, 256, 512):
        pr.PLANES[bits] = torch.randn(1, HKV, D, bits,
                                      generator=torch.Generator().manual_seed(pr.PLANES_SEED))
    for name, (nbytes, build) in pr.predictor_table(D).items():
        assert 0 < nbytes <= 2 * D, name
        for rule, s in pr.group_scores(build(k, 0), q).items():
            top = s.argmax(-1)  # [Q, HKV]
            if name.startswith("quest"):
                page = int(name.removeprefix("quest page"))
                assert (top // page == PLANTED // page).all(), (name, rule, top)
            else:
                assert (top == PLANTED).all(), (name, rule, top)


def test_exact_keys_have_recall_one():
    k, q = _case()
    out, share = pr.evaluate_layer(k, q.reshape(Q, HKV * G, D), {"exact": k}, fracs=(0.02,))
    assert torch.allclose(out["exact"]["wsum"]["recall"], torch.ones(1, Q, HKV))
    assert torch.allclose(out["exact"]["wsum"]["mass"], torch.ones(1, Q, HKV))
    assert (out["exact"]["sumq"]["mass"] <= 1 + 1e-5).all()
    assert ((share > 0) & (share <= 1 + 1e-6)).all()
