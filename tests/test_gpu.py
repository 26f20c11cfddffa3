"""The GPU path, on the GPU machine (`pytest -m gpu`): the engine on CUDA against the CPU path,
CUDA-graph decode against eager decode, vAttention over the pinned host pool (UVA reads by the
Triton kernels) against full attention, and vAttention's (epsilon, delta) guarantee computed by the
Triton kernels on bf16 pools in pinned host memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import CAPTURED, CFG, SYNTHETIC, random_problem, slack, violation_rate

import vengine
from vengine.eval.activations import DecodeProblem, corpus_text

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
GREEDY = dict(max_new_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def cpu_llm():
    return vengine.LLM(device="cpu", dtype="float32", max_context=2048, attention="full")


@pytest.fixture(scope="module")
def story(cpu_llm):
    ids = cpu_llm.chat_ids(PROMPT)
    return ids, cpu_llm.generate(ids, **GREEDY)[0].token_ids


def test_full_attention_greedy_same_on_cpu_and_gpu(cpu_llm, story):
    ids, cpu_tokens = story
    gpu32 = vengine.LLM(device="cuda", dtype="float32", max_context=2048, attention="full")
    assert gpu32.generate(ids, **GREEDY)[0].token_ids == cpu_tokens
    # bf16: teacher-forced on the CPU's tokens, the same argmax almost everywhere and log-probs
    # of the CPU's tokens within bf16 noise; free-running greedy agrees on a prefix.
    gpu16 = vengine.LLM(device="cuda", dtype="bfloat16", max_context=2048, attention="full")
    seq = ids + cpu_tokens
    span = slice(len(ids) - 1, len(seq) - 1)
    ref, got = (llm.logits(seq)[span].log_softmax(-1) for llm in (cpu_llm, gpu16))
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    target = torch.tensor(cpu_tokens)[:, None]
    gap = (got.gather(1, target) - ref.gather(1, target)).abs().max().item()
    free = gpu16.generate(ids, **GREEDY)[0].token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(free, cpu_tokens)) if a != b), len(free))
    print(f"bf16 GPU vs fp32 CPU: argmax agreement {agree:.3f}, max log-prob gap {gap:.3f}, "
          f"greedy prefix {prefix}/{len(free)}")
    assert agree >= 0.95 and gap < 0.5 and prefix >= 8


def test_cuda_graph_decode_matches_eager(story):
    ids, _ = story
    eager = vengine.LLM(device="cuda", dtype="float32", max_context=2048, attention="full",
                        cuda_graphs=False)
    graphed = vengine.LLM(device="cuda", dtype="float32", max_context=2048, attention="full")
    a, b = (llm.generate(ids, **GREEDY)[0].token_ids for llm in (eager, graphed))
    assert graphed.runner.graph_error is None and graphed.runner.graphs
    assert not eager.runner.graphs
    assert a == b


def test_vattention_over_pinned_pool_is_exact_when_every_row_is_fixed(story):
    ids, _ = story
    spec = vengine.VAttention(sink=1024, window=1024, seed=0)  # every row is sink or window
    sparse = vengine.LLM(device="cuda", dtype="float32", max_context=2048, attention=spec)
    full = vengine.LLM(device="cuda", dtype="float32", max_context=2048, attention="full")
    pool = sparse.pool
    assert pool.k.is_pinned() and not pool.k.is_cuda and pool.k_view.is_cuda
    a, b = (llm.generate(ids, **GREEDY)[0] for llm in (sparse, full))
    assert sparse.runner.graph_error is None and sparse.runner.graphs
    assert a.token_ids == b.token_ids
    assert a.stats["density"] == pytest.approx(1.0)


def test_vattention_long_context_on_gpu():
    spec = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.03,
                              pilot=256, seed=0)
    sparse = vengine.LLM(device="cuda", max_context=8192, attention=spec)
    full = sparse.with_attention("full")
    ids = sparse.tokenizer.encode(corpus_text())[:4000]
    a, b = (llm.generate(ids, max_new_tokens=32, ignore_eos=True)[0] for llm in (sparse, full))
    prefix = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), 32)
    print(f"4K context bf16: density {a.stats['density']:.3f}, certificate "
          f"{a.stats['certificate_violation_rate']:.4f}, greedy agreement prefix {prefix}/32")
    assert sparse.runner.graph_error is None and sparse.runner.graphs
    assert a.stats["sparse_steps"] == 31 and a.stats["density"] < 0.6  # token 1: prefill's
    assert a.token_ids[0] == b.token_ids[0]  # from the exact prefill


def test_fp8_kv_on_gpu():
    """kv_dtype="fp8" on the pinned pool (the Triton store and attention kernels on e4m3 rows,
    resident pages, CUDA graphs): full attention decodes the same tokens in graphs as eagerly,
    and vAttention at 4K follows bf16 KV from the exact prefill on (agreement printed)."""
    full = [vengine.LLM(device="cuda", max_context=8192, attention="full", kv="host",
                        kv_dtype="fp8", cuda_graphs=g) for g in (True, False)]
    ids = full[0].tokenizer.encode(corpus_text())[:4000]
    a, b = (llm.generate(ids, max_new_tokens=24, ignore_eos=True)[0] for llm in full)
    assert full[0].pool.k.dtype == torch.float8_e4m3fn and full[0].pool.k.is_pinned()
    assert full[0].runner.graph_error is None and full[0].runner.graphs
    assert a.token_ids == b.token_ids
    spec = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.03,
                              pilot=256, seed=0)
    fp8, bf16 = (vengine.LLM(device="cuda", max_context=8192, attention=spec, kv_dtype=d)
                 for d in ("fp8", "auto"))
    c, d = (llm.generate(ids, max_new_tokens=32, ignore_eos=True)[0] for llm in (fp8, bf16))
    prefix = next((i for i, (x, y) in enumerate(zip(c.token_ids, d.token_ids)) if x != y), 32)
    print(f"4K fp8 KV: density {c.stats['density']:.3f}, certificate "
          f"{c.stats['certificate_violation_rate']:.4f}, greedy agreement with bf16 KV "
          f"{prefix}/32; full attention fp8 vs vAttention fp8 prefix "
          f"{next((i for i, (x, y) in enumerate(zip(a.token_ids, c.token_ids)) if x != y), 24)}")
    assert fp8.runner.graph_error is None and fp8.runner.graphs
    assert c.token_ids[0] == d.token_ids[0] and c.stats["density"] < 0.6


def test_decode_step_does_not_synchronize_the_host():
    """Budgets, counts and row lists stay on the device: any op that waits for the GPU raises
    under sync debug mode "error"."""
    from vengine.engine.sampling import SamplingParams

    spec = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.03,
                              pilot=256, seed=0)
    llm = vengine.LLM(device="cuda", max_context=4096, attention=spec, cuda_graphs=False)
    ids = llm.tokenizer.encode(corpus_text())[:2000]
    seq = llm.new_request(ids, SamplingParams())
    llm.runner.prefill(seq)
    seq.output_ids.append(ids[-1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = llm.runner.decode([seq])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (1, llm.model.config.vocab_size) and logits.isfinite().all()


# -- the guarantee, on the GPU's kernels and memory ---------------------------------------------

def on_gpu(p: DecodeProblem) -> tuple[DecodeProblem, DecodeProblem]:
    """(exact problem in float32 on the GPU, the same rows as bf16 pools in pinned host memory
    read through UVA views); the exact one holds the bf16-rounded values."""
    from vengine.offload.uva import uva_view

    k16, v16 = p.k_pool.bfloat16().pin_memory(), p.v_pool.bfloat16().pin_memory()
    exact = dataclasses.replace(p, k_pool=k16.float(), v_pool=v16.float())
    exact = DecodeProblem(*(tuple(t.cuda() for t in x) if isinstance(x, tuple)
                            else x.cuda() if isinstance(x, torch.Tensor) else x
                            for x in (getattr(exact, f.name) for f in dataclasses.fields(exact))))
    host = dataclasses.replace(exact, k_pool=uva_view(k16), v_pool=uva_view(v16))
    return exact, host


def gpu_violation_rate(problems, cfg: vengine.VAttention, seeds: int):
    """violation_rate with the Triton kernels reading bf16 pools in pinned host memory."""
    from vengine.kernels import triton as triton_gpu

    return violation_rate(problems, cfg, seeds, triton_gpu, place=on_gpu)[:2]


@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_guarantee_on_gpu_synthetic(epsilon, delta):
    problems = [random_problem(B=4, n=4000, seed=s, **SYNTHETIC[kind])
                for s in range(2) for kind in sorted(SYNTHETIC)]
    rate, n = gpu_violation_rate(problems, vengine.VAttention(epsilon=epsilon, delta=delta, **CFG),
                                 seeds=4)
    print(f"GPU synthetic eps={epsilon} delta={delta}: violations {rate:.4f} of {n}")
    assert rate <= delta + slack(delta, n)


@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_guarantee_on_gpu_captured(captured, epsilon, delta):
    cfg = vengine.VAttention(epsilon=epsilon, delta=delta, **CAPTURED)
    rate, n = gpu_violation_rate(captured, cfg, seeds=2)
    print(f"GPU captured eps={epsilon} delta={delta}: violations {rate:.4f} of {n}")
    assert rate <= delta + slack(delta, n)


def test_pinned_pool_pins_slabs_as_pages_are_handed_out(monkeypatch):
    """The host pool pins nothing but its first slab up front; pages handed out later are pinned
    slab by slab, each layer before its first write (or all before a decode step), and the GPU
    writes and reads them through the UVA views (rows written by the Triton store land in host
    memory, exactly)."""
    from vengine.kernels import get_kernels
    from vengine.offload import kv_pool

    L, H, P, D = 2, 2, 16, 64
    page_bytes = 2 * L * H * P * D * 2
    monkeypatch.setattr(kv_pool, "SLAB_BYTES", 4 * page_bytes)  # 4 pages a slab
    pool = kv_pool.KVPool(L, H, D, P, 40, torch.bfloat16, torch.device("cpu"),
                          pin=True)
    assert pool.pinned_pages == 4 and pool.num_pages == 40
    table: list[int] = []
    pool.allocator.grow(table, 10 * P)  # pages 0..9: three slabs, pinned as layers write
    assert pool.pinned_pages == 4
    slots = torch.tensor([9 * P + 3, 5 * P], device="cuda")
    k = torch.randn(2, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kernels = get_kernels(torch.device("cuda"), torch.bfloat16)
    for layer in range(L):
        with pool.writing(layer, slots, k, v):
            kernels.store_rows(k, v, slots, pool.k_view[layer], pool.v_view[layer])
        assert pool.layer_pinned[: layer + 1] == [12] * (layer + 1)
    assert pool.pinned_pages == 12
    torch.cuda.synchronize()
    assert torch.equal(pool.k[1, 9, :, 3], k[0].cpu()) and torch.equal(pool.v[0, 5, :, 0], v[1].cpu())
    pool.allocator.free(table)
    pool.allocator.grow(table, 3 * P)
    assert table == [0, 1, 2] and pool.pinned_pages == 12, "freed pages are reused first"


def test_memory_plan_fits_the_gpu_budget_it_is_given():
    """With --gpu-mem below what is free, the plan's prefill chunk and pages keep the measured
    peak within it: an 8K prefill and decode on the default model with a 1 GiB budget."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests left
    llm = vengine.LLM(device="cuda", max_context=8192, gpu_mem="1GiB", max_batch=2)
    ids = (llm.tokenizer.encode(corpus_text()) * 4)[:7000]
    out = llm.generate(ids, max_new_tokens=16, ignore_eos=True)[0]
    assert len(out.token_ids) == 16
    assert torch.cuda.max_memory_allocated() - before <= 2**30, llm.memory


@pytest.mark.parametrize("case, pooled", [("gemma3", 1), ("mistral", 0), ("gemma2", 2)])
def test_sliding_window_models_on_gpu_as_transformers(hf_tok, tmp_path, case, pooled):
    """Window layers' rings on the device, graph-captured decode past the window, (Mistral) a
    model that pools no layer at all and (Gemma 2) soft-capped scores: greedy tokens as
    transformers' on the CPU."""
    from test_models import TEXTS, TINY_CASES, _save, _tiny_model

    arch, extra, _ = TINY_CASES[case]
    model = _tiny_model(arch, len(hf_tok), **extra)
    path = _save(model, hf_tok, tmp_path / case)
    prompt = hf_tok(TEXTS["prose"])["input_ids"][:40]
    with torch.inference_mode():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            min_new_tokens=24)[0, 40:].tolist()
    for attention in ("full", "vattention"):
        llm = vengine.LLM(model=str(path), device="cuda", dtype="float32", attention=attention)
        assert llm.pool.k.shape[0] == pooled
        out = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)[0].token_ids
        assert llm.runner.graph_error is None and llm.runner.graphs, attention
        assert out == hf, f"{case} {attention} on cuda"


def test_row_cache_keeps_the_tokens_and_reads_repeated_rows_on_the_gpu():
    """VAttention(row_cache=1) on the pinned pool, in CUDA graphs: the same greedy tokens as
    without it (where rows are read from does not change what is attended), and from the second
    decode step on, predicted top-k rows come from the cache (hit rate printed)."""
    spec = vengine.VAttention(epsilon=0.1, delta=0.1, sink=64, window=64, top_k=0.03,
                              pilot=256, seed=0)
    llms = [vengine.LLM(device="cuda", max_context=8192, attention=dataclasses.replace(
        spec, row_cache=n)) for n in (0, 1)]
    ids = llms[0].tokenizer.encode(corpus_text())[:4000]
    plain, cached = (llm.generate(ids, max_new_tokens=32, ignore_eos=True)[0] for llm in llms)
    print(f"4K row cache: hit rate {cached.stats['row_cache_hit_rate']:.3f}, density "
          f"{cached.stats['density']:.3f}")
    assert llms[1].runner.graph_error is None and llms[1].runner.graphs
    assert cached.token_ids == plain.token_ids
    assert cached.stats["row_cache_hit_rate"] > 0.3 and plain.stats["row_cache_hit_rate"] == 0
