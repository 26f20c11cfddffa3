"""Model correctness against HF transformers as the reference.

The default SmolLM2-135M-Instruct GGUF is loaded once by vengine and once by transformers (which
dequantises the same file to float32); tiny randomly initialised Llama / Qwen2 checkpoints are
saved by transformers as safetensors directories and loaded back by vengine.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
from pathlib import Path

import pytest
import torch

import vengine

transformers = pytest.importorskip("transformers")

TEXTS = {
    "prose": (
        "The lighthouse keeper had lived alone on the island for almost twenty years. Every "
        "evening he climbed the spiral staircase, trimmed the wick and polished the great lens "
        "until it shone like a second moon. Ships passed in the night without ever knowing his "
        "name, yet each of them owed him something. In the winter storms he wrote long letters to "
        "his sister in the city, describing the colour of the sea, the seabirds that sheltered "
        "under the gallery and the strange silence that followed the wind."
    ),
    "code": (
        "import heapq\n\n\n"
        "def dijkstra(graph: dict[str, dict[str, int]], start: str) -> dict[str, int]:\n"
        "    dist = {start: 0}\n"
        "    queue = [(0, start)]\n"
        "    while queue:\n"
        "        d, node = heapq.heappop(queue)\n"
        "        if d > dist.get(node, float('inf')):\n"
        "            continue\n"
        "        for nxt, w in graph[node].items():\n"
        "            if d + w < dist.get(nxt, float('inf')):\n"
        "                dist[nxt] = d + w\n"
        "                heapq.heappush(queue, (d + w, nxt))\n"
        "    return dist\n"
    ),
    "multilingual": (
        "Le petit prince regardait le coucher du soleil quarante-trois fois par jour, car sa "
        "planète était minuscule. 北京是中华人民共和国的首都，有着三千多年的历史。"
        "Il disait : « Les grandes personnes aiment les chiffres. » 春眠不觉晓，处处闻啼鸟。"
    ),
}

TOP = 64  # log-probabilities compared over the reference's top-64 tokens at every position
TOL = 1e-3


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, label: str, tol: float = TOL):
    """Same argmax everywhere and |log_softmax diff| <= tol over the reference's top tokens."""
    assert ours.shape == ref.shape, f"{label}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{label}: non-finite logits"
    lp_ours = torch.log_softmax(ours.double(), dim=-1)
    lp_ref = torch.log_softmax(ref.double(), dim=-1)
    top = lp_ref.topk(min(TOP, ref.shape[-1]), dim=-1).indices
    diff = (lp_ours.gather(-1, top) - lp_ref.gather(-1, top)).abs()
    max_diff, mean_diff = diff.max().item(), diff.mean().item()
    bad = (ours.argmax(-1) != ref.argmax(-1)).nonzero().flatten().tolist()
    msg = (f"{label}: max |dlogp| {max_diff:.3e}, mean {mean_diff:.3e} over top-{top.shape[-1]}; "
           f"argmax differs at {len(bad)} of {ref.shape[0]} positions {bad[:10]}")
    print(msg)
    assert not bad and max_diff <= tol, msg


# -- fixtures: the default GGUF through vengine and through transformers -------------------------
# default_gguf and hf_tok (shared with test_tokenizer) are in conftest.py.


@pytest.fixture(scope="module")
def llm(default_gguf):
    return vengine.LLM(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def ref_logits(hf_tok, hf_model):
    """{name: (ids, [len, vocab] float32 logits)} of the reference for every text."""
    out = {}
    with torch.inference_mode():
        for name, text in TEXTS.items():
            ids = hf_tok(text)["input_ids"]
            out[name] = (ids, hf_model(torch.tensor([ids])).logits[0].float())
    return out


def test_texts_are_long_enough(ref_logits):
    assert len(ref_logits["prose"][0]) >= 90
    assert all(len(ids) >= 40 for ids, _ in ref_logits.values())


@pytest.mark.parametrize("name", list(TEXTS))
def test_gguf_logit_parity(llm, ref_logits, name):
    ids, ref = ref_logits[name]
    assert_logits_close(llm.logits(ids), ref, f"gguf/{name}")


def test_gguf_logit_parity_chunked_prefill_across_pages(ref_logits):
    # prefill_chunk=13 does not divide page_size=16: chunks start mid-page and span page borders.
    llm = vengine.LLM(device="cpu", dtype="float32", prefill_chunk=13, page_size=16)
    assert llm.runner.prefill_chunk == 13 and llm.pool.page_size == 16
    ids, ref = ref_logits["prose"]
    assert len(ids) > 4 * 16
    assert_logits_close(llm.logits(ids), ref, "gguf-chunked/prose")


def test_same_tokenizer_ids_as_reference(llm, ref_logits):
    # The parity tests feed the reference's ids; the engine's own tokenizer must give the same.
    for name, text in TEXTS.items():
        assert llm.tokenizer.encode(text) == ref_logits[name][0], name


def test_greedy_continuation_matches_transformers(llm, hf_tok, hf_model):
    story = "Write a short story about a robot who learns to paint."
    messages = [{"role": "user", "content": story}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    assert llm.chat_ids(messages) == ids
    n = 64
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                dtype=torch.long), do_sample=False, max_new_tokens=n,
                                pad_token_id=hf_tok.eos_token_id)
    ref = out[0, len(ids):].tolist()
    ours = llm.generate([ids], max_new_tokens=n, temperature=0.0)[0].token_ids

    # Both stop at end-of-generation tokens, maybe different sets: compare up to the first one.
    eos = set(llm.tokenizer.stop_ids) | {hf_tok.eos_token_id}

    def cut(tokens):
        for i, t in enumerate(tokens):
            if t in eos:
                return tokens[: i + 1]
        return tokens

    ref, ours = cut(ref), cut(ours)
    assert len(ref) >= 32, f"the reference stopped after {len(ref)} tokens: pick a longer prompt"
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    assert ours == ref, (f"first difference at token {first}:\n"
                         f"ours: {hf_tok.decode(ours)!r}\nref:  {hf_tok.decode(ref)!r}")


@pytest.mark.parametrize("weights", ["dense", "int4", "int8"])
def test_bfloat16_argmax_agrees_with_float32(llm, ref_logits, weights):
    """bfloat16 activations with dense, int4 or int8 weights against float32 dense. Measured
    here (2026-12-08): top-1 agreement 0.947 / 0.937 / 0.937, mean |logit difference| 0.099 /
    0.149 / 0.258 (int4 repacks the file's Q4_1 blocks exactly; int8 requantises them per
    row). docs/benchmarks.md has the 400-position and greedy figures."""
    ids, _ = ref_logits["prose"]
    fp32 = llm.logits(ids)
    bf16_llm = vengine.LLM(device="cpu", dtype="bfloat16", weights=weights)
    assert bf16_llm.model.norm.weight.dtype == torch.bfloat16
    kinds = {type(m).__name__ for m in bf16_llm.model.modules()}
    assert {"dense": "Linear", "int4": "Int4Linear", "int8": "Int8Linear"}[weights] in kinds
    bf16 = bf16_llm.logits(ids)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.isfinite(bf16).all()
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    diff = (bf16 - fp32).abs().mean().item()
    print(f"{weights}: argmax agreement with fp32 {agree:.3f}, mean |difference| {diff:.3f}")
    assert agree >= 0.9 and diff < 0.3


# -- tiny random checkpoints saved by transformers ----------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2,
            max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _tiny_model(arch: str, vocab: int, seed: int = 0, **extra):
    import transformers as tf

    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                          "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM),
                          "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
                          "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
                          "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    config = cfg_cls(vocab_size=vocab, **{**TINY, **extra})
    if arch == "gemma2":  # transformers' SDPA path drops Gemma 2's soft-capping (5.17 chose it)
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def _save(model, tokenizer, path: Path, **kwargs) -> Path:
    model.save_pretrained(str(path), **kwargs)
    tokenizer.save_pretrained(str(path))
    assert list(path.glob("*.safetensors")), "transformers saved no safetensors"
    return path


def _to_legacy_rope_config(path: Path, theta: float, scaling: dict | None) -> None:
    """Rewrite config.json the way transformers 4.x (and most hub checkpoints) spell RoPE."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def tiny_ids(hf_tok):
    ids = hf_tok(TEXTS["prose"])["input_ids"]
    assert len(ids) > 64  # well past original_max_position_embeddings=32
    return ids


def _reference(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _check_tiny(model, path: Path, ids, label: str):
    ref = _reference(model, ids)
    assert ref.std() > 0.5, "random init too small: logits nearly constant"
    ours = vengine.LLM(model=str(path), device="cpu", dtype="float32").logits(ids)
    assert_logits_close(ours, ref, label)


TINY_CASES = {
    "llama": ("llama", {}, None),
    "qwen2": ("qwen2", {}, None),
    # RoPE spelled the transformers-4 way (rope_theta / rope_scaling), as most hub checkpoints are.
    "llama-llama3-rope-legacy-config": (
        "llama", {"rope_scaling": dict(LLAMA3_ROPE), "rope_theta": 500000.0},
        (500000.0, dict(LLAMA3_ROPE))),
    "qwen2-theta1e6-legacy-config": ("qwen2", {"rope_theta": 1e6}, (1e6, None)),
    # Qwen3: per-head q/k RMSNorm before RoPE, head_dim 24 (not hidden / heads = 16), tied
    "qwen3": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}, None),
    # SmolLM3: no RoPE on every 4th layer (layer 3 of 4 here)
    "smollm3": ("smollm3", {"num_hidden_layers": 4, "pad_token_id": None}, None),
    # Gemma 3: 5 sliding-window layers (window 16, well inside the prompt) to 1 global, local RoPE
    # base 10K and global 1M, (1 + w) norms around attention and MLP, tanh-GELU, scaled
    # embeddings, q/k norms, query_pre_attn_scalar apart from head_dim, tied embeddings
    "gemma3": ("gemma3", {"num_hidden_layers": 6, "sliding_window": 16, "head_dim": 32,
                          "query_pre_attn_scalar": 24, "tie_word_embeddings": True,
                          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}, None),
    # Gemma 2: sliding-window (16) and global layers alternating, one RoPE base, attention
    # scores soft-capped (5, low enough to bind at this init), final logits capped, the Gemma
    # norms, tanh-GELU, scaled embeddings, query_pre_attn_scalar, tied; no q/k norms
    "gemma2": ("gemma2", {"num_hidden_layers": 4, "sliding_window": 16, "head_dim": 32,
                          "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                          "final_logit_softcapping": 3.0, "tie_word_embeddings": True,
                          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}, None),
    # Phi-4-mini-like: fused qkv_proj / gate_up_proj tensors, partial rotary 0.75, LongRoPE
    # (short factors at this length), tied embeddings
    "phi3": ("phi3", {"pad_token_id": None, "tie_word_embeddings": True,
                      "original_max_position_embeddings": 64, "max_position_embeddings": 256,
                      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.75,
                                          "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                          "long_factor": [2.0 + 0.5 * i for i in range(6)]}},
             None),
    # Mistral with its sliding window on every layer (16 tokens, well inside the prompt): no
    # layer attends over the whole context, so no KV goes to the pool
    "mistral": ("mistral", {"sliding_window": 16}, None),
    # Llama 3.2: llama3 RoPE with factor 32, tied embeddings
    "llama3.2": ("llama", {"rope_parameters": {**LLAMA3_ROPE, "factor": 32.0,
                                               "rope_theta": 500000.0},
                           "tie_word_embeddings": True}, None),
}

V5_CONFIG_BUG = (
    "vengine/models/config.py ModelConfig.from_hf reads only 'rope_theta' and 'rope_scaling'; "
    "transformers 5 writes config.json with a 'rope_parameters' dict instead (rope_theta and "
    "llama3/linear scaling inside it), so vengine silently uses theta=10000 and no scaling"
)


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_safetensors_logit_parity(hf_tok, tiny_ids, tmp_path, case):
    arch, extra, legacy = TINY_CASES[case]
    model = _tiny_model(arch, len(hf_tok), **extra)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    asked = extra.get("rope_scaling") or extra.get("rope_parameters")
    if asked:
        assert model.config.rope_parameters["rope_type"] == asked["rope_type"]
    if arch == "smollm3":
        assert model.config.no_rope_layers == [1, 1, 1, 0], "a NoPE layer must be in the test"
    if arch == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (24,)
    if arch == "gemma3":
        assert model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    if arch == "gemma2":
        assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    path = _save(model, hf_tok, tmp_path / case)
    if legacy is not None:
        _to_legacy_rope_config(path, *legacy)
    _check_tiny(model, path, tiny_ids, case)


@pytest.mark.parametrize("case", ["llama3-rope", "qwen2-theta1e6"])
def test_tiny_transformers5_rope_parameters(hf_tok, tiny_ids, tmp_path, case):
    if case == "llama3-rope":
        model = _tiny_model("llama", len(hf_tok), rope_scaling=dict(LLAMA3_ROPE),
                            rope_theta=500000.0)
    else:
        model = _tiny_model("qwen2", len(hf_tok), rope_theta=1e6)
    path = _save(model, hf_tok, tmp_path / case)
    saved = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in saved  # config.json exactly as transformers 5 writes it
    _check_tiny(model, path, tiny_ids, case)


def test_tiny_sharded_safetensors(hf_tok, tiny_ids, tmp_path):
    model = _tiny_model("llama", len(hf_tok), seed=3)
    path = _save(model, hf_tok, tmp_path / "sharded", max_shard_size="20KB")
    index = path / "model.safetensors.index.json"
    assert index.is_file()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
    _check_tiny(model, path, tiny_ids, "llama-sharded")


def test_info_shows_layer_kinds_and_kv_per_token(hf_tok, tmp_path, capsys):
    from vengine.cli.main import main

    path = _save(_tiny_model("smollm3", len(hf_tok), num_hidden_layers=4, pad_token_id=None),
                 hf_tok, tmp_path / "smollm3")
    assert main(["info", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "4 global attention layers (3 with RoPE, 1 without)" in out
    # 2 (K, V) x 4 layers x 2 KV heads x head dim 16 x 4 bytes (float32 on CPU)
    assert "1.0 KiB in torch.float32" in out


@pytest.mark.parametrize("case, expect", [
    # Gemma 3 tiny: 1 global layer of 6; window 16 (+ ring slack) on the other 5
    ("gemma3", "in the 1 global layers (host pool); the 5 sliding-window layers"),
    ("mistral", "none pooled (every layer keeps a window; torch.float32); the 2 sliding-window"),
])
def test_info_counts_kv_per_layer_kind(hf_tok, tmp_path, capsys, case, expect):
    from vengine.cli.main import main

    arch, extra, _ = TINY_CASES[case]
    path = _save(_tiny_model(arch, len(hf_tok), **extra), hf_tok, tmp_path / case)
    assert main(["info", "--model", str(path), "--device", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert expect in out, out
    assert "ring per sequence on the device" in out


@pytest.mark.parametrize("case, pooled", [("gemma3", 1), ("mistral", 0), ("gemma2", 2)])
def test_sliding_window_chunked_prefill_and_decode(hf_tok, tiny_ids, tmp_path, case, pooled):
    """The window layers' rings across prefill chunks shorter than the window, and decode past
    the window: logits and greedy tokens as transformers'. The host pool holds only the
    global layers (Gemma 3: 1 of 6; Mistral's window on every layer: none)."""
    arch, extra, _ = TINY_CASES[case]
    model = _tiny_model(arch, len(hf_tok), **extra)
    path = _save(model, hf_tok, tmp_path / case)
    ref = _reference(model, tiny_ids)
    chunked = vengine.LLM(model=str(path), device="cpu", dtype="float32", prefill_chunk=5)
    assert chunked.pool.k.shape[0] == pooled, "only the global layers' KV is pooled"
    assert_logits_close(chunked.logits(tiny_ids), ref, f"{case} chunked")
    prompt = tiny_ids[:40]
    with torch.inference_mode():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            min_new_tokens=24)[0, 40:].tolist()
    for attention in ("full", "vattention"):
        llm = vengine.LLM(model=str(path), device="cpu", dtype="float32", attention=attention)
        out = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)[0].token_ids
        assert out == hf, attention
    from vengine.eval.activations import capture

    layers = capture(chunked.model, tiny_ids)  # the eval's calibration input: global layers only
    assert len(layers) == pooled and all(x.k.shape[0] == len(tiny_ids) for x in layers)
    capped = vengine.LLM(model=str(path), device="cpu", dtype="float32", host_mem="1GiB")
    assert capped.generate(prompt, max_new_tokens=24, ignore_eos=True)[0].token_ids == hf


def test_window_attention_matches_a_masked_reference():
    """window_causal_attention against SDPA with the full [T, S] sliding-window mask, for a
    chunk after `prev` cached keys (GQA, a window that does not divide the chunk)."""
    from vengine.attention.window import window_causal_attention

    torch.manual_seed(0)
    W, T, Hq, Hkv, D = 7, 23, 4, 2, 8
    for prev in (0, 3, W - 1):
        q = torch.randn(T, Hq, D)
        k, v = torch.randn(prev + T, Hkv, D), torch.randn(prev + T, Hkv, D)
        qpos = torch.arange(T)[:, None] + prev
        kpos = torch.arange(prev + T)[None, :]
        mask = (kpos <= qpos) & (kpos > qpos - W)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
            v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
        got = window_causal_attention(q, k, v, W, prev)
        assert torch.allclose(got, ref, atol=1e-5), prev


@pytest.mark.parametrize("keep", [70, 20])  # a short rewind keeps the rings, a long one restarts
def test_gemma3_kept_request_continues_as_a_fresh_one(hf_tok, tiny_ids, tmp_path, keep):
    """A request continued with a rewritten tail (a chat turn) decodes what a fresh request
    over the same ids decodes: the window rings are kept within their slack, else rebuilt."""
    from vengine.engine.sampling import SamplingParams

    model = _tiny_model("gemma3", len(hf_tok), **TINY_CASES["gemma3"][1])
    llm = vengine.LLM(model=str(_save(model, hf_tok, tmp_path / "g")), device="cpu",
                      dtype="float32", attention="full")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    seq = llm.new_request(tiny_ids[:80], params)
    seq.keep_cache = True  # as a ChatSession's
    list(llm.run([seq]))
    assert seq.num_cached >= 80
    turn = tiny_ids[:keep] + tiny_ids[10:30]
    llm.continue_request(seq, turn, params)
    assert seq.num_cached == (keep if keep >= 80 + 11 - 64 else 0)
    list(llm.run([seq]))
    fresh = llm.generate(turn, max_new_tokens=12, ignore_eos=True)[0].token_ids
    assert seq.output_ids == fresh


def test_phi3_longrope_factors_follow_the_context(hf_tok, tiny_ids, tmp_path):
    """LongRoPE: with a context within the original length the short factors apply (as
    transformers over a sequence that short); past it, the long ones (the test above)."""
    model = _tiny_model("phi3", len(hf_tok), **TINY_CASES["phi3"][1])
    path = _save(model, hf_tok, tmp_path / "phi3")
    ids = tiny_ids[:40]
    ours = vengine.LLM(model=str(path), device="cpu", dtype="float32", max_context=64)
    assert_logits_close(ours.logits(ids), _reference(model, ids), "phi3 short")
    long = vengine.LLM(model=str(path), device="cpu", dtype="float32", max_context=256)
    assert not torch.allclose(long.logits(ids), ours.logits(ids)), "long factors differ"


def test_gemma2_soft_capping_binds(hf_tok, tiny_ids, tmp_path):
    """The tiny Gemma 2's attention cap changes its logits (so the parity above tests it): the
    same weights with the cap lifted from config.json give other logits."""
    model = _tiny_model("gemma2", len(hf_tok), **TINY_CASES["gemma2"][1])
    path = _save(model, hf_tok, tmp_path / "gemma2")
    capped = vengine.LLM(model=str(path), device="cpu", dtype="float32").logits(tiny_ids)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": None}))
    free = vengine.LLM(model=str(path), device="cpu", dtype="float32").logits(tiny_ids)
    assert (capped.log_softmax(-1) - free.log_softmax(-1)).abs().max() > 0.05
