"""The quality suite in small: vAttention answers the RULER-style cases as well as full attention
(within one case), the calibration is measured, and the plots are written."""

from __future__ import annotations

import pytest

import vengine
from vengine.eval.run import EvalSettings, plot, run_eval

pytestmark = pytest.mark.slow


def test_small_suite_vattention_within_one_case_of_full(tmp_path):
    llm = vengine.LLM(max_context=2048 + 512, max_batch=6)
    s = EvalSettings(tasks=("niah_single", "niah_multikey"), context=2048, cases=2, epsilons=(0.1,),
                     delta=0.1, guarantees=("denominator", "output"),
                     calibration_epsilons=(0.1, 0.3))  # two: a correlation needs a spread
    results = run_eval(llm, s)
    full, sparse = results["modes"]["full"], results["modes"]["vattention eps=0.1"]
    n_cases = s.cases * len(s.tasks)
    correct = {k: sum(a / 100 * s.cases for a in m["accuracy"].values())
               for k, m in (("full", full), ("vattention", sparse))}
    print(results["modes"], correct)
    assert correct["vattention"] >= correct["full"] - 1, correct
    assert 0 < sparse["density"] < 1 and full["density"] == 1.0
    assert correct["full"] >= 1, "the cases must be solvable for the comparison to mean anything"
    for guarantee in ("denominator", "output"):
        cal = results["calibration"][guarantee]["rows"][0]
        assert cal["violation_rate"] <= 0.1 + 0.05
    vs = sparse["vs_full"]
    assert vs["n"] == n_cases and vs["lo"] <= vs["diff"] <= vs["hi"]
    pngs = plot(results, tmp_path)
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert n_cases == 4


def test_baseline_and_oracle_backends_in_the_engine_match_full_attention_when_exact():
    """The eval's plug-in backends gather the step's pages from the pool themselves: at density 1
    oracle top-k attends every row, and vAttention with the exact predictor and a top_k larger
    than the context picks every row; both must then decode what full attention decodes."""
    from vengine.eval.baselines import OracleVAttention, SparseBaseline
    from vengine.eval.activations import corpus_text

    llm = vengine.LLM(max_context=1024, max_batch=2)
    prompts = [llm.tokenizer.encode(corpus_text()[i * 3000:][:2400]) for i in range(2)]
    params = vengine.SamplingParams(max_new_tokens=8)

    def tokens(attention):
        engine = llm.with_attention(attention)
        done = dict(engine.completions([(i, p, params) for i, p in enumerate(prompts)]))
        return [done[i].token_ids for i in range(len(prompts))], [done[i].stats for i in done]

    full, _ = tokens("full")
    oracle_topk, stats = tokens(SparseBaseline("oracle_topk", 1.0, sink=16, window=16))
    assert oracle_topk == full and stats[0]["sparse_steps"] > 0
    every_row = vengine.VAttention(sink=16, window=16, top_k=4096, seed=0, exact_below=0)
    oracle_va, stats = tokens(OracleVAttention(every_row))
    assert oracle_va == full and stats[0]["density"] == 1.0



class _WordTokenizer:
    """Whitespace tokens: enough for the tasks' length budgets."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue",
                                  "niah_multiquery", "vt"])
def test_completion_prompts_begin_the_answer_for_base_models(task):
    """--prompt completion: the question, then RULER's answer prefix naming what was asked,
    never the answer itself (a base model continues it; Gemma 3 270M answers nothing through
    a chat wrapper)."""
    from vengine.eval.tasks import make_cases

    for case in make_cases(task, _WordTokenizer(), 600, 3, seed=1):
        question = case.prompt.rsplit("\n", 1)[-1]
        assert case.completion == f"{case.prompt}\nAnswer: {case.answer_prefix}"
        assert case.answer_prefix.rstrip(":").split()[-1] in ("is", "are", "they")
        if task.startswith("niah"):
            key = question.split(" for ", 1)[1].split(" mentioned")[0]
            assert f" for {key} mentioned" in case.answer_prefix
            assert not any(a in case.answer_prefix for a in case.answers)
