"""The memory plan (engine/memory.py) at the shapes users run, and the page allocator under it:
an 8B model at 128K fits a 24 GiB GPU with vAttention and is refused in one line with full
attention's GPU KV; the host cap comes from the available RAM; pages are reused lowest first."""

from __future__ import annotations

import pytest

from vengine.engine.memory import HOST_FRACTION, code_page_bytes, gpu_state, plan_memory
from vengine.errors import ConfigError
from vengine.models.config import ModelConfig
from vengine.offload.kv_pool import PageAllocator
from vengine import VAttention

GiB = 2**30
LLAMA_8B = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                       tie_word_embeddings=False, attention_bias=False)
WEIGHTS_8B = 16_060_522_496  # bf16 parameters of Llama-3.1-8B
CTX = 131072 + 1024


def plan(attention, kv_on_host: bool, gpu_mem=24 * GiB, host_available=120 * GiB, **kw):
    return plan_memory(LLAMA_8B, dtype_bytes=2, page_size=64, max_context=CTX, max_batch=8,
                       host_mem=kw.pop("host_mem", None), host_available=host_available,
                       prefill_chunk=CTX, prefill_piece=8192, kv_on_host=kv_on_host,
                       gpu_mem=gpu_mem,
                       weights_bytes=WEIGHTS_8B,
                       state=gpu_state(LLAMA_8B, attention, 2, 64, kv_on_host), **kw)


def test_8b_at_128k_fits_24gib_with_vattention():
    p = plan(VAttention(), kv_on_host=True)
    one = -(-(CTX + 64) // 64)
    assert p.gpu_total <= 24 * GiB
    assert p.num_pages >= one, "one full context must fit"
    assert p.gpu["kv pages"] == p.num_pages * code_page_bytes(LLAMA_8B, 64, 3)
    assert p.prefill_chunk == CTX, "the whole prompt in one forward: no prefix re-read"
    assert 2048 <= p.prefill_piece <= 8192
    # the host cap: 8 full contexts (128 GiB) are more than 3/4 of 120 GiB
    assert p.num_pages * 64 * LLAMA_8B.kv_bytes_per_token(2) <= HOST_FRACTION * 120 * GiB


def test_full_attention_gpu_kv_that_cannot_fit_says_what_to_do():
    with pytest.raises(ConfigError) as e:
        plan("full", kv_on_host=False)
    assert e.value.field == "gpu_mem"
    msg = str(e.value)
    assert "\n" not in msg and "--attention vattention" in msg and "131072" not in msg
    assert f"{CTX}-token context" in msg
    # on a bigger card it fits, and the KV pages are what the GPU holds per page
    p = plan("full", kv_on_host=False, gpu_mem=139 * GiB)
    assert p.gpu["kv pages"] == p.num_pages * 64 * LLAMA_8B.kv_bytes_per_token(2)
    assert p.gpu_total <= 139 * GiB


def test_weights_alone_over_budget_and_small_ram_are_one_line_errors():
    with pytest.raises(ConfigError, match="gpu_mem 12.00 GiB .*weights 14.96 GiB"):
        plan(VAttention(), kv_on_host=True, gpu_mem=12 * GiB)
    with pytest.raises(ConfigError, match="host_mem .*75% of the 16.00 GiB") as e:
        plan(VAttention(), kv_on_host=True, host_available=16 * GiB)
    assert e.value.field == "host_mem"
    # a cap the user set may be smaller than a context: requests that outgrow it fail alone
    assert plan(VAttention(), kv_on_host=True, host_mem=4 * GiB).num_pages == 4 * GiB // (
        64 * LLAMA_8B.kv_bytes_per_token(2))


def test_prefill_piece_then_chunk_halve_to_fit():
    roomy = plan(VAttention(), kv_on_host=True, gpu_mem=80 * GiB)
    assert (roomy.prefill_chunk, roomy.prefill_piece) == (CTX, 8192)
    snug = plan(VAttention(), kv_on_host=True, gpu_mem=23 * GiB)  # the piece gives way first
    assert snug.prefill_chunk == CTX and snug.prefill_piece < 8192
    tight = plan(VAttention(), kv_on_host=True, gpu_mem=20 * GiB)  # then the chunk
    assert tight.prefill_piece == 2048 and tight.prefill_chunk < CTX
    assert snug.gpu_total <= 23 * GiB and tight.gpu_total <= 20 * GiB


def test_allocator_hands_out_lowest_pages_first_and_reports_growth():
    grown = []
    alloc = PageAllocator(10, 16, 10 * 100, on_grow=grown.append)
    a, b = [], []
    alloc.grow(a, 40)  # 3 pages
    alloc.grow(b, 20)  # 2 pages
    assert a == [0, 1, 2] and b == [3, 4] and grown == [3, 5]
    alloc.free(a)
    alloc.grow(a, 16 * 4)
    assert a == [0, 1, 2, 5] and grown == [3, 5, 6], "freed pages first, growth only past them"
    alloc.shrink(a, 16)
    assert a == [0] and alloc.num_free == 10 - 3


def test_row_cache_is_counted_as_the_backend_allocates_it():
    """VAttention(row_cache=2) at 8B shapes, 128K: the plan's fixed GPU bytes grow by exactly
    what the backend's RowCache holds for a pool of that context (two copies of each exact row's
    K and V, and its position), and that still fits a 24 GiB card beside the weights."""
    import torch

    from vengine.offload.row_cache import RowCache

    spec = VAttention(row_cache=2)
    plain, cached = (gpu_state(LLAMA_8B, VAttention(row_cache=n), 2, 64, True, max_context=131072)
                     for n in (0, 2))
    width = spec.exact_rows(131072, 64)
    cache = RowCache(LLAMA_8B.num_layers, 2, LLAMA_8B.num_kv_heads, width, LLAMA_8B.head_dim,
                     torch.bfloat16, torch.device("meta"))
    assert cached.resident_bytes - plain.resident_bytes == cache.nbytes
    on_gpu = [gpu_state(LLAMA_8B, VAttention(row_cache=n), 2, 64, False, max_context=131072)
              for n in (0, 2)]  # KV on the GPU: the backend still allocates the cache
    assert on_gpu[1].resident_bytes - on_gpu[0].resident_bytes == cache.nbytes
    assert 131072 * 0.02 < width < 131072 * 0.03
    plan_memory(LLAMA_8B, dtype_bytes=2, page_size=64, max_context=CTX, max_batch=2,
                host_mem=None, host_available=120 * GiB, prefill_chunk=CTX, prefill_piece=8192,
                kv_on_host=True, gpu_mem=24 * GiB, weights_bytes=WEIGHTS_8B, state=cached)
