"""Where a long prompt's time to first token goes on the GPU: the prefill attention kernels at
the shapes a 128K prompt gives them, and a torch.profiler table of one prompt through `LLM`.

Part 1 times each candidate kernel over one layer's attention for a whole prompt (every chunk
after its cached prefix, or the prompt as one causal square) with Llama-3.1-8B's heads, and
checks each against the current path on one chunk. Part 2 (with --model) loads an HF directory
(the load timed, weights GB/s) and profiles the prefill of a --prompt-tokens prompt.

    python benchmarks/prefill_gpu.py --model /tmp/llama8b --prompt-tokens 131072 --ctx 129k \
        --gpu-cap-gib 24 --out docs/prefill_gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LLAMA_8B, git_commit, median_ms, save  # noqa: E402

from vengine.attention.full import causal_attention_heads  # noqa: E402


def lower_right_gqa(q, kh, vh, cached):
    """One call: the causal bias's flash path takes GQA heads directly."""
    T = q.shape[0]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh, vh, enable_gqa=True,
                                       attn_mask=causal_lower_right(T, kh.shape[2]))
    return o[0].transpose(0, 1)


def square(backend):
    def run(q, kh, vh, cached):
        assert cached == 0
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh, vh, is_causal=True,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)
    return run


def attention_kernels(prompt: int, chunks: list[int], repeats: int) -> list[dict]:
    Hq, Hkv, D = LLAMA_8B.num_heads, LLAMA_8B.num_kv_heads, LLAMA_8B.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    kh = torch.randn(1, Hkv, prompt, D, device=dev, dtype=dt)
    vh = torch.randn_like(kh)
    q_all = torch.randn(prompt, Hq, D, device=dev, dtype=dt)
    flops = 4 * Hq * D * (prompt * prompt / 2)  # causal: half the square
    rows = []
    chunked = {"per-head loop (current)": causal_attention_heads, "lower-right, one GQA call":
               lower_right_gqa}
    for chunk in chunks:
        starts = range(0, prompt, chunk)
        ref = causal_attention_heads(q_all[-chunk:], kh, vh, prompt - chunk)
        for name, fn in chunked.items():
            err = (fn(q_all[-chunk:], kh, vh, prompt - chunk).float() - ref.float()).abs().max()

            def layer(fn=fn):
                for s in starts:
                    e = min(s + chunk, prompt)
                    fn(q_all[s:e], kh[:, :, :e], vh[:, :, :e], s)
            ms = median_ms(layer, repeats)
            rows.append({"kernel": name, "chunk": chunk, "ms_per_layer": ms,
                         "tflops": flops / ms / 1e9, "max_abs_err": float(err)})
            print(rows[-1], flush=True)
    ref = causal_attention_heads(q_all[-4096:], kh, vh, prompt - 4096)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        name = f"one causal square, {backend.name}"
        try:
            out = square(backend)(q_all, kh, vh, 0)
            err = (out[-4096:].float() - ref.float()).abs().max()
            ms = median_ms(lambda b=backend: square(b)(q_all, kh, vh, 0), repeats)
            rows.append({"kernel": name, "chunk": prompt, "ms_per_layer": ms,
                         "tflops": flops / ms / 1e9, "max_abs_err": float(err)})
        except RuntimeError as e:
            rows.append({"kernel": name, "chunk": prompt, "error": str(e).splitlines()[0][:200]})
        print(rows[-1], flush=True)
    return rows


def pinning(nbytes: int = 4 << 30, slab: int = 1 << 30) -> dict:
    """cudaHostRegister GB/s over fresh anonymous memory in slabs, as KVPool pins it: as is,
    with transparent huge pages asked for (madvise), and after the pages were touched."""
    import mmap

    from vengine.offload.uva import pin_range, unpin_range

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    result = {"thp": thp.read_text().strip() if thp.exists() else "?"}
    for variant in ("plain", "hugepage", "touched", "hugepage+touched"):
        buf = mmap.mmap(-1, nbytes)
        if "hugepage" in variant:
            buf.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(buf, dtype=torch.uint8)
        t0 = time.perf_counter()
        if "touched" in variant:
            t.fill_(0)
        t1 = time.perf_counter()
        for off in range(0, nbytes, slab):
            pin_range(t.data_ptr() + off, slab)
        t2 = time.perf_counter()
        for off in range(0, nbytes, slab):
            unpin_range(t.data_ptr() + off)
        result[variant] = {"touch_gb_per_s": nbytes / 1e9 / max(t1 - t0, 1e-9),
                           "pin_gb_per_s": nbytes / 1e9 / (t2 - t1),
                           "both_gb_per_s": nbytes / 1e9 / (t2 - t0)}
        print(variant, result[variant], flush=True)
        del t
        buf.close()
    return result


def profile_prefill(args) -> dict:
    from vengine import LLM
    from vengine.attention.config import VAttention

    if args.gpu_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap_gib * 2**30 / total))
    t0 = time.perf_counter()
    llm = LLM(model=args.model, device="cuda", max_context=args.ctx,
              attention=VAttention(epsilon=args.epsilon, delta=args.epsilon),
              gpu_mem=f"{args.gpu_cap_gib}GiB" if args.gpu_cap_gib else None)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    ids = torch.randint(0, llm.tokenizer.vocab_size, (args.prompt_tokens,)).tolist()
    t0 = time.perf_counter()
    llm.generate([ids], max_new_tokens=1)  # cold: compiles kernels, pins pages as handed out
    cold = time.perf_counter() - t0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        out = llm.generate([ids], max_new_tokens=1)[0]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cuda_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(cuda_table, cpu_table, sep="\n", flush=True)
    return {"load_s": load_s, "weights_gb_per_s": weights / 1e9 / load_s,
            "prefill_chunk": llm.memory.prefill_chunk, "prefill_piece": llm.memory.prefill_piece,
            "plan_gib": {k: v / 2**30 for k, v in llm.memory.gpu.items()}, "prompt_tokens": len(ids),
            "cold_prefill_s": cold, "warm_prefill_s": wall, "stats": out.stats,
            "cuda_table": cuda_table, "cpu_table": cpu_table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an HF directory for part 2 (e.g. random_model.py's)")
    p.add_argument("--prompt-tokens", type=int, default=131072)
    p.add_argument("--chunks", default="8192,16384,32768")
    p.add_argument("--ctx", default="129k")
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--gpu-cap-gib", type=float)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/prefill_gpu.json")
    args = p.parse_args()
    result = {"commit": git_commit(), "device": torch.cuda.get_device_name(),
              "command": " ".join(sys.argv),
              "kernels": attention_kernels(args.prompt_tokens,
                                           [int(c) for c in args.chunks.split(",")], args.repeats)
              if args.chunks else []}
    torch.cuda.empty_cache()
    result["pinning"] = pinning()
    if args.model:
        result["prefill"] = profile_prefill(args)
    save(result, args.out)


if __name__ == "__main__":
    main()
