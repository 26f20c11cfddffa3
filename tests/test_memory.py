"""Host memory follows the KV in use: `vengine generate` on the default model at --ctx 8k with a
6K-token prompt peaks within the weights + the prompt's KV + a fixed margin, and a larger
--batch-size (a larger KV budget) does not raise the peak before requests arrive. Each run is a
fresh process, as a user's is; its peak RSS is the kernel's high-water mark (VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

MARGIN = 1 << 30  # interpreter, torch, numba, tokenizer, prefill activations
# VmHWM, not getrusage's ru_maxrss: that survives exec, so a child forked from a big pytest
# process would report the parent's peak
RUN = """
import json, re, sys
from pathlib import Path
from vengine.cli.main import main
rc = main(json.loads(sys.argv[1]))
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(json.dumps({"rc": rc, "rss": int(hwm) * 1024}))
"""


def peak_rss(argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv)], capture_output=True,
                          text=True, check=False, timeout=900)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, proc.stderr[-2000:]
    return result["rss"]


def test_generate_rss_tracks_the_kv_in_use(tmp_path):
    import vengine
    from vengine.eval.activations import corpus_text

    llm = vengine.LLM(device="cpu", max_context=8192)
    ids = llm.tokenizer.encode(corpus_text())[:4000]  # 6000 until the suite neared 15 min
    prompt = llm.tokenizer.decode(ids)
    n = len(llm.tokenizer.encode(prompt))
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    kv = llm.model.config.kv_bytes_per_token(4) * (n + 64)
    del llm
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 0, "prompt": prompt}) + "\n")
    peaks = {}
    for batch in (1, 16):
        out = tmp_path / f"out{batch}.jsonl"
        peaks[batch] = peak_rss(["generate", "--input", str(inp), "--output", str(out),
                                 "--ctx", "8k", "--max-new-tokens", "4", "--device", "cpu",
                                 "--batch-size", str(batch)])
        assert json.loads(out.read_text())["prompt_tokens"] >= 3700
    budget16 = 16 * 8192 * kv // (n + 64)  # what --batch-size 16 reserves for KV
    print(f"peak RSS {peaks[1] / 2**20:.0f} / {peaks[16] / 2**20:.0f} MiB (batch 1 / 16); "
          f"weights {weights / 2**20:.0f} MiB, KV in use {kv / 2**20:.0f} MiB, "
          f"batch-16 budget {budget16 / 2**20:.0f} MiB")
    assert peaks[1] <= weights + kv + MARGIN
    # the 16x budget (5.6 GiB more) is reserved, not touched; the key codes' zeros, committed
    # eagerly, added 300 MiB before they became lazy too
    assert peaks[16] <= peaks[1] + 128 * 2**20
