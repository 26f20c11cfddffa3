"""Which predictor finds the heavy hitters: recall of each KV group's exact top-k rows.

Captures K and the last --queries queries of every layer of a real model over --context tokens of
corpus_text() (one exact prefill, cached as a .pt under --cache so predictors can be iterated on
without re-prefilling). Query i attends to the keys up to its own position (n rows). Per
(layer, KV group, query):
- target: the group's attention weight per row, the softmax weights of its query heads summed;
  the candidates are the rows outside sink and window (always exact); the exact top-k is taken
  over them, k = int(frac * n) for frac in 1, 2, 5%;
- recall = |predicted top-k & exact top-k| / k; mass ratio = the group weight the predicted
  top-k holds / the weight the exact top-k holds.
Each predictor keeps a few bytes per token and KV head on the GPU; the table gives them as a
fraction of the bf16 K+V bytes (4 D) at the model's head dim and at Llama-3.1-8B's D = 128.
Group rules: `sumq` ranks by the group's summed query against the approximate keys (vAttention's
former rule); `wsum` by the group's summed softmax weights of the approximate logits (sink and
window logits exact: they are resident); `wpred` as `wsum` with the approximate logits at the
sink and window too (vAttention's rule: its predictor scores every coded row). What ships is
`q3 channel/64tok (shipped)` (vengine's key codes) under `wpred`; `sig64` under `sumq` is what
it replaced. Prints a table; writes JSON
(--out).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vengine.attention.config import VAttention
from vengine.eval.activations import to_pages
from vengine.kernels.common import decode_keys, encode_pages, group_log_weights

SINK = WINDOW = 128
PLANES_SEED = 0x5EED  # as VAttentionBackend's, when it shipped signatures
FRACTIONS = (0.01, 0.02, 0.05)
BUDGET = 1 / 8  # of the bf16 K+V bytes, at Llama-8B shapes


def load_or_capture(model_name: str, context: int, queries: int, cache_dir: str | None):
    """{'k': [L, T, Hkv, D], 'q': [L, Q, Hq, D], ...} of one exact prefill of `context` tokens
    of corpus_text(); cached as a .pt under cache_dir (V is not kept)."""
    path = Path(cache_dir) / f"acts_{model_name}_{context}_{queries}.pt" if cache_dir else None
    if path is not None and path.exists():
        return torch.load(path)
    from vengine.eval.activations import capture, corpus_text
    from vengine.models.loader import load_model, resolve_model

    t0 = time.perf_counter()
    model, tok = load_model(resolve_model(model_name), torch.device("cpu"), torch.float32)
    ids = tok.encode(corpus_text())
    if len(ids) < context:
        raise SystemExit(f"corpus_text() has {len(ids)} tokens, fewer than --context {context}")
    acts = capture(model, ids[:context], keep_queries=queries)
    out = {"k": torch.stack([a.k for a in acts]), "q": torch.stack([a.q for a in acts]),
           "model": model_name, "context": context, "prefill_s": time.perf_counter() - t0}
    del acts, model
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


# ---- predictors: each maps one layer's keys k [T, Hkv, D] to what the GPU would hold, and
# returns either approximate keys [T, Hkv, D] (scored as q . k_hat) or a scoring function.


def signatures(k: torch.Tensor, planes: torch.Tensor, centre: bool = False):
    """Random-hyperplane signatures, the predictor vAttention shipped before the key codes (kept
    here as the baseline): bit j of a key is sign(k . r_j), and a row scores
    sum_j (q . r_j) sign(k . r_j) (bits weighted by |q . r_j|, as its hash_scores did) against
    the group's summed query; centre: signatures of k minus the mean key."""
    x = k - k.mean(0) if centre else k
    signs = torch.einsum("thd,hdn->thn", x, planes).gt(0).float() * 2 - 1  # [T, Hkv, nbits]

    def score(q_sum: torch.Tensor) -> torch.Tensor:  # [Q, Hkv, D] -> [Q, Hkv, T]
        return torch.einsum("qhn,thn->qht", torch.einsum("qhd,hdn->qhn", q_sum, planes), signs)

    return score


def quant_token(k: torch.Tensor, bits: int, group: int | None = None, centre: bool = False):
    """Asymmetric min/max quantisation of each token's key (per `group` channels, or all D),
    optionally of k minus the per-channel mean key; returns the dequantised keys."""
    mu = k.mean(0) if centre else torch.zeros_like(k[0])
    x = k - mu
    T, H, D = x.shape
    g = group or D
    x = x.reshape(T, H, D // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8).half().float()
    lo = lo.half().float()
    codes = ((x - lo) / scale).round().clamp(0, 2**bits - 1)
    return (codes * scale + lo).reshape(T, H, D) + mu


def quant_channel(k: torch.Tensor, bits: int):
    """vengine's key codes (kernels.common.encode_pages, KIVI-style): each channel quantised
    with a min and step per 64-token page; returns the decoded keys. (Centring first changes
    nothing: a per-channel shift moves each page's range with it.) The last page is zero padded:
    its rows are in the window, which vAttention attends exactly and never encodes."""
    T, H, D = k.shape
    k_hat = decode_keys(*encode_pages(to_pages(k), bits))  # [pages, H, 64, D]
    return k_hat.transpose(1, 2).reshape(-1, H, D)[:T]


def kmeans(x: torch.Tensor, n: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """x [B, N, d] -> centroids [B, n, d] by Lloyd's iterations from n random points."""
    B, N, d = x.shape
    c = x[:, torch.randperm(N, generator=gen)[:n]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(-1)  # [B, N]
        s = torch.zeros_like(c).scatter_add_(1, a[..., None].expand(B, N, d), x)
        cnt = torch.zeros(B, n).scatter_add_(1, a, torch.ones(B, N))
        c = torch.where(cnt[..., None] > 0, s / cnt.clamp(min=1)[..., None], c)
    return c


def product_quant(k: torch.Tensor, m: int, iters: int = 10, centroids: int = 256,
                  train: int = 4096):
    """PQ: D split into m sub-spaces, each coded by 1 byte (256 centroids learned by k-means on
    `train` random keys of this layer and KV head); returns the reconstructed keys (q . k_hat is
    what the lookup tables sum)."""
    T, H, D = k.shape
    ds = D // m
    gen = torch.Generator().manual_seed(0)
    x = k.reshape(T, H * m, ds).transpose(0, 1).contiguous()  # [H*m, T, ds]
    out = torch.empty_like(x)
    for lo in range(0, H * m, 8):  # bounded memory: 8 sub-spaces at a time
        xs = x[lo : lo + 8]
        c = kmeans(xs[:, torch.randperm(T, generator=gen)[:train]], centroids, iters, gen)
        codes = torch.cdist(xs, c).argmin(-1)
        out[lo : lo + 8] = c.gather(1, codes[..., None].expand(-1, -1, ds))
    return out.transpose(0, 1).reshape(T, H, D)


def low_rank(k: torch.Tensor, r: int):
    """Keys projected on the top-r principal directions of this layer and KV head's centred keys
    (coefficients in bf16); returns mu + P (P^T (k - mu))."""
    mu = k.mean(0)
    x = (k - mu).transpose(0, 1)  # [H, T, D]
    cov = x.transpose(1, 2) @ x
    _, vecs = torch.linalg.eigh(cov)  # ascending
    P = vecs[..., -r:]  # [H, D, r]
    coef = (x @ P).bfloat16().float()
    return (coef @ P.transpose(1, 2)).transpose(0, 1) + mu


def page_bounds(k: torch.Tensor, page: int):
    """Quest: per page of `page` tokens the channel-wise min and max key; a query's upper bound
    on q . k over the page is sum_d max(q_d min_d, q_d max_d). Returns a function of queries
    [Q, Hkv, (G,) D] giving each row its page's bound [Q, Hkv, (G,) T]."""
    T, H, D = k.shape
    pad = -T % page
    x = torch.cat([k, k[-1:].expand(pad, H, D)]).view(-1, page, H, D)
    lo, hi = x.amin(1), x.amax(1)  # [pages, H, D]

    def bound(q: torch.Tensor) -> torch.Tensor:  # max(q lo, q hi) = relu(q) hi - relu(-q) lo
        eq = "qhgd,phd->qhgp" if q.dim() == 4 else "qhd,phd->qhp"
        ub = torch.einsum(eq, q.clamp(min=0), hi) - torch.einsum(eq, (-q).clamp(min=0), lo)
        return ub.repeat_interleave(page, -1)[..., :T]

    return bound


def predictor_table(D: int) -> dict[str, tuple[float, callable]]:
    """name -> (GPU bytes per token and KV head at head dim D, builder(k, layer, planes))."""
    t: dict[str, tuple[float, callable]] = {}
    t["exact keys"] = (2 * D, lambda k, l: k)
    for bits in (64, 128, 256, 512):
        t[f"sig{bits}"] = (bits / 8, lambda k, l, b=bits: ("score", signatures(k, PLANES[b][l])))
        if bits <= 256:
            t[f"sig{bits} centred"] = (bits / 8, lambda k, l, b=bits:
                                       ("score", signatures(k, PLANES[b][l], centre=True)))
    for bits in (2, 3, 4):
        t[f"q{bits} token"] = (D * bits / 8 + 4, lambda k, l, b=bits: quant_token(k, b))
        t[f"q{bits} token centred"] = (D * bits / 8 + 4,
                                       lambda k, l, b=bits: quant_token(k, b, centre=True))
        t[f"q{bits} g32 centred"] = (D * bits / 8 + 4 * D / 32,
                                     lambda k, l, b=bits: quant_token(k, b, 32, centre=True))
    for bits in (1, 2, 3, 4):
        shipped = " (shipped)" if bits == VAttention.key_bits else ""
        t[f"q{bits} channel/64tok{shipped}"] = (D * bits / 8 + 4 * D / 64,
                                                lambda k, l, b=bits: quant_channel(k, b))
    for m in (8, 16, 32, 64):
        if D // m >= 2:
            t[f"pq{m}x256"] = (m, lambda k, l, m=m: product_quant(k, m))
    for r in (8, 16, 32):
        t[f"lowrank{r}"] = (2 * r, lambda k, l, r=r: low_rank(k, r))
    for page in (8, 16, 64):
        t[f"quest page{page}"] = (4 * D / page, lambda k, l, p=page: ("bound", page_bounds(k, p)))
    return t


PLANES: dict[int, torch.Tensor] = {}


def group_scores(b, qg: torch.Tensor, logits: torch.Tensor | None = None,
                 fixed: torch.Tensor | None = None, live: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """One predictor's ranking of the rows for each KV group: rule -> scores [Q, Hkv, T].
    b: approximate keys [T, Hkv, D] | ('score', f) | ('bound', f); qg [Q, Hkv, G, D].
    sumq: the group's summed query; wsum: the summed softmax weights of the approximate logits,
    with the exact logits [Q, Hkv, G, T] at the fixed rows [Q, T] (sink and window); wpred:
    vAttention's rule (kernels.common.group_log_weights), the same sum with the approximate
    logits everywhere (its predictor scores every coded row, sink and window included)."""
    scale = 1 / math.sqrt(qg.shape[-1])
    if isinstance(b, tuple) and b[0] == "score":
        return {"sumq": b[1](qg.sum(2))}
    if isinstance(b, tuple):  # page bounds: a function of the queries
        s_sum, s_head = b[1](qg.sum(2)), b[1](qg) * scale
    else:
        s_sum = torch.einsum("qhd,thd->qht", qg.sum(2), b)
        s_head = torch.einsum("qhgd,thd->qhgt", qg, b) * scale
    if live is not None:
        s_head = s_head.masked_fill(~live[:, None, None], -math.inf)
    Q, Hkv, G, T = s_head.shape
    s_pred = group_log_weights(s_head.reshape(Q, Hkv * G, T), Hkv)
    if fixed is not None:
        s_head = torch.where(fixed[:, None, None], logits, s_head)
    return {"sumq": s_sum, "wsum": s_head.softmax(-1).sum(2), "wpred": s_pred}


def evaluate_layer(k: torch.Tensor, q: torch.Tensor, built, fracs=FRACTIONS):
    """k [T, Hkv, D], q [Q, Hq, D]; built: name -> approximate keys | ('score', f) | ('bound', f).
    Returns name -> rule -> {'recall': [n_frac, Q, Hkv], 'mass': [n_frac, Q, Hkv]}."""
    T, Hkv, D = k.shape
    Q, Hq, _ = q.shape
    G = Hq // Hkv
    qg = q.view(Q, Hkv, G, D)
    n = torch.arange(T - Q + 1, T + 1)  # each query's context length
    pos = torch.arange(T)
    live = pos[None] < n[:, None]  # [Q, T]
    cand = live & (pos[None] >= SINK) & (pos[None] < (n - WINDOW)[:, None])
    fixed = live & ~cand
    scale = 1 / math.sqrt(D)
    logits = torch.einsum("qhgd,thd->qhgt", qg, k) * scale
    w = logits.masked_fill(~live[:, None, None], -math.inf).softmax(-1).sum(2)  # [Q, Hkv, T]
    ks = [int(f * int(m)) for f in fracs for m in n]
    kmax = max(ks)
    kq = torch.tensor(ks).view(len(fracs), Q)  # [F, Q]

    def top_mask(s: torch.Tensor) -> torch.Tensor:  # s [Q, Hkv, T] -> [F, Q, Hkv, T] bool
        s = s.masked_fill(~cand[:, None], -math.inf)
        idx = s.topk(kmax, -1).indices  # [Q, Hkv, kmax], sorted
        keep = torch.arange(kmax)[None, None, None] < kq[:, :, None, None]  # [F, Q, 1, kmax]
        m = torch.zeros(len(fracs), Q, Hkv, T + 1, dtype=torch.bool)
        idx = torch.where(keep, idx[None].expand(len(fracs), -1, -1, -1), T)
        return m.scatter_(-1, idx, True)[..., :T]

    exact = top_mask(w)
    held_exact = (w * exact).sum(-1)  # [F, Q, Hkv]
    out = {}

    def metrics(pred):
        return {"recall": (pred & exact).sum(-1) / kq[:, :, None],
                "mass": (w * pred).sum(-1) / held_exact}

    for name, b in built.items():
        out[name] = {rule: metrics(top_mask(s))
                     for rule, s in group_scores(b, qg, logits, fixed, live).items()}
    share = held_exact / (w * cand[:, None]).sum(-1)  # exact top-k's share of the residual
    return out, share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--cache", default="/tmp/predictor_recall", help="activation cache dir ('' off)")
    p.add_argument("--layers", default="", help="comma-separated subset (default: all)")
    p.add_argument("--predictors", default="", help="comma-separated subset of names")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/predictor_recall.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:  # benchmarks/common.py (formerly record.py)
        from common import git_commit, save
    except ImportError:
        from record import git_commit, save

    t0 = time.perf_counter()
    acts = load_or_capture(args.model, args.context, args.queries, args.cache or None)
    K, Qs = acts["k"], acts["q"]
    L, T, Hkv, D = K.shape
    Hq = Qs.shape[2]
    for bits in (64, 128, 256, 512):  # as VAttentionBackend's were: seeded, [L, Hkv, D, bits]
        PLANES[bits] = torch.randn(L, Hkv, D, bits, generator=torch.Generator().manual_seed(PLANES_SEED))
    table = predictor_table(D)
    if args.predictors:
        table = {n: table[n] for n in args.predictors.split(",")}
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(L))
    acc: dict[tuple[str, str], dict[str, list]] = {}
    shares = []
    for layer in layers:
        tl = time.perf_counter()
        k = K[layer]
        built = {name: build(k, layer) for name, (_, build) in table.items()}
        res, share = evaluate_layer(k, Qs[layer], built)
        shares.append(share)
        for name, rules in res.items():
            for rule, m in rules.items():
                a = acc.setdefault((name, rule), {"recall": [], "mass": []})
                a["recall"].append(m["recall"])
                a["mass"].append(m["mass"])
        print(f"layer {layer}: {time.perf_counter() - tl:.1f} s", file=sys.stderr, flush=True)

    i2 = FRACTIONS.index(0.02)
    rows = []
    for (name, rule), a in acc.items():
        rec = torch.stack(a["recall"])  # [layers, F, Q, Hkv]
        mass = torch.stack(a["mass"])
        per_layer = mass[:, i2].mean((1, 2))
        nbytes = table[name][0]
        nbytes128 = predictor_table(128)[name][0]
        rows.append({
            "predictor": name, "rule": rule, "bytes_per_token_head": nbytes,
            "bytes_fraction": nbytes / (4 * D), "bytes_fraction_d128": nbytes128 / 512,
            "within_budget_d128": nbytes128 / 512 <= BUDGET + 1e-9,
            "recall": {f"{f:g}": rec[:, j].mean().item() for j, f in enumerate(FRACTIONS)},
            "mass_ratio": {f"{f:g}": mass[:, j].mean().item() for j, f in enumerate(FRACTIONS)},
            "mass_ratio_p10_2pct": mass[:, i2].flatten().quantile(0.1).item(),
            "share_ge_0.9_2pct": (mass[:, i2] >= 0.9).float().mean().item(),
            "worst_layer_2pct": [layers[int(per_layer.argmin())], per_layer.min().item()],
            "per_layer_mass_2pct": per_layer.tolist(),
        })
    share = torch.stack(shares)  # [layers, F, Q, Hkv]
    print(f"{args.model}, context {T}, {args.queries} queries, layers {len(layers)}, "
          f"{Hq}/{Hkv} heads, D {D}; sink {SINK}, window {WINDOW}. Exact top-k's share of the "
          "residual's group weight: " + ", ".join(
              f"{f:g}: {share[:, j].mean():.3f}" for j, f in enumerate(FRACTIONS)))
    print(f"{'predictor':<28} {'rule':<5} {'B/tok':>6} {'frac':>7} {'frac128':>7} "
          f"{'rec1%':>6} {'rec2%':>6} {'rec5%':>6} {'mass1%':>6} {'mass2%':>6} {'p10':>6} "
          f"{'mass5%':>6} {'>=.9':>5} {'worst layer':>12}")
    for r in rows:
        print(f"{r['predictor']:<28} {r['rule']:<5} {r['bytes_per_token_head']:6.1f} "
              f"{r['bytes_fraction']:7.4f} {r['bytes_fraction_d128']:7.4f} "
              + " ".join(f"{r['recall'][f]:6.3f}" for f in ("0.01", "0.02", "0.05"))
              + f" {r['mass_ratio']['0.01']:6.3f} {r['mass_ratio']['0.02']:6.3f} "
              f"{r['mass_ratio_p10_2pct']:6.3f} {r['mass_ratio']['0.05']:6.3f} "
              f"{r['share_ge_0.9_2pct']:5.2f} {r['worst_layer_2pct'][0]:>4} "
              f"{r['worst_layer_2pct'][1]:.3f}")
    save({"device": f"cpu ({platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads)",
          "date": date.today().isoformat(), "commit": git_commit(),
          "command": "python benchmarks/predictor_recall.py " + " ".join(sys.argv[1:]),
          "model": args.model, "context": T, "queries": args.queries, "layers": layers,
          "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "sink": SINK, "window": WINDOW,
          "fractions": list(FRACTIONS), "budget_fraction_d128": BUDGET,
          "exact_topk_share_of_residual": {f"{f:g}": share[:, j].mean().item()
                                           for j, f in enumerate(FRACTIONS)},
          "prefill_s": acts.get("prefill_s"), "seconds": time.perf_counter() - t0,
          "results": rows}, args.out)


if __name__ == "__main__":
    main()
