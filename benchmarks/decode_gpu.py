"""Decode on the GPU at Llama-3.1-8B shapes (random bf16 weights), three ways side by side.

(a) resident:  full attention with the KV in GPU memory ([B, Hkv, S, D] per layer), the step
               captured in a CUDA graph: the ceiling when the KV fits on the GPU. Each of
               RESIDENT_ATTENTION is measured (SDPA with enable_gqa as SDPA picks and held
               to flash, cuDNN and memory-efficient; the group's query heads as rows; flex
               attention's split-KV decoding) and the fastest per shape is quoted.
(b) offloaded: full attention over the pinned host KV, each layer's KV copied to the GPU on a side
               stream one layer ahead (double buffer) - what transformers' OffloadedCache does.
               Our own equivalent (not transformers' class), so that (b) and (c) read the very same
               pinned pages and share the model code.
(c) vengine:   the engine's own parts: pinned paged pool read through UVA views by the Triton
               kernels, VAttentionBackend, ModelRunner (eager and CUDA graph), verified at
               epsilon = delta in --epsilons (the CLT budget decides), and at fixed budgets
               (max_sample caps the sample, so random weights do not decide the density):
               labelled unverified, their certificate beside them.

The host KV is filled with random rows (the shapes decide the speed); the GPU's key codes are
computed from them. Per config: tokens/s, ms per step, for (c) the split of a step into
selection / fetch+attention / rest (one layer replayed as CUDA graphs, times the layers), bytes
read over PCIe per step and their GB/s against a bulk pinned-to-GPU copy timed in the same run,
and GPU memory for KV state per token. Also prefill tokens/s of a long prompt (layer by layer).
Writes JSON (--out); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import vengine
from vengine.attention.base import LayerBackends
from vengine.attention.context import StepContext
from vengine.attention.vattention import VAttentionBackend, vattention_decode
from vengine.engine.model_runner import ModelRunner
from vengine.engine.sampling import SamplingParams
from vengine.engine.sequence import Sequence
from vengine.kernels import triton as triton_gpu
from vengine.kernels.common import Fp8Rows, encode_pages, fp8_quantise, pool_rows
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KVPool

from common import (  # benchmarks/common.py (this script's folder)
    DEV, DTYPE, LLAMA_8B, build_model, bulk_copy_gbs, git_commit, gpu_ms, graphed, median_ms,
    release, save)

PAGE = 64


def fixed_budget(top_k: float = 0.02) -> vengine.VAttention:
    """Beyond sink and window: top_k of the rows, a 256-row pilot, at most 0.5% more."""
    return vengine.VAttention(epsilon=0.05, delta=0.05, sink=128, window=128, top_k=top_k,
                              pilot=256, max_sample=0.005, seed=0)


def clt_budget(eps: float) -> vengine.VAttention:
    """Verified: epsilon = delta = eps, the CLT budget decides the sample (the defaults)."""
    return vengine.VAttention(epsilon=eps, delta=eps, sink=128, window=128, top_k=0.02,
                              pilot=256, seed=0, exact_below=0)


def fill_pool(pool: KVPool, backend: VAttentionBackend, pages: int) -> None:
    """Random K/V rows in the first `pages` pages of every layer, and their key codes."""
    g = torch.Generator(DEV).manual_seed(0)
    L, _, H, P, D = pool.k.shape
    pool.allocator.grow([], pages * P)  # hands the pages out
    pool.pin_all()  # and page-locks them: the kernels read them through the UVA views
    step = pool.slab_pages  # one pinned slab at a time: a copy may not span two registrations
    for layer in range(L):
        codes, scales = backend.codes.layer(layer)
        for p0 in range(0, pages, step):
            p1 = min(p0 + step, pages)
            k = torch.randn(p1 - p0, H, P, D, device=DEV, dtype=DTYPE, generator=g)
            v = torch.randn_like(k)
            if pool.fp8:  # rows as store_rows would write them; codes of the keys as stored
                (k8, pool.k_scale[layer, p0:p1]), (v8, pool.v_scale[layer, p0:p1]) = \
                    fp8_quantise(k), fp8_quantise(v)
                pool.k[layer, p0:p1].copy_(k8, non_blocking=True)
                pool.v[layer, p0:p1].copy_(v8, non_blocking=True)
                k = pool_rows(Fp8Rows(k8, pool.k_scale[layer, p0:p1]), slice(None))
            else:
                pool.k[layer, p0:p1].copy_(k, non_blocking=True)
                pool.v[layer, p0:p1].copy_(v, non_blocking=True)
            codes[p0:p1], scales[p0:p1] = encode_pages(k, backend.cfg.key_bits)
    torch.cuda.synchronize()


def step_context(B: int, context: int) -> StepContext:
    """A decode step's context for backends that keep their own KV (no slots or tables)."""
    lens = torch.full((B,), context + 1, device=DEV)
    return StepContext(False, torch.zeros(B, dtype=torch.long, device=DEV), None, lens,
                       tuple(range(B)))


class Resident:
    """(a) KV in GPU memory, one [B, Hkv, S, D] tensor per layer; the decode token at `pos`;
    attention by one of RESIDENT_ATTENTION (the run measures each and quotes the fastest)."""

    def __init__(self, cfg: ModelConfig, B: int, context: int, attend) -> None:
        shape = (cfg.num_layers, B, cfg.num_kv_heads, context + 1, cfg.head_dim)
        self.k = torch.randn(shape, device=DEV, dtype=DTYPE)
        self.v = torch.randn(shape, device=DEV, dtype=DTYPE)
        self.pos, self.attend = context, attend

    def __call__(self, layer, q, k, v, ctx):  # the model's attention, every layer
        self.k[layer, :, :, self.pos], self.v[layer, :, :, self.pos] = k, v
        return self.attend(q, self.k[layer], self.v[layer])


def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D] over k, v [B, Hkv, S, D]: the group's query heads as G query rows (no
    padding mask: every row is live)."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k, v).reshape(B, Hq, D)


def sdpa_gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, 1, D] against K/V heads shared by enable_gqa: SDPA's flash decode path."""
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def sdpa_backend(backend: str):
    """sdpa_gqa_decode with SDPA held to one kernel (flash, cuDNN, memory-efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend)

    def attend(q, k, v):
        with sdpa_kernel(chosen):
            return sdpa_gqa_decode(q, k, v)
    return attend


_flex = None


def flex_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's flex attention, compiled: for one query row it runs its split-KV decoding kernel
    (flex decoding: the keys split across thread blocks, partial softmaxes combined)."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


RESIDENT_ATTENTION = {  # (a)'s candidates; one that cannot run here is kept with its error
    "sdpa group rows": gqa_decode, "sdpa enable_gqa": sdpa_gqa_decode,
    "sdpa flash enable_gqa": sdpa_backend("FLASH_ATTENTION"),
    "sdpa cudnn enable_gqa": sdpa_backend("CUDNN_ATTENTION"),
    "sdpa mem-efficient enable_gqa": sdpa_backend("EFFICIENT_ATTENTION"),
    "flex attention (split-KV decoding)": flex_decode}


class Streamed:
    """(b) Full attention over the pinned pool: layer i+1's pages are copied to the GPU on a side
    stream while layer i computes (two buffers); the new token's K/V written back to the host."""

    def __init__(self, pool: KVPool, B: int, context: int) -> None:
        self.pool, self.B, self.context = pool, B, context
        self.pages = B * (context // PAGE + 1)  # the B sequences' pages: one contiguous range
        _, _, H, P, D = pool.k.shape
        self.bufs = [(torch.empty(self.pages, H, P, D, device=DEV, dtype=DTYPE),
                      torch.empty(self.pages, H, P, D, device=DEV, dtype=DTYPE)) for _ in range(2)]
        self.stream = torch.cuda.Stream()
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]

    def _prefetch(self, layer: int) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())  # the buffer's last reader is done
        with torch.cuda.stream(self.stream):
            kb, vb = self.bufs[layer % 2]
            for p0 in range(0, self.pages, self.pool.slab_pages):  # a copy per pinned slab
                p1 = min(p0 + self.pool.slab_pages, self.pages)
                kb[p0:p1].copy_(self.pool.k[layer, p0:p1], non_blocking=True)
                vb[p0:p1].copy_(self.pool.v[layer, p0:p1], non_blocking=True)
            self.ready[layer % 2].record()

    def __call__(self, layer, q, k, v, ctx):  # the model's attention, every layer
        if layer == 0:
            self._prefetch(0)
        torch.cuda.current_stream().wait_event(self.ready[layer % 2])
        if layer + 1 < len(self.pool.k):
            self._prefetch(layer + 1)
        triton_gpu.store_rows(k, v, ctx.slots, self.pool.k_view[layer],
                              self.pool.v_view[layer])  # the engine's write kernel, no codes
        kb, vb = self.bufs[layer % 2]
        n, H, P, D = kb.shape
        per_seq = n // self.B
        kk = kb.view(self.B, per_seq, H, P, D).transpose(1, 2).reshape(self.B, H, -1, D)
        vv = vb.view(self.B, per_seq, H, P, D).transpose(1, 2).reshape(self.B, H, -1, D)
        kk, vv = kk[:, :, : self.context + 1], vv[:, :, : self.context + 1]
        kk[:, :, self.context], vv[:, :, self.context] = k, v
        return sdpa_gqa_decode(q, kk, vv)  # (a)'s fastest call, so (b) is not slowed by layout


class RecordingKernels:
    """The Triton kernels, recording the calls that read K/V rows (the fetch) with their args."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):  # selection and statistics: not recorded
        return getattr(triton_gpu, name)

    def row_scores(self, *args):
        self.calls.append((triton_gpu.row_scores, args, {}))
        return triton_gpu.row_scores(*args)

    def partial_attention(self, *args, **kwargs):
        self.calls.append((triton_gpu.partial_attention, args, kwargs))
        return triton_gpu.partial_attention(*args, **kwargs)


def one_layer(cfg: ModelConfig, backend: VAttentionBackend, tables, B: int, context: int):
    """Layer 0's vAttention decode over the filled pool at a random query, as fn(kernels), and
    its generator (a CUDA graph registers it)."""
    q = torch.randn(B, cfg.num_heads, cfg.head_dim, device=DEV, dtype=DTYPE) * 1.3
    lens = torch.full((B,), context + 1, device=DEV)
    gen = torch.Generator(DEV).manual_seed(0)
    pool = backend.pool
    seqs = [Sequence(i, [1] * (context + 1), SamplingParams()) for i in range(B)]
    for i, s in enumerate(seqs):
        s.block_table, s.num_cached = tables[i].tolist(), context
    backend.begin_step(seqs, is_prefill=False)  # sink and window pages copied to the GPU, as in a decode step

    def layer(kernels):
        return vattention_decode(q, pool.k_layer(0), pool.v_layer(0), tables, lens,
                                 backend.codes.layer(0), backend.cfg, gen, kernels,
                                 backend.resident_layer(0))

    return layer, gen


def host_rows(backend: VAttentionBackend, tables, rows, counts) -> int:
    """How many of the listed rows are read over PCIe (not from a page's GPU copy)."""
    live = torch.arange(rows.shape[-1], device=DEV) < counts[..., None]
    pages = tables.gather(1, (rows.masked_fill(~live, 0) // PAGE).flatten(1)).view(rows.shape)
    on_host = backend.resident.slot_of[pages] < 0 if backend.resident else True
    return int((live & on_host).sum())


def layer_split(cfg: ModelConfig, backend: VAttentionBackend, tables, B: int,
                context: int) -> dict:
    """One layer's vAttention decode as CUDA graphs (so launch overhead does not count): the
    whole layer, and its fetch alone (the recorded row_scores + partial_attention calls, which read
    K/V over PCIe and attend); selection = the difference. Also the bytes the fetch reads."""
    layer, gen = one_layer(cfg, backend, tables, B, context)
    recorder = RecordingKernels()
    layer(recorder)
    layer_ms = gpu_ms(graphed(lambda: layer(triton_gpu), gen))
    fetch_ms = gpu_ms(graphed(lambda: [fn(*a, **kw) for fn, a, kw in recorder.calls]))
    rows = 0  # K or V rows read over PCIe: row_scores reads K, partial_attention K and V (only V
    for fn, a, kw in recorder.calls:  # when given the rows' scores)
        if fn is triton_gpu.row_scores:
            rows += host_rows(backend, tables, a[3], a[4])
        else:
            rows += host_rows(backend, tables, a[4], a[5]) * (1 if "scores" in kw else 2)
    return {"layer_ms": layer_ms, "fetch_ms": fetch_ms,
            "layer_bytes": rows * cfg.head_dim * backend.pool.dtype.itemsize}


def profile_layer(cfg: ModelConfig, backend: VAttentionBackend, tables, context: int) -> str:
    """torch.profiler's table of one layer's eager vAttention decode at batch 1: GPU time per
    kernel, to see what the selection spends."""
    from torch.profiler import ProfilerActivity, profile

    layer, _ = one_layer(cfg, backend, tables, 1, context)
    for _ in range(3):
        layer(triton_gpu)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            layer(triton_gpu)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def offloaded(model, pool, B: int, context: int, args, base, ids, positions, tables) -> list:
    """(b): full attention over the pinned host KV, streamed layer by layer (bf16 pools)."""
    cfg, L = model.config, model.config.num_layers
    kv_token_bytes = cfg.kv_bytes_per_token(DTYPE.itemsize)
    st, rows = Streamed(pool, B, context), []
    ctx = StepContext(False, tables[:, context // PAGE] * PAGE + context % PAGE, tables,
                      positions + 1, tuple(range(B)))
    ms = median_ms(lambda: model.compute_logits(model(ids, positions, ctx, st)),
                   args.stream_repeats)
    nbytes = B * (context // PAGE + 1) * PAGE * kv_token_bytes
    rows.append({**base, "mode": "b offloaded", "ms_per_step": ms, "pcie_bytes_per_step": nbytes,
                 "pcie_gbs": nbytes / ms / 1e6,
                 "gpu_kv_bytes_per_token": 2 * kv_token_bytes / L})
    del st, ctx
    release()
    return rows


def profile_step(model, pool, backend: VAttentionBackend, context: int) -> str:
    """torch.profiler's table of three whole eager decode steps at batch 1 (every layer: norms,
    GEMVs, RoPE, stores, selection, attention, LM head): where the step's time goes beside the
    selection and the fetch."""
    from torch.profiler import ProfilerActivity, profile

    L = model.config.num_layers
    runner = ModelRunner(model, pool, LayerBackends([backend] * L), DEV, cuda_graphs=False)
    seq = Sequence(0, [1] * (context + 1), SamplingParams())
    seq.block_table, seq.num_cached = list(range(context // PAGE + 1)), context
    for _ in range(2):  # compiled and warm
        runner.decode([seq])
        seq.num_cached = context
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.decode([seq])
            seq.num_cached = context
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=45)


def run_config(model, pool, backends, B: int, context: int, args, bulk_gbs: float) -> list[dict]:
    cfg = model.config
    L = cfg.num_layers
    kv_token_bytes = cfg.kv_bytes_per_token(DTYPE.itemsize)
    rows, ids = [], torch.zeros(B, dtype=torch.long, device=DEV)
    positions = torch.full((B,), context, device=DEV)
    base = {"context": context, "batch": B}

    # (a) resident, if it fits next to the weights: every attention candidate, the fastest quoted
    free = torch.cuda.mem_get_info()[0]
    if B * (context + 1) * kv_token_bytes < free - (6 << 30):
        before = torch.cuda.memory_allocated()
        res = Resident(cfg, B, context, gqa_decode)
        kv_bytes = torch.cuda.memory_allocated() - before
        ctx = step_context(B, context)
        for name in args.resident.split(","):
            attend = RESIDENT_ATTENTION[name]
            res.attend = attend
            try:
                q = torch.randn(B, cfg.num_heads, cfg.head_dim, device=DEV, dtype=DTYPE)
                ref = gqa_decode(q, res.k[0], res.v[0]).float()
                diff = ((attend(q, res.k[0], res.v[0]).float() - ref).abs().max()
                        / ref.abs().max()).item()  # the same attention, or not a candidate
                forward = lambda: model.compute_logits(model(ids, positions, ctx, res))  # noqa: E731
                try:  # a CUDA graph, as vengine's decode runs; eager where capture fails
                    step, how = graphed(forward), "graph"
                except Exception as e:
                    torch.cuda.synchronize()
                    step, how = forward, f"eager (capture: {type(e).__name__})"
                rows.append({**base, "mode": f"a resident ({name})", "ms_per_step":
                             median_ms(step, args.repeats), "run": how,
                             "gpu_kv_bytes_per_token": kv_bytes / (B * (context + 1)),
                             "max_rel_diff_vs_group_rows": diff})
                del step
            except Exception as e:  # a kernel this GPU or shape does not offer: a result too
                rows.append({**base, "mode": f"a resident ({name})", "ms_per_step": None,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                torch.cuda.synchronize()
            print(f"  {context}x{B} {rows[-1]['mode']}: {rows[-1].get('ms_per_step')} ms "
                  f"{rows[-1].get('run', rows[-1].get('error'))}", flush=True)
        ok = [r for r in rows if r["mode"].startswith("a resident") and r["ms_per_step"]
              is not None and r["max_rel_diff_vs_group_rows"] < 0.02]
        best = min(ok, key=lambda r: r["ms_per_step"]) if ok else {**base, "ms_per_step": None}
        rows.append({**best, "mode": "a resident (fastest)", "attention": best.get("mode")})
        del res, ctx
    else:
        rows.append({**base, "mode": "a resident (fastest)", "ms_per_step": None,
                     "note": "KV does not fit in GPU memory next to the weights"})

    release()
    tables = torch.arange(B * (context // PAGE + 1), device=DEV).view(B, -1)
    if not pool.fp8:
        rows += offloaded(model, pool, B, context, args, base, ids, positions, tables)

    # (c) vengine, at a fixed budget and at epsilon = 0.05; eager and CUDA graph
    # (c) vengine, at a fixed budget and at epsilon = 0.05; eager and CUDA graph
    for name, backend in backends.items():
        if name.startswith("fixed top_k") and (context, B) != (args.sweep_context, 1):
            continue
        split = layer_split(cfg, backend, tables, B, context)
        for graphs in (False, True) if name == "fixed (unverified)" else (True,):  # eager once: the saving
            runner = ModelRunner(model, pool, LayerBackends([backend] * L), DEV,
                                 cuda_graphs=graphs)
            seqs = [Sequence(i, [1] * (context + 1), SamplingParams()) for i in range(B)]
            for i, s in enumerate(seqs):
                s.block_table, s.num_cached = tables[i].tolist(), context

            def step():
                runner.decode(seqs)
                for s in seqs:
                    s.num_cached = context

            ms = median_ms(step, args.repeats)
            stats = backend.seq_stats(0)
            select = split["layer_ms"] - split["fetch_ms"]
            pcie = L * split["layer_bytes"]
            D = cfg.head_dim  # codes: key_bits per element; scales: 4 bytes per channel and page
            code_bytes = L * cfg.num_kv_heads * (backend.cfg.key_bits * D / 8 + 4 * D / PAGE
                                                 + (4 if pool.fp8 else 0))  # fp8: K, V scales
            res = backend.resident  # the GPU copies of sink and window pages, all slots
            res_bytes = 0 if res is None else 2 * res.k.numel() * res.k.element_size()
            hit = stats.get("row_cache_hit_rate", 0.0)
            if backend.row_cache is not None:  # the predicted rows it read from the cache
                res_bytes += backend.row_cache.nbytes
                pcie -= (L * B * cfg.num_kv_heads * hit * backend.cfg.top_k_rows(context + 1)
                         * 2 * cfg.head_dim * pool.dtype.itemsize)
            rows.append({**base, "mode": f"c vengine {name}" + (" graph" if graphs else ""),
                         "ms_per_step": ms, "density": stats["density"],
                         "certificate_violation_rate": stats["certificate_violation_rate"],
                         "select_ms": L * select, "fetch_attn_ms": L * split["fetch_ms"],
                         "rest_ms": ms - L * split["layer_ms"], "pcie_bytes_per_step": pcie,
                         "pcie_gbs": pcie / (L * split["fetch_ms"]) / 1e6,
                         "gpu_kv_bytes_per_token": code_bytes + res_bytes / (B * (context + 1)),
                         "row_cache_hit_rate": hit, "graph_error": runner.graph_error})
            if backend.row_cache is not None:  # the layer split runs without the cache
                rows[-1].update(select_ms=None, fetch_attn_ms=None, rest_ms=None, pcie_gbs=None,
                                pcie_note="derived: the uncached layer's bytes less the hit "
                                "rate times the top-k rows' K and V")
            for i in range(B):
                backend.free(i)
            del runner, step, seqs
            release()
            print(f"  GPU memory allocated after {rows[-1]['mode']}: "
                  f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    for r in rows:
        if r["ms_per_step"]:
            r["tokens_per_s"] = B * 1e3 / r["ms_per_step"]
        if r.get("pcie_gbs") is not None:
            r["pcie_fraction_of_bulk"] = r["pcie_gbs"] / bulk_gbs
    return rows


def prefill_rate(model, pool, backend, tokens: int) -> dict:
    runner = ModelRunner(model, pool, LayerBackends([backend] * model.config.num_layers), DEV,
                         prefill_chunk=tokens, prefill_piece=8192)
    seq = Sequence(10**6, torch.randint(0, 1000, (tokens,)).tolist(), SamplingParams())
    torch.cuda.synchronize()
    t = time.perf_counter()
    runner.prefill(seq)
    pool.wait_writes()
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    runner.release(seq)
    return {"mode": "prefill (vengine, layer by layer, 32K chunks)", "context": tokens,
            "seconds": s, "tokens_per_s": tokens / s,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}


@torch.inference_mode()  # no autograd: in-place KV writes would otherwise chain every step
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="8192x1,8192x4,8192x16,32768x1,32768x4,131072x1,"
                   "131072x2", help="context x batch, comma separated (the lent H100 "
                   "pins at most ~32 GiB: 32K x 16 and 128K x 4 do not fit)")
    p.add_argument("--resident", default=",".join(RESIDENT_ATTENTION),
                   help="(a)'s attention candidates, comma-separated")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--stream-repeats", type=int, default=3)
    p.add_argument("--prefill", default="32768,131072", help="prompt lengths to prefill ('' none)")
    p.add_argument("--layers", type=int, default=32, help="fewer layers for a quick look")
    p.add_argument("--sweep-top-k", default="0.01,0.005", help="more fixed budgets (top_k per "
                   "KV head) at --sweep-context, batch 1: how the step scales with density")
    p.add_argument("--profile", default="", help="also write torch.profiler's kernel table of "
                   "one layer of this backend (e.g. eps0.1) at --sweep-context (next to --out)")
    p.add_argument("--profile-step", default="", help="also write torch.profiler's table of three "
                   "whole eager decode steps of this backend (e.g. eps0.1) at --sweep-context")
    p.add_argument("--sweep-context", type=int, default=131072)
    p.add_argument("--epsilons", default="0.05,0.1,0.25", help="verified modes, epsilon = delta")
    p.add_argument("--row-cache", default="", help="also these verified modes (epsilon = delta) "
                   "with a row cache (VAttention.row_cache: the exact rows of the step before "
                   "kept on the GPU); each step here repeats the one before, so its hit rate is "
                   "the upper bound")
    p.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                   help="(c)'s host KV rows: bf16, or fp8 (e4m3, a scale per row); with fp8, "
                        "(b) (which copies bf16 layers) is not run")
    p.add_argument("--out", default="docs/decode_gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_gpu.py: needs a CUDA GPU (on CPU: benchmarks/decode.py)")

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    cfg = ModelConfig(**{**LLAMA_8B.__dict__, "num_layers": args.layers})
    model = build_model(cfg)
    bulk = bulk_copy_gbs()
    print(f"bulk pinned->GPU copy: {bulk:.1f} GB/s", flush=True)
    pages = max(B * (c // PAGE + 1) for c, B in configs)
    t = time.perf_counter()
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, PAGE, pages, DTYPE,
                  torch.device("cpu"), pin=True, fp8=args.kv_dtype == "fp8", compute_device=DEV)
    backends = {"fixed (unverified)": VAttentionBackend(fixed_budget(), pool, cfg, DEV)}
    codes = backends["fixed (unverified)"].codes  # the same keys: one copy of their codes
    for eps in (float(x) for x in args.epsilons.split(",")):
        backends[f"eps{eps}"] = VAttentionBackend(clt_budget(eps), pool, cfg, DEV)
        backends[f"eps{eps}"].codes = codes
    for eps in (float(x) for x in args.row_cache.split(",") if x):
        spec = dataclasses.replace(clt_budget(eps), row_cache=max(B for _, B in configs))
        backends[f"eps{eps} row cache"] = VAttentionBackend(spec, pool, cfg, DEV)
        backends[f"eps{eps} row cache"].codes = codes
    for k in (float(x) for x in args.sweep_top_k.split(",") if x):
        name = f"fixed top_k={k} (unverified)"
        backends[name] = VAttentionBackend(fixed_budget(k), pool, cfg, DEV)
        backends[name].codes = codes
    fill_pool(pool, backends["fixed (unverified)"], pages)
    print(f"pinned pool {pool.k.nbytes * 2 / 2**30:.1f} GiB allocated and filled in "
          f"{time.perf_counter() - t:.1f} s", flush=True)

    rows = []
    for context, B in configs:
        for r in run_config(model, pool, backends, B, context, args, bulk):
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.profile:
        tables = torch.arange(args.sweep_context // PAGE + 1, device=DEV)[None]
        table = profile_layer(cfg, backends[args.profile], tables, args.sweep_context)
        Path(args.out).with_suffix(".profile.txt").write_text(table)
        print(table, flush=True)
    if args.profile_step:
        table = profile_step(model, pool, backends[args.profile_step], args.sweep_context)
        Path(args.out).with_suffix(".step_profile.txt").write_text(table)
        print(table, flush=True)
    for n in (int(x) for x in args.prefill.split(",") if x):
        torch.cuda.reset_peak_memory_stats()
        rows.append(prefill_rate(model, pool, backends["eps0.1"], n))
        print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'context':>7} {'B':>3} {'mode':<26} {'ms/step':>8} {'tok/s':>7} {'density':>7} "
          f"{'select':>7} {'fetch':>7} {'rest':>7} {'GB/s':>6} {'KV B/tok':>9}")
    for r in rows:
        if "batch" not in r:
            continue

        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        print(f"{r['context']:>7} {r['batch']:>3} {r['mode']:<26} {f('ms_per_step', '8.2f'):>8} "
              f"{f('tokens_per_s', '7.1f'):>7} {f('density', '7.3f'):>7} "
              f"{f('select_ms', '7.2f'):>7} {f('fetch_attn_ms', '7.2f'):>7} "
              f"{f('rest_ms', '7.2f'):>7} {f('pcie_gbs', '6.1f'):>6} "
              f"{f('gpu_kv_bytes_per_token', '9.0f'):>9}")
    result = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat(),
              "commit": git_commit(), "torch": torch.__version__, "bulk_copy_gbs": bulk,
              "model": "Llama-3.1-8B shapes, random bf16 weights, layers=%d" % cfg.num_layers,
              "settings": {name: b.cfg.__dict__ for name, b in backends.items()},
              "command": "python benchmarks/decode_gpu.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "rows": rows}
    save(result, args.out)


if __name__ == "__main__":
    main()
