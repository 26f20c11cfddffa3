"""The quality suite in small: vAttention answers the RULER-style cases as well as full attention
(within one case), the calibration is measured, and the plots are written."""

from __future__ import annotations

import pytest

import vengine
from vengine.eval.run import EvalSettings, plot, run_eval

pytestmark = pytest.mark.slow


def test_small_suite_vattention_within_one_case_of_full(tmp_path):
    llm = vengine.LLM(max_context=2048 + 512, max_batch=6)
    s = EvalSettings(tasks=("niah_single", "niah_multikey", "vt"), context=2048, cases=2,
                     epsilons=(0.1,), delta=0.1, baselines=False)
    results = run_eval(llm, s)
    full, sparse = results["modes"]["full"], results["modes"]["vattention eps=0.1"]
    n_cases = s.cases * len(s.tasks)
    correct = {k: sum(a / 100 * s.cases for a in m["accuracy"].values())
               for k, m in (("full", full), ("vattention", sparse))}
    print(results["modes"], correct)
    assert correct["vattention"] >= correct["full"] - 1, correct
    assert 0 < sparse["density"] < 1 and full["density"] == 1.0
    assert correct["full"] >= 1, "the cases must be solvable for the comparison to mean anything"
    cal = results["calibration"]["rows"][0]
    assert cal["violation_rate"] <= 0.1 + 0.05
    pngs = plot(results, tmp_path)
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert n_cases == 6
