"""`vengine serve` end to end: one server process on the default model (127.0.0.1, a free port,
ctx 1024), driven by the real openai client, raw httpx where the client would not send the bad
request, and headless Chromium for the chat page. The module's last test stops it with SIGTERM.

Budget: the server loads once (~10 s on two cores); requests ask for at most 16 tokens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

KEY = "test-key"
CTX = 1024
ROOT = Path(__file__).resolve().parents[1]
SHOT = ROOT / "docs" / "serve_chat.png"  # rewritten only with VENGINE_SCREENSHOT=1
PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "Name a colour.",
           "What is the capital of France?", "Name an animal.", "Count to three.",
           "What day comes after Monday?"]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=60)
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0,
                                    timeout=60)
        self.model = self.client.models.list().data[0].id

    def health(self) -> dict:
        return self.http.get("/health").json()

    def idle(self, timeout: float = 10.0) -> dict:
        """/health once nothing is in flight (an aborted request may take a step to go)."""
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["in_flight"] == 0 and h["active"] == 0) or time.monotonic() > end:
                return h
            time.sleep(0.05)

    def chat(self, text: str, max_tokens: int = 8, temperature: float = 0, **kw):
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens, temperature=temperature, **kw)


@pytest.fixture(scope="module")
def server(default_gguf):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vengine", "serve", "--port", "0", "--ctx", str(CTX),
         "--batch-size", "8", "--max-queue", "1", "--api-key", KEY, "--shutdown-timeout", "2"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stderr:  # the first line says where it listens, or why it failed
        lines.append(line)
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if m:
            break
    else:
        pytest.fail(f"the server did not start (exit {proc.wait()}):\n{''.join(lines)}")
    url = m.group(1)
    # drained, so that a chatty server never blocks on a full pipe; shown if a test fails
    threading.Thread(target=lambda: [print(line, end="", file=sys.stderr)
                                     for line in proc.stderr], daemon=True).start()
    end = time.monotonic() + 60
    while True:  # the page and API answer once the engine thread has started
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < end, "no /health"
        time.sleep(0.1)
    s = Server(proc, url)
    yield s
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _collect(stream) -> tuple[str, list[str], str | None, object]:
    pieces, finish, usage = [], None, None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            text = choice.delta.content if hasattr(choice, "delta") else choice.text
            if text:
                pieces.append(text)
            finish = choice.finish_reason or finish
    return "".join(pieces), pieces, finish, usage


def test_chat_and_completions_streamed_and_not(server):
    r = server.chat("Say hi", max_tokens=8)
    assert r.object == "chat.completion" and r.model == server.model
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["vengine"]
    assert extra["attention"] == "vattention" and extra["epsilon"] == 0.05
    assert 0 < extra["density"] <= 1 and extra["certificate_violation_rate"] == 0

    stream = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True})
    text, pieces, finish, usage = _collect(stream)
    assert text == r.choices[0].message.content and finish == r.choices[0].finish_reason
    assert len(pieces) > 1, "the reply came in one piece: not streamed"
    assert usage.completion_tokens == r.usage.completion_tokens

    c = server.client.completions.create(model=server.model, prompt="Once upon a time",
                                         max_tokens=8, temperature=0, stop=[" king"])
    assert c.object == "text_completion" and c.choices[0].text and " king" not in c.choices[0].text
    text, pieces, finish, _ = _collect(server.client.completions.create(
        model=server.model, prompt="Once upon a time", max_tokens=8, temperature=0,
        stop=[" king"], stream=True))
    assert text == c.choices[0].text and finish == c.choices[0].finish_reason and len(pieces) > 1

    seeded = [server.chat("Tell me a story.", max_tokens=8, seed=7, temperature=1.0,
                          top_p=0.9).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1], "the same seed gave different samples"
    models = server.client.models.list().data
    assert [m.id for m in models] == [server.model]


def test_concurrent_clients_match_serial_and_overlap(server, record_property):
    def ask(prompt):
        t = time.perf_counter()
        r = server.chat(prompt, max_tokens=8, extra_body={"ignore_eos": True})
        return r.choices[0].message.content, time.perf_counter() - t

    serial = [ask(p) for p in PROMPTS]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, PROMPTS))
    wall = time.perf_counter() - start
    for p, (a, _), (b, _) in zip(PROMPTS, serial, together):
        assert a == b, f"{p!r}: concurrent {b!r} != serial {a!r}"
    serial_sum = sum(t for _, t in serial)
    ratio = wall / serial_sum
    record_property("concurrent_over_serial", round(ratio, 3))
    print(f"8 concurrent clients: {wall:.2f} s, serial sum {serial_sum:.2f} s, ratio {ratio:.2f}")
    assert ratio < 1, f"concurrent {wall:.2f} s is not below the serial sum {serial_sum:.2f} s"


def test_disconnect_aborts_and_frees_pages(server):
    before = server.idle()
    stream = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Write a long poem."}],
        max_tokens=500, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    during = server.health()
    assert during["running"] == 1 and during["pages_used"] > before["pages_used"], during
    stream.close()  # the client leaves mid-stream
    after = server.idle(5)
    assert after["running"] == 0 and after["pages_used"] == before["pages_used"], (before, after)

    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/chat/completions", timeout=1.5, json={
            "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 500, "ignore_eos": True})
    after = server.idle(5)
    assert after["running"] == 0 and after["pages_used"] == before["pages_used"], (before, after)


def test_second_turn_prefills_only_new_tokens(server):
    first = [{"role": "user", "content": "My name is Alice. Say hi."}]
    r1 = server.client.chat.completions.create(model=server.model, messages=first,
                                               max_tokens=8, temperature=0)
    convo = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "What is my name?"}]
    r2 = server.client.chat.completions.create(model=server.model, messages=convo,
                                               max_tokens=8, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    turn1 = r1.usage.prompt_tokens + r1.usage.completion_tokens
    new = r2.usage.prompt_tokens - cached
    assert cached >= turn1 - 2, f"turn 2 reused {cached} of turn 1's {turn1} tokens"
    assert new <= r2.usage.prompt_tokens - turn1 + 2 and new > 0, (new, r2.usage)
    assert r2.model_extra["vengine"]["prefilled_tokens"] == new
    fresh = server.client.chat.completions.create(model=server.model, messages=convo,
                                                  max_tokens=8, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0  # not an extension: afresh
    assert r2.choices[0].message.content == fresh.choices[0].message.content


def _status(e: openai.APIStatusError) -> tuple[int, dict]:
    return e.status_code, e.body


@pytest.mark.parametrize("kwargs, status, param, words", [
    (dict(model="no-such-model"), 404, "model", "does not exist"),
    (dict(temperature="hot"), 400, "temperature", "must be a number"),
    (dict(max_tokens=0), 400, "max_tokens", "max_tokens must be"),
    (dict(frequency_penalty=0.5), 400, "frequency_penalty", "not supported"),
    (dict(n=2), 400, "n", "n = 1"),
    (dict(extra_body={"epsilon": 2}), 400, "epsilon", "in (0, 1)"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", "role"),
])
def test_bad_requests_get_openai_errors(server, kwargs, status, param, words):
    body = dict(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.APIStatusError) as e:
        server.client.chat.completions.create(**{**body, **kwargs})
    assert e.value.status_code == status
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_malformed_long_unauthorised_and_overloaded(server):
    h = server.http
    r = h.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = h.post("/v1/completions", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = h.post("/v1/completions", json={"prompt": "hello " * 2 * CTX, "max_tokens": 2})
    message = r.json()["error"]["message"]
    m = re.search(r"the prompt has (\d+) tokens but the context holds (\d+)", message)
    assert r.status_code == 400 and m and int(m.group(1)) > CTX and int(m.group(2)) == CTX
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    ok = server.chat("hi", max_tokens=1, extra_body={"epsilon": 0.2, "delta": 0.01})
    assert ok.choices[0].message.content is not None  # this request's own bound
    assert (ok.model_extra["vengine"]["epsilon"], ok.model_extra["vengine"]["delta"]) == (0.2, 0.01)

    # 8 running + 1 waiting (--max-queue 1) fill the server: the next one gets 429 at once
    before = server.idle()
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 500,
            "ignore_eos": True, "stream": True}
    streams = []
    try:
        for _ in range(9):
            streams.append(h.stream("POST", "/v1/chat/completions", json=body))
            streams[-1].__enter__()
        start = time.perf_counter()
        r = h.post("/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert time.perf_counter() - start < 2, "429 should come at once, not after a wait"
        assert r.json()["error"]["code"] == "overloaded"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    after = server.idle()
    assert after["in_flight"] == 0 and after["pages_used"] == before["pages_used"], after
    assert server.chat("Say hi", max_tokens=2).choices[0].message.content  # still serving


def test_chat_page_streams_in_chromium(server, tmp_path):
    """Type a message in headless Chromium (Debian's, driven by playwright), watch the reply
    grow, take a screenshot (docs/serve_chat.png with VENGINE_SCREENSHOT=1)."""
    from playwright.sync_api import sync_playwright

    chromium = Path("/usr/bin/chromium")
    assert chromium.exists(), "needs Debian's chromium: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.add_init_script(f"localStorage.setItem('vengine-key', {json.dumps(KEY)})")
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tokens')")
            # every text the reply bubble shows, as it changes
            page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
                const r = document.querySelector('.msg.assistant');
                if (r) window.seen.push(r.textContent); }).observe(
                document.getElementById('log'), {childList: true, subtree: true,
                characterData: true}); }""")
            page.click("#input")
            page.keyboard.type("What is the capital of France?")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
            reply = page.inner_text(".msg.assistant")
            seen = [s for s in page.evaluate("window.seen") if s]
            assert reply.strip() and "error" not in page.get_attribute(".msg.assistant", "class")
            assert len(set(seen)) > 2 and seen[-1] == reply, f"not streamed: {seen}"
            assert "prefilled" in page.inner_text("#status")
            shot = SHOT if os.environ.get("VENGINE_SCREENSHOT") == "1" else tmp_path / "p.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_sigterm_finishes_or_cancels_in_flight_then_exits_0(server):
    """Last: stops the module's server. A stream still running when the 2 s grace ends is
    cancelled with an error event and [DONE]; the process exits 0."""
    with server.http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 800, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        start = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and "shutting_down" in rest[-2], rest[-3:]
    assert server.proc.wait(timeout=20) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"shutdown took {elapsed:.1f} s"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)
