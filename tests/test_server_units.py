"""The server's parts without a server: request parsing, `vengine serve`'s flag errors (before
any model load), import hygiene, and the engine loop's conversation cache under a small pool."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from vengine import VAttention
from vengine.server.protocol import APIError, check_prompt, parse_request

DEFAULTS = {"max_new_tokens": 512, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None,
            "repetition_penalty": 1.0}
MSG = [{"role": "user", "content": "hi"}]


def parse(body, chat=True, attention=VAttention()):
    return parse_request(body, chat, "m", DEFAULTS, attention)


def test_parse_maps_openai_fields_to_sampling():
    r = parse({"messages": MSG, "max_tokens": 9, "max_completion_tokens": 7, "top_p": 0.5,
               "stop": "x", "seed": 3, "temperature": 1, "stream": True,
               "stream_options": {"include_usage": True}, "top_k": 4, "user": "ignored"})
    p = r.params
    assert (p.max_new_tokens, p.top_p, p.stop, p.seed, p.temperature, p.top_k) == (
        7, 0.5, ("x",), 3, 1, 4)
    assert r.stream and r.include_usage and r.messages == MSG
    assert parse({"messages": MSG}).params.max_new_tokens == 512  # the server's default
    dev = parse({"messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}).messages
    assert dev == [{"role": "system", "content": "ab"}]
    assert parse({"prompt": ["once"]}, chat=False).prompt == "once"
    assert parse({"prompt": [1, 2, 3]}, chat=False).prompt == [1, 2, 3]
    # no-op values of unsupported fields pass, as clients send them
    parse({"messages": MSG, "frequency_penalty": 0, "presence_penalty": 0.0, "n": 1,
           "logprobs": False, "tools": [], "logit_bias": {}, "response_format": {"type": "text"}})
    own = parse({"messages": MSG, "epsilon": 0.2, "delta": 0.01}).params  # this request's bound
    assert (own.epsilon, own.delta) == (0.2, 0.01)
    assert parse({"messages": MSG}).params.epsilon is None  # the served one


@pytest.mark.parametrize("body, status, param", [
    ({"messages": MSG, "model": "other"}, 404, "model"),
    ({"messages": MSG, "model": 3}, 400, "model"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ({"messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ({"messages": MSG, "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MSG, "temperature": 3}, 400, "temperature"),
    ({"messages": MSG, "temperature": 0.0001}, 400, "temperature"),  # SamplingParams' range
    ({"messages": MSG, "top_p": 0}, 400, "top_p"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": MSG, "stop": [""]}, 400, "stop"),
    ({"messages": MSG, "seed": 1.5}, 400, "seed"),
    ({"messages": MSG, "stream": "yes"}, 400, "stream"),
    ({"messages": MSG, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage"),
    ({"messages": MSG, "n": 2}, 400, "n"),
    ({"messages": MSG, "presence_penalty": 0.1}, 400, "presence_penalty"),
    ({"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ({"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": MSG, "epsilon": 1.5}, 400, "epsilon"),
    ({"messages": MSG, "delta": 0}, 400, "delta"),
    ({"messages": MSG, "delta": "0.05"}, 400, "delta"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
])
def test_parse_refuses_with_the_field_named(body, status, param):
    with pytest.raises(APIError) as e:
        parse(body, chat="messages" in body)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    assert e.value.body()["error"]["message"] == e.value.message


def test_per_request_epsilon_needs_vattention():
    with pytest.raises(APIError, match="exact attention"):
        parse({"messages": MSG, "epsilon": 0.05}, attention="full")
    with pytest.raises(APIError, match=r"epsilon must be in \(0, 1\)"):
        parse({"messages": MSG, "epsilon": -0.1})


def test_check_prompt_names_both_lengths():
    with pytest.raises(APIError, match="the prompt has 100 tokens but the context holds 100"):
        check_prompt([1] * 100, 100, 50, "prompt")
    with pytest.raises(APIError, match=r"token ids must be in \[0, 50\)"):
        check_prompt([1, 50], 100, 50, "prompt")
    check_prompt([1] * 99, 100, 50, "prompt")


def test_serve_flag_errors_are_one_line_before_the_load(cli, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = [(["--port", "70000"], "--port must be in [0, 65535]"),
                 (["--max-queue", "-1"], "--max-queue must be >= 0"),
                 (["--batch-size", "0"], "--batch-size must be >= 1"),
                 (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
                 (["--attention", "full", "--epsilon", "0.1"], "--epsilon applies only"),
                 (["--ctx", "lots"], "--ctx"),
                 (["--temperature", "-1"], "--temperature"),
                 (["--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1:")]
        for flags, words in cases:
            r = cli("serve", *flags)
            assert r.returncode == 2 and words in r.stderr, (flags, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    finally:
        busy.close()
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    r = cli("serve")
    assert r.returncode == 2 and r.stderr == (
        "vengine: error: vengine serve needs fastapi and uvicorn: "
        "pip install 'vengine[serve]'\n")


def test_vengine_and_its_cli_import_no_web_framework():
    code = ("import sys, vengine, vengine.cli.main, vengine.server.protocol, "
            "vengine.server.engine_loop; bad = [m for m in ('fastapi', 'starlette', 'uvicorn') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_engine_loop_reuses_conversations_and_evicts_for_live_requests(default_gguf):
    """A pool of 4 pages and 2-page requests: a finished request stays cached while pages are
    spare, the oldest is freed when a new request needs its pages, and a request that extends a
    cached prompt continues it (its prompt's KV counted as cached, not prefilled)."""
    import vengine
    from vengine.engine.sampling import SamplingParams
    from vengine.server.engine_loop import EngineLoop, Handle

    llm = vengine.LLM(device="cpu", max_context=256, max_batch=2, host_mem="12MiB")
    assert llm.memory.num_pages == 4
    a, b, c = (llm.tokenizer.encode(w * 60)[:90] for w in ("one two ", "red blue ", "cat dog "))

    async def scenario():
        engine = EngineLoop(llm)
        engine.start(asyncio.get_running_loop())

        async def ask(ids):
            h = Handle(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))
            engine.submit(h)
            while (item := await h.events.get())[1] is None:
                pass
            return item[1], engine.occupancy()

        try:
            got = [await ask(ids) for ids in (a, b, c, a + [11], c + [11])]
        finally:
            engine.stop()
        return got, engine.occupancy()

    got, end = asyncio.run(scenario())
    cached = [final.cached_tokens for final, _ in got]
    convs = [occ["cached_conversations"] for _, occ in got]
    used = [occ["pages_used"] for _, occ in got]
    assert cached == [0, 0, 0, 0, 90], "a was evicted for c; c then continued"
    assert convs == [1, 2, 2, 2, 2] and used == [2, 4, 4, 4, 4], (convs, used)
    assert all(f.completion_tokens == 4 and f.prompt_tokens in (90, 91) for f, _ in got)
    assert end["pages_used"] == 0 and end["cached_conversations"] == 0  # stop frees them all
