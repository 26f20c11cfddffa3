"""vAttention decode: exact rows + predicted top-k + a CLT-sized uniform sample of the rest.

Per decode step, layer, sequence and KV head (the query heads of a GQA group share one row set):
1. exact rows F: sink, recent window, and the group's predicted top-k: the rows whose hash
   signatures score highest against the group's summed query. Hash scores are linear in the
   query, so that is the sum of the heads' predicted scores; at equal rows it keeps more attention
   mass than the union of per-head top-k/G (docs/quality.md), for one scoring pass per group;
2. residual R = the other rows (n_R of them); a pilot Bernoulli sample of R (rate base_rate, at
   least MIN_BASE rows) gives each head sigma and D_hat = D_F + n_R * mean(exp(s));
3. budget b = (z * n_R * sigma_up / (epsilon * D_hat))^2 per head, the group takes the largest,
   clipped to [pilot size, n_R]; delta is split between the pilot (sigma_up, an upper confidence
   bound on sigma at level delta/2) and the sample (z = z_{1-delta/4});
4. a fresh Bernoulli sample S of R, inclusion probability about b / n_R, independent of the pilot.
   Given |S| = s, S is a uniform sample without replacement of size s, so weighting each row by
   n_R / s (a log-weight score bias) makes D_hat and N_hat unbiased conditional on s.
Prefill is exact attention; it writes the K/V rows and their signatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vengine.attention.config import VAttention
from vengine.attention.context import StepContext
from vengine.attention.full import causal_attention
from vengine.kernels import get_kernels
from vengine.kernels.reference import pack_signatures
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import KVPool, ResidentPages, SignaturePool

MIN_BASE = 32  # pilot rows at least, so that sigma is estimated from more than a handful
RESIDENT_SEQUENCES = 8  # GPU copies of the sink and window pages for this many sequences


@dataclass
class DecodeResult:
    out: torch.Tensor  # [B, Hq, D]
    log_scale: torch.Tensor  # [B, Hq] the max used to scale the denominators below
    d_hat: torch.Tensor  # [B, Hq] estimated denominator, at exp(-log_scale)
    density: torch.Tensor  # [B, Hkv] attended rows / context length
    over_eps: torch.Tensor  # [B, Hq] predicted relative error of D_hat above epsilon (0/1)


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
    sig: torch.Tensor,
    planes: torch.Tensor,
    cfg: VAttention,
    generator: torch.Generator | None,
    kernels,
    resident: tuple | None = None,
) -> DecodeResult:
    """One layer of vAttention decode. q [B, Hq, D]; k/v_pool [pages, Hkv, P, D] (one layer, in
    GPU memory, CPU memory or a UVA view of pinned host memory); sig [pages, Hkv, P, nbytes] key
    signatures, paged like the pool; planes [Hkv, D, nbits]. Buffers are sized by host ints
    derived from S = max_pages * P, the padded width that bounds context_lens (the pilot's and a
    capped sample's by sample_width), and masked by per-row counts: nothing waits for the device,
    and a step of fixed S has fixed shapes (CUDA graphs). resident: GPU copies of some pages
    (ResidentPages.layer: the sink and window), which the kernels read instead of the pool."""
    B, Hq, D = q.shape
    Hkv, S = sig.shape[1], block_tables.shape[1] * sig.shape[2]
    G = Hq // Hkv
    dev = q.device
    scale = 1.0 / math.sqrt(D)
    n = context_lens[:, None]

    # 1. the group's predicted top-k: picked [B, Hkv, S + 1] (column S takes the picks past a
    # sequence's own k)
    k_max = min(cfg.top_k_rows(S), max(S - cfg.sink - cfg.window, 0))
    picked = torch.zeros(B, Hkv, S + 1, dtype=torch.int8, device=dev)
    if k_max > 0:
        k_rows = torch.minimum(cfg.top_k_rows(context_lens), context_lens - cfg.sink - cfg.window)
        q_group = q.float().view(B, Hkv, G, D).sum(2)
        scores = kernels.hash_scores(q_group, planes, sig, block_tables, cfg.sink,
                                     context_lens - cfg.window)  # -inf at sink and window
        top = scores.topk(k_max, dim=-1, sorted=False).indices  # [B, Hkv, k_max]
        keep = torch.arange(k_max, device=dev) < k_rows[:, None, None]
        picked.scatter_(-1, torch.where(keep, top, S), 1)
    exact_width = min(S, cfg.sink + cfg.window + k_max)
    rows_f, count_f = kernels.exact_rows(picked, context_lens, S, cfg.sink, cfg.window,
                                         exact_width)
    m_f, l_f, acc_f = kernels.partial_attention(
        q, k_pool, v_pool, block_tables, rows_f, count_f, None, scale, resident
    )

    # 2. pilot sample of the residual: statistics of exp(s - m) per query head
    n_r = (n - count_f).float()  # [B, Hkv]
    u = torch.rand(2, B, Hkv, S, device=dev, generator=generator)
    base_rate = torch.clamp(torch.clamp(MIN_BASE / n_r, min=cfg.base_rate), max=1.0)
    width_b = sample_width(cfg.base_rate * S + MIN_BASE, S)
    rows_b, count_b = kernels.sample_rows(picked, u[0], base_rate, context_lens, cfg.sink,
                                          cfg.window, width_b)
    s_b = kernels.row_scores(q, k_pool, block_tables, rows_b, count_b, scale,
                             resident)  # [B, Hq, width_b]

    # 3. CLT budget per head, the group's largest (kernels.pilot_budget)
    cap = n_r if cfg.max_sample is None else torch.minimum(n_r, cfg.max_sample * n.float())
    m, d_f, sigma, p = kernels.pilot_budget(s_b, count_b, m_f, l_f, n_r, cap, cfg.epsilon,
                                            cfg.delta)

    # 4. the sample, weighted n_R / |S|
    width_s = S
    if cfg.max_sample is not None:
        most = cfg.max_sample * S
        width_s = sample_width(most + 2 * math.sqrt(most), S)
    rows_s, count_s = kernels.sample_rows(picked, u[1], p, context_lens, cfg.sink, cfg.window,
                                          width_s)
    logw = torch.log(n_r / count_s.clamp(min=1))[..., None].expand(B, Hkv, width_s)
    m_s, l_s, acc_s = kernels.partial_attention(
        q, k_pool, v_pool, block_tables, rows_s, count_s, logw, scale, resident
    )
    out, d_hat, over_eps = kernels.finish((m_f, l_f, acc_f), (m_s, l_s, acc_s), m, d_f, sigma,
                                          n_r, count_s, cfg.epsilon, cfg.delta)
    density = (count_f + count_s).float() / n.float()
    return DecodeResult(out.to(q.dtype), m, d_hat, density, over_eps)


class VAttentionBackend:
    """Prefill: exact attention, K/V and signatures written to the pools. Decode: vAttention."""

    name = "vattention"

    def __init__(self, cfg: VAttention, pool: KVPool, mc: ModelConfig, device: torch.device) -> None:
        self.cfg, self.pool, self.device = cfg, pool, device
        self.kernels = get_kernels(device, pool.dtype)
        planes_gen = torch.Generator().manual_seed(0x5EED)  # fixed: signatures must stay comparable
        self.planes = torch.randn(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.hash_bits, generator=planes_gen
        ).to(device)
        self.signatures = SignaturePool(pool, cfg.hash_bits // 8, device)
        self.resident = None  # GPU copies of the sink and window pages, for a host pool on a GPU
        if pool.k_view.is_cuda and not pool.k.is_cuda:
            P = pool.page_size
            per_seq = -(-cfg.sink // P) + -(-cfg.window // P) + 1
            slots = min(pool.num_pages, RESIDENT_SEQUENCES * per_seq)
            self.resident = ResidentPages(pool, slots, device)
        self.generator = torch.Generator(device)  # a CUDA graph registers it (graph-safe Philox)
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        self.step_stats: torch.Tensor | None = None  # [B, 3]: density, over-eps, heads
        self._layer_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's, so far
        self._seq_stats: dict[int, torch.Tensor] = {}
        self._steps: dict[int, int] = {}

    def begin_step(self, seqs) -> None:
        """Before a decode step: the GPU copies follow each sequence's sink and window pages
        (the context after this step's token)."""
        if self.resident is None:
            return
        P, wanted = self.pool.page_size, []
        for s in seqs:
            n = s.num_cached + 1
            pages = s.block_table[: -(-min(self.cfg.sink, n) // P)]
            pages += s.block_table[max(n - self.cfg.window, 0) // P: -(-n // P)]
            wanted += [(page, s.seq_id) for page in pages]
        self.resident.keep(wanted)

    def forward(self, layer: int, q, k, v, ctx: StepContext) -> torch.Tensor:
        if ctx.is_prefill:  # the pool may stream a long chunk's rows on its side stream
            if self.resident is not None and layer == 0:  # prefill writes the host pages only
                self.resident.drop_sequence(ctx.seq_ids[0])
            self.pool.store(layer, ctx.slots, k, v)
            self.signatures.store(layer, ctx.slots, pack_signatures(k, self.planes[layer]))
            if ctx.cached_len == 0:
                return causal_attention(q, k, v, 0)
            kc, vc = self.pool.gather_pages(layer, ctx.block_tables)
            S = ctx.cached_len + q.shape[0]
            kc = kc[0, :, :S].transpose(0, 1).to(q.dtype)
            vc = vc[0, :, :S].transpose(0, 1).to(q.dtype)
            return causal_attention(q, kc, vc, ctx.cached_len)
        self.store_decode_rows(layer, k, v, ctx)
        r = self.decode(layer, q, ctx)
        if layer == 0:
            self._layer_stats = []
        self._layer_stats.append((r.density, r.over_eps))
        if layer == len(self.planes) - 1:  # one reduction per step, not a few kernels per layer
            density = torch.stack([d for d, _ in self._layer_stats]).mean(2).sum(0)
            over = torch.stack([o for _, o in self._layer_stats]).sum((0, 2))
            heads = torch.full_like(over, len(self._layer_stats) * r.over_eps.shape[1])
            # a new tensor each step (under a CUDA graph: the graph's output)
            self.step_stats = torch.stack([density, over, heads], 1)
        return r.out

    def store_decode_rows(self, layer: int, k, v, ctx: StepContext) -> None:
        """A decode step's K/V rows to the pool and the pages' GPU copies, signatures beside."""
        self.kernels.store_rows(k, v, ctx.slots, self.planes[layer], self.pool.k_view[layer],
                                self.pool.v_view[layer], self.signatures.sig[layer],
                                self.resident_layer(layer))

    def decode(self, layer: int, q: torch.Tensor, ctx: StepContext) -> DecodeResult:
        return vattention_decode(
            q,
            self.pool.k_view[layer],
            self.pool.v_view[layer],
            ctx.block_tables,
            ctx.context_lens,
            self.signatures.sig[layer],
            self.planes[layer],
            self.cfg,
            self.generator,
            self.kernels,
            self.resident_layer(layer),
        )

    def resident_layer(self, layer: int) -> tuple | None:
        """The kernels' view of one layer's GPU page copies (None without them)."""
        return None if self.resident is None else self.resident.layer(layer)

    def end_step(self, ctx: StepContext) -> None:
        """Fold this step's statistics (summed over layers) into each sequence's totals; device
        tensors throughout, read only when seq_stats is asked."""
        if self.step_stats is None:
            return
        for i, seq_id in enumerate(ctx.seq_ids):
            total = self._seq_stats.get(seq_id)
            step = self.step_stats[i]
            # a copy: under a CUDA graph step_stats is the graph's output, rewritten every replay
            self._seq_stats[seq_id] = step.clone() if total is None else total + step
            self._steps[seq_id] = self._steps.get(seq_id, 0) + 1
        self.step_stats = None

    def seq_stats(self, seq_id: int) -> dict[str, float]:
        total, steps = self._seq_stats.get(seq_id), self._steps.get(seq_id, 0)
        if total is None:
            return {"density": 1.0, "certificate_violation_rate": 0.0, "sparse_steps": 0}
        density_sum, over, heads = total.tolist()
        layers = len(self.planes)
        return {
            "density": density_sum / (steps * layers),
            "certificate_violation_rate": over / heads,
            "sparse_steps": steps,
        }

    def free(self, seq_id: int) -> None:
        if self.resident is not None:
            self.resident.drop_sequence(seq_id)
        self._seq_stats.pop(seq_id, None)
        self._steps.pop(seq_id, None)
