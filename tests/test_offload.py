"""Host KV pool: page bookkeeping, byte budgets, and the vAttention backend end to end."""

from __future__ import annotations

import pytest
import torch

import vengine
from vengine.engine.config import EngineConfig
from vengine.errors import ConfigError, HostMemoryError
from vengine.kernels.reference import store_rows
from vengine.offload.kv_pool import KVPool, PageAllocator, ResidentPages, parse_bytes


def test_parse_bytes():
    assert parse_bytes("64GiB") == 64 * 2**30
    assert parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1.5k") == 1536
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "12XB", "-1GiB", 0):
        with pytest.raises(ConfigError, match="host_mem"):
            parse_bytes(bad)


def test_allocator_grows_frees_and_refuses_beyond_budget():
    alloc = PageAllocator(num_pages=4, page_size=16, budget_bytes=4096)
    a, b = [], []
    alloc.grow(a, 17)  # two pages
    alloc.grow(b, 16)
    assert len(a) == 2 and len(b) == 1 and not set(a) & set(b) and alloc.num_free == 1
    with pytest.raises(HostMemoryError, match="budget of .* GiB is exhausted: 2 more pages"):
        alloc.grow(b, 48)
    assert len(b) == 1 and alloc.num_free == 1, "a refused request must not change state"
    alloc.free(a)
    assert a == [] and alloc.num_free == 3
    alloc.grow(b, 64)
    assert len(b) == 4 and alloc.num_free == 0


def test_pool_store_and_gather_round_trip():
    pool = KVPool(2, 3, 8, page_size=4, num_pages=16, dtype=torch.float32,
                  device=torch.device("cpu"))
    table = [5, 2, 7]
    slots = torch.tensor([table[t // 4] * 4 + t % 4 for t in range(10)])
    k, v = torch.randn(10, 3, 8), torch.randn(10, 3, 8)
    with pool.writing(slots, k, v):  # the CPU pool writes on the current stream
        store_rows(k, v, slots, pool.k_view[1], pool.v_view[1])
    kk, vv = pool.gather_pages(1, torch.tensor([table]), pool.dtype)
    assert torch.equal(kk[0, :, :10], k.transpose(0, 1))
    assert torch.equal(vv[0, :, :10], v.transpose(0, 1))


@pytest.fixture(scope="module")
def full_llm():
    return vengine.LLM(max_context=1024, attention="full")


def test_vattention_without_sparsity_reproduces_full_attention(full_llm):
    """Sink and window covering the whole context: every row exact, so greedy tokens must match."""
    dense = vengine.LLM(max_context=1024, attention=vengine.VAttention(sink=0, window=4096, seed=0))
    prompt = "Write a short story about a lighthouse keeper and a storm."
    ids = full_llm.chat_ids([{"role": "user", "content": prompt}])
    ref = full_llm.generate([ids], max_new_tokens=48, ignore_eos=True)[0]
    out = dense.generate([ids], max_new_tokens=48, ignore_eos=True)[0]
    assert out.token_ids == ref.token_ids
    assert out.stats["density"] == pytest.approx(1.0)


def test_fp8_kv_stores_a_byte_per_element_and_keeps_the_greedy_tokens(full_llm):
    """kv_dtype="fp8": the pool holds e4m3 rows (a quarter of the float32 pool's bytes per page;
    bfloat16 scales beside them) and a chat reply's greedy tokens, decoded over the dequantised
    rows by the torch kernels, are the float32 pool's; a bad kv_dtype is a one-line error."""
    fp8 = vengine.LLM(max_context=1024, attention="full", kv_dtype="fp8")
    assert fp8.pool.k.dtype == torch.float8_e4m3fn and fp8.pool.k_scale.dtype == torch.bfloat16
    assert fp8.pool.allocator.page_bytes * 4 == full_llm.pool.allocator.page_bytes
    ids = full_llm.chat_ids([{"role": "user", "content": "Name three rivers in Europe."}])
    want = full_llm.generate([ids], max_new_tokens=16)[0].token_ids
    got = fp8.generate([ids], max_new_tokens=16)[0].token_ids
    assert got == want and (fp8.pool.k_scale != 0).any()
    with pytest.raises(ConfigError, match="kv_dtype: expected auto or fp8"):
        EngineConfig(kv_dtype="int4")


def test_vattention_decode_is_sparse_and_reports_its_certificate(full_llm):
    from vengine.eval.activations import corpus_text

    sparse = vengine.LLM(max_context=4096, attention=vengine.VAttention(
        epsilon=0.2, delta=0.1, sink=32, window=32, top_k=0.02, pilot=64, seed=0,
        exact_below=0))
    ids = sparse.tokenizer.encode(corpus_text())[:2000]
    out = sparse.generate([ids], max_new_tokens=8, ignore_eos=True)[0]
    assert len(out.token_ids) == 8
    assert 0.0 < out.stats["density"] < 0.6
    assert 0.0 <= out.stats["certificate_violation_rate"] <= 1.0
    assert out.stats["sparse_steps"] == 7  # the first token comes from the exact prefill
    assert sparse.pool.allocator.num_free == sparse.pool.num_pages, "pages must be freed"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_long_generation_grows_memory_only_by_its_kv():
    """Over a long vAttention generation the process grows by the KV rows written and no more:
    no per-token state accumulates outside the paged pool."""
    llm = vengine.LLM(max_context=2048, attention=vengine.VAttention(
        epsilon=0.2, delta=0.1, sink=32, window=32, top_k=0.02, pilot=64, seed=0, exact_below=0))
    per_token = llm.model.config.kv_bytes_per_token(4)
    samples = {}
    for i, _ in enumerate(llm.stream("Tell me a very long story.", max_new_tokens=200,
                                     ignore_eos=True)):
        if i in (40, 190):
            samples[i] = _rss_bytes()
    grown = samples[190] - samples[40]
    kv = 150 * per_token
    print(f"RSS grew {grown / 2**20:.1f} MiB over 150 tokens; their KV is {kv / 2**20:.1f} MiB")
    assert grown < kv + 16 * 2**20


def test_cpu_pool_is_zero_where_nothing_was_written():
    """Padded decode reads a page's unwritten rows (masked, so they must be finite: 0 * NaN is
    NaN). Freed heap memory full of NaN must not come back as pool memory."""
    page_bytes = 2 * 3 * 64 * 16 * 4  # one page of K: layers, kv heads, page size, dim, float32
    for _ in range(4):
        junk = torch.full((64 * page_bytes // 4,), float("nan"))
        del junk
        pool = KVPool(2, 3, 16, 64, 64, torch.float32, torch.device("cpu"))
        assert torch.count_nonzero(pool.k) == 0 and torch.count_nonzero(pool.v) == 0


def test_resident_pages_follow_what_is_wanted():
    """GPU copies of pages (here on the CPU: the bookkeeping is the same): made when wanted, gone
    when not, made again when a freed page comes back for another sequence, none without slots."""
    pool = KVPool(2, 2, 8, 4, 10, torch.float32, torch.device("cpu"))
    pool.k.copy_(torch.randn(pool.k.shape))
    res = ResidentPages(pool, 2, torch.device("cpu"))
    res.keep([(3, 0), (7, 0)])
    for page in (3, 7):
        slot = int(res.slot_of[page])
        assert torch.equal(res.k[:, slot], pool.k[:, page])
    assert (res.slot_of >= 0).sum() == 2
    res.keep([(7, 0), (5, 1)])  # 3 no longer wanted: its slot goes to 5
    assert res.slot_of[3] == -1 and res.slot_of[5] >= 0 and res.slot_of[7] >= 0
    pool.k[:, 7] = 42.0  # page 7 freed and rewritten for sequence 2 (on the host only)
    res.keep([(7, 2), (5, 1)])
    assert torch.equal(res.k[:, int(res.slot_of[7])], pool.k[:, 7]), "stale copy of a reused page"
    res.keep([(7, 2), (5, 1), (9, 1)])  # out of slots: page 9 stays on the host
    assert res.slot_of[9] == -1
    res.drop_sequence(1)
    assert res.slot_of[5] == -1 and res.slot_of[7] >= 0 and len(res.free_slots) == 1
