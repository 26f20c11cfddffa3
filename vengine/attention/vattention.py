"""vAttention decode: exact rows + predicted top-k + a CLT-sized sample of the rest.

Per decode step, layer, sequence and KV head (the query heads of a GQA group share one row set):
1. exact rows F: sink, recent window, and the group's predicted top-k: the rows with the largest
   predicted weight, each head's softmax weight of q . k_hat (k_hat: the key decoded from its
   few-bit code, kept on the GPU) summed over the group (kernels.group_scores);
2. residual R = the other rows (n_R of them), sampled by importance: the proposal pr
   (reference.proposal) is the predicted weights with a uniform floor. A pilot Poisson sample
   of R (row i with probability min(1, m * pr_i), E|pilot| <= m = VAttention.pilot rows) gives
   each head Horvitz-Thompson estimates of D and of the sample's variance (for the output
   guarantee, of the output's, from the pilot's V);
3. the sample size c per head from the CLT (reference.pilot_budget), the group's largest;
4. a second Poisson sample with probabilities min(1, c * pr_i), independent of the pilot. The
   estimate is Horvitz-Thompson over the union of both samples: each row weighted by the inverse
   of its inclusion probability (a log-weight score bias), unbiased (pilot_budget says how,
   given that c depends on the pilot).
Prefill is exact attention; it writes the K/V rows and their key codes. A decode step whose
padded context is short (VAttention.exact_width: where selection costs more than it saves)
attends exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vengine.attention.base import SequenceView
from vengine.attention.config import VAttention
from vengine.attention.context import StepContext
from vengine.attention.full import pool_decode_attention, prefill_attention
from vengine.kernels import get_kernels
from vengine.kernels.common import PROPOSAL_FLOOR, gather_rows, merge_partials
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KeyCodePool, KVPool, ResidentPages
from vengine.offload.row_cache import RowCache

RESIDENT_SEQUENCES = 8  # GPU copies of the sink and window pages for this many sequences


@dataclass
class DecodeResult:
    out: torch.Tensor  # [B, Hq, D]
    log_scale: torch.Tensor  # [B, Hq] the max used to scale the denominators below
    d_hat: torch.Tensor  # [B, Hq] estimated denominator, at exp(-log_scale)
    density: torch.Tensor  # [B, Hkv] attended rows / context length
    over_eps: torch.Tensor  # [B, Hq] the cap kept the head from its budget (0/1)
    missed: torch.Tensor  # [B, Hq] the pilot found a heavy row outside the top-k (0/1)
    reused: torch.Tensor | None = None  # [B, Hkv] predicted top-k rows read from the row
    predicted: torch.Tensor | None = None  # cache, and all of them (None without one)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def beside(device: torch.device):
    """Work issued inside runs on a side stream, after the current stream's work so far, and
    beside what the current stream is given next, until join(device). Why: the selection's small
    kernels leave the GPU idle while the fetch waits on PCIe. Works in CUDA graph capture (a
    fork and join); off the GPU, a no-op. Tensors crossing streams stay alive until join: the
    caller joins before it returns."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(side)


def join(device: torch.device) -> None:
    """The current stream waits for the work issued beside it."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))


def sample_width(expected: float, S: int) -> int:
    """Row buffer for a Bernoulli sample of mean <= expected: 8 standard deviations over it. A
    longer draw (odds ~1e-15) keeps its first `width` rows."""
    return min(S, math.ceil(expected + 8 * math.sqrt(expected) + 16))


def vattention_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    codes: tuple[torch.Tensor, torch.Tensor],
    cfg: VAttention,
    generator: torch.Generator | None,
    kernels,
    resident: tuple | None = None,
    softcap: float = 0.0,
    target: torch.Tensor | None = None,
    row_cache: RowCache | None = None,
    layer: int = 0,
) -> DecodeResult:
    """One layer of vAttention decode. q [B, Hq, D]; k/v_pool [pages, Hkv, P, D] (one layer, in
    GPU memory, CPU memory or a UVA view of pinned host memory); codes: the keys' codes
    (kernels.base.KeyCodes), paged like the pool, on q's device. Buffers are sized by host ints
    derived from S = max_pages * P, the padded width that bounds context_lens (the pilot's and a
    capped sample's by sample_width), and masked by per-row counts: nothing waits for the device,
    and a step of fixed S has fixed shapes (CUDA graphs). resident: GPU copies of some pages
    (ResidentPages.layer: the sink and window), which the kernels read instead of the pool.
    softcap: Gemma 2's cap on every score (common.soft_cap; 0: none), in the predicted scores
    too, so that the proposal follows the capped weights. target [B, 3]: each sequence's own
    epsilon and delta (StepContext.targets), NaN where cfg's apply. row_cache: GPU copies of
    the exact rows of the step before (this layer's), read instead of the pool's."""
    B, Hq, D = q.shape
    dev, P = q.device, k_pool.shape[2]
    Hkv, S = k_pool.shape[1], block_tables.shape[1] * P
    window = max(cfg.window, P)  # the unfinished page has no codes yet: attended exactly
    scale = 1.0 / math.sqrt(D)
    n = context_lens[:, None]

    # 1. the group's predicted top-k: picked [B, Hkv, S + 1] (column S is scratch); the
    # predicted weights of the rest make the sampling proposal
    k_max = min(cfg.top_k_rows(S), max(S - cfg.sink - window, 0))
    # every coded row (all but the unfinished page) scored: sink and window rows normalise each
    # head's predicted softmax, so a head whose mass sits there ranks the rest by what is left
    scores = kernels.group_scores(q, codes, block_tables, context_lens // P * P, cfg.sink,
                                  context_lens - window, scale, softcap)
    picked = kernels.pick_top(scores, k_max, cfg.top_k_rows(context_lens))
    width_f = min(S, cfg.sink + window + k_max)
    rows_f, count_f = kernels.exact_rows(picked, context_lens, S, cfg.sink, window, width_f)
    n_r = (n - count_f).float()  # [B, Hkv]
    cached = reused = predicted = None
    if row_cache is not None and row_cache.covers(B, width_f):
        cached = row_cache.lookup(layer, rows_f, count_f)
        live_f = torch.arange(width_f, device=dev) < count_f[..., None]
        top = live_f & (rows_f >= cfg.sink) & (rows_f < (n - window)[..., None])
        reused, predicted = (top & (cached[0] >= 0)).sum(-1).float(), top.sum(-1).float()

    # 2. the pilot: a Poisson sample of the residual, row i with probability
    # min(1, size * pr_i) (pr: the proposal, kernels.proposal_params), E|pilot| <= size;
    # selected and its K read while the exact rows are fetched
    with beside(dev):
        prop = (scores, kernels.proposal_params(scores, picked), n_r)
        u = torch.rand(2, B, Hkv, S, device=dev, generator=generator)
        size = torch.full_like(n_r, float(cfg.pilot))
        width_b = sample_width(cfg.pilot, S)
        rows_b, count_b, pa_b, pr_b = kernels.pilot_rows(picked, u, prop, size, context_lens,
                                                         cfg.sink, window, width_b)
        s_b = kernels.row_scores(q, k_pool, block_tables, rows_b, count_b, scale,
                                 resident, softcap)  # [B, Hq, width_b]
    part_f = kernels.partial_attention(q, k_pool, v_pool, block_tables, rows_f, count_f, None,
                                       scale, resident, softcap=softcap, cache=cached)
    if cached:
        row_cache.commit(layer, rows_f, count_f)
    join(dev)

    # 3. the second sample's size c per group (kernels.pilot_budget); with c at its cap every
    # row is in (c * pr >= c * PROPOSAL_FLOOR / n_R)
    most = n_r / PROPOSAL_FLOOR if cfg.max_sample is None else cfg.max_sample * n.float()
    dev_b = None
    if cfg.guarantee == "output":
        dev_b = output_deviations(q, k_pool, v_pool, block_tables, rows_b, count_b, pa_b, s_b,
                                  part_f, scale, kernels, resident)
    m, d_f, c, logw_b, over_eps, missed = kernels.pilot_budget(
        s_b, count_b, pa_b, pr_b, part_f[0], part_f[1], most, n_r, cfg.epsilon, cfg.delta, dev_b,
        target)

    # 4. the second sample, from the rows outside the pilot (selected and fetched while the
    # pilot's V is); the estimate is Horvitz-Thompson over the union: each row weighted by the
    # inverse of its inclusion probability
    width_s = S
    if cfg.max_sample is not None:
        width_s = sample_width(cfg.max_sample * S, S)
    with beside(dev):
        rows_s, count_s, logw_s = kernels.second_rows(picked, u, prop, size, c, context_lens,
                                                      cfg.sink, window, width_s)
        part_s = kernels.partial_attention(q, k_pool, v_pool, block_tables, rows_s, count_s,
                                           logw_s, scale, resident, softcap=softcap)
    part_b = kernels.partial_attention(q, k_pool, v_pool, block_tables, rows_b, count_b, logw_b,
                                       scale, resident, scores=s_b)  # reads V only
    join(dev)
    out, d_hat = kernels.finish(part_f, part_b, part_s, m, d_f)
    density = (count_f + count_b + count_s).float() / n.float()
    return DecodeResult(out.to(q.dtype), m, d_hat, density, over_eps, missed, reused, predicted)


def output_deviations(q, k_pool, v_pool, block_tables, rows_b, count_b, pa_b, s_b, part_f,
                      scale, kernels, resident) -> torch.Tensor:
    """[B, Hq, W]: |v_i - o|^2 / |o|^2 of each pilot row, o the output estimated from the exact
    rows and the pilot (Horvitz-Thompson weights 1 / pa): what the output guarantee's variance
    weighs each row's term by (reference.pilot_budget). The pilot's V is read twice (here and
    for the estimate): a few hundred rows."""
    B, Hq, D = q.shape
    Hkv, W = rows_b.shape[1], rows_b.shape[2]
    part_b = kernels.partial_attention(q, k_pool, v_pool, block_tables, rows_b, count_b,
                                       -torch.log(pa_b.clamp(min=1e-30)), scale, resident,
                                       scores=s_b)
    o = merge_partials([part_f, part_b]).view(B, Hkv, Hq // Hkv, 1, D)
    rows_b = torch.where(torch.arange(W, device=q.device) < count_b[..., None], rows_b, 0)
    v = gather_rows(v_pool, block_tables, rows_b).float()[:, :, None]  # [B, Hkv, 1, W, D]
    dev = ((v - o) ** 2).sum(-1) / (o * o).sum(-1).clamp(min=1e-30)
    return dev.view(B, Hq, W)


def make_vattention(settings: VAttention, pool: KVPool, cfg: ModelConfig,
                    device: torch.device) -> VAttentionBackend:
    return VAttentionBackend(settings, pool, cfg, device)


class VAttentionBackend:
    """Prefill: exact attention, K/V and key codes written to the pools. Decode: vAttention."""

    name = "vattention"
    graphable = True

    def __init__(self, cfg: VAttention, pool: KVPool, mc: ModelConfig,
                 device: torch.device) -> None:
        self.cfg, self.pool, self.device = cfg, pool, device
        self.softcap = mc.attn_softcap or 0.0
        self.layers_served = mc.num_layers  # layers a decode step runs here (step_stats counts)
        self.kernels = get_kernels(device, pool.dtype)
        self.codes = KeyCodePool(pool, cfg.key_bits, device)
        self.exact_width = cfg.exact_width(local_kv=pool.k_view.device.type == "cpu")
        self.resident = None  # GPU copies of the sink and window pages, for a host pool on a GPU
        if pool.k_view.is_cuda and not pool.k.is_cuda:
            P = pool.page_size
            per_seq = -(-cfg.sink // P) + -(-cfg.window // P) + 1
            slots = min(pool.num_pages, RESIDENT_SEQUENCES * per_seq)
            self.resident = ResidentPages(pool, slots, device)
        self.row_cache = None  # the exact rows of the step before, for cfg.row_cache sequences
        if cfg.row_cache:
            width = cfg.exact_rows(pool.max_context, pool.page_size)
            self.row_cache = RowCache(pool.k.shape[0], cfg.row_cache, pool.k.shape[2], width,
                                      pool.k.shape[-1], pool.dtype, device)
        self.generator = torch.Generator(device)  # a CUDA graph registers it (graph-safe Philox)
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        self._layer_stats: list[tuple[torch.Tensor, ...]] = []  # this step's, so far
        self._seq_stats: dict[int, torch.Tensor] = {}
        self._steps: dict[int, int] = {}

    def begin_step(self, seqs: Sequence[SequenceView], is_prefill: bool) -> None:
        """The GPU copies follow each decoding sequence's sink and window pages (the context after
        this step's token); a prefill writes host pages only, so its sequence's copies go (and
        its row cache entries: a recomputed sequence's rows may differ in their last bits)."""
        if self.row_cache is not None:  # a prefilled sequence's rows may be new: forgotten
            for s in seqs if is_prefill else ():
                self.row_cache.drop(s.seq_id)
            if not is_prefill:
                self.row_cache.begin_step([s.seq_id for s in seqs])
        if self.resident is None:
            return
        if is_prefill:
            for s in seqs:
                self.resident.drop_sequence(s.seq_id)
            return
        P, wanted = self.pool.page_size, []
        for s in seqs:
            n = s.num_cached + 1
            pages = s.block_table[: -(-min(self.cfg.sink, n) // P)]
            pages += s.block_table[max(n - self.cfg.window, 0) // P: -(-n // P)]
            wanted += [(page, s.seq_id) for page in pages]
        self.resident.keep(wanted)

    def store(self, layer: int, k, v, ctx: StepContext) -> None:
        """K/V rows to the pool (and the pages' GPU copies), the codes of the pages they fill
        beside: the one write path of prefill and decode."""
        with self.pool.writing(layer, ctx.slots, k, v):
            self.kernels.store_rows(k, v, ctx.slots, self.pool.k_layer(layer),
                                    self.pool.v_layer(layer), self.codes.layer(layer),
                                    self.resident_layer(layer))

    def prefill(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        self.store(layer, k, v, ctx)
        return prefill_attention(self.pool, layer, q, k, v, ctx, self.softcap)

    def decode(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        """vAttention, or exact attention where the step's padded context is at most
        VAttention.exact_width rows (a host int per CUDA-graph bucket: no sync)."""
        self.store(layer, k, v, ctx)
        if ctx.block_tables.shape[1] * self.pool.page_size <= self.exact_width:
            out = pool_decode_attention(self.pool, layer, q, ctx, self.softcap)
            B, Hq = q.shape[:2]
            zeros = q.new_zeros(B, Hq, dtype=torch.float32)
            self._layer_stats.append((q.new_ones(B, self.pool.k.shape[2], dtype=torch.float32),
                                      zeros, zeros, None, None))
            return out
        r = self.estimate(layer, q, ctx)
        self._layer_stats.append((r.density, r.over_eps, r.missed, r.reused, r.predicted))
        return r.out

    def estimate(self, layer: int, q: torch.Tensor, ctx: StepContext) -> DecodeResult:
        """One layer's sparse attention over the stored rows (the eval's baselines replace it)."""
        return vattention_decode(
            q,
            self.pool.k_layer(layer),
            self.pool.v_layer(layer),
            ctx.block_tables,
            ctx.context_lens,
            self.codes.layer(layer),
            self.cfg,
            self.generator,
            self.kernels,
            self.resident_layer(layer),
            self.softcap,
            ctx.targets,
            self.row_cache,
            layer,
        )

    def resident_layer(self, layer: int) -> tuple | None:
        """The kernels' view of one layer's GPU page copies (None without them)."""
        return None if self.resident is None else self.resident.layer(layer)

    def step_stats(self) -> torch.Tensor | None:
        """[B, 6]: density summed over the step's layers, heads over epsilon, heads whose pilot
        found a missed heavy row, heads, predicted top-k rows read from the row cache, and all
        of them. One reduction per step, not a few kernels per layer; under a CUDA graph, the
        graph's output."""
        if not self._layer_stats:
            return None
        density, over, missed = (torch.stack([x[i] for x in self._layer_stats])
                                 for i in range(3))
        cached = [x[3:] for x in self._layer_stats if x[3] is not None]
        reuse = tuple(torch.stack([c[i] for c in cached]).sum((0, 2)) for i in (0, 1)) \
            if cached else ()
        self.layers_served = len(self._layer_stats)
        over, missed = over.sum((0, 2)), missed.sum((0, 2))
        heads = torch.full_like(over, self.layers_served * self._layer_stats[0][1].shape[1])
        self._layer_stats = []
        reuse = reuse or (torch.zeros_like(over), torch.zeros_like(over))
        return torch.stack([density.mean(2).sum(0), over, missed, heads, *reuse], 1)

    def end_step(self, seq_ids: tuple[int, ...], stats: torch.Tensor | None) -> None:
        """Fold a step's statistics into each sequence's totals; device tensors throughout, read
        only when seq_stats is asked."""
        if stats is None:
            return
        for i, seq_id in enumerate(seq_ids):
            total = self._seq_stats.get(seq_id)
            # a copy: under a CUDA graph stats is the graph's output, rewritten every replay
            self._seq_stats[seq_id] = stats[i].clone() if total is None else total + stats[i]
            self._steps[seq_id] = self._steps.get(seq_id, 0) + 1

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        """density: attended rows over context, per layer and KV head, averaged over the decode
        steps; certificate_violation_rate: heads whose epsilon was not guaranteed (max_sample
        bound); predictor_miss_rate: heads whose pilot found a row outside the top-k holding at
        least epsilon of the attention (still estimated without bias; a high rate says the
        predictor, not the sampler, sets the density); row_cache_hit_rate: the predicted top-k
        rows read from the row cache rather than over PCIe (0 without one)."""
        total, steps = self._seq_stats.get(seq_id), self._steps.get(seq_id, 0)
        if total is None:
            return {"density": 1.0, "certificate_violation_rate": 0.0,
                    "predictor_miss_rate": 0.0, "sparse_steps": 0, "row_cache_hit_rate": 0.0}
        density_sum, over, missed, heads, reused, predicted = total.tolist()
        return {
            "density": density_sum / (steps * self.layers_served),
            "certificate_violation_rate": over / heads,
            "predictor_miss_rate": missed / heads,
            "sparse_steps": steps,
            "row_cache_hit_rate": reused / max(predicted, 1.0),
        }

    def free(self, seq_id: int) -> None:
        if self.resident is not None:
            self.resident.drop_sequence(seq_id)
        if self.row_cache is not None:
            self.row_cache.drop(seq_id)
        self._seq_stats.pop(seq_id, None)
        self._steps.pop(seq_id, None)
