"""The openai backend against real OpenAI-compatible servers on loopback (127.0.0.1 only).

`transformers serve` (needs fastapi, uvicorn, openai) serves a tiny random model from a
local folder, offline: its greedy replies must equal the local hf backend's, and stage 02
through it must write the same files as stage 02 on the hf backend. A stub server checks
the request body, retry with backoff, and failures. Servers are stopped at the end.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import common
from helpers import lines, run_stage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(chatty_llama, tmp_path_factory):
    """Two `transformers serve` replicas of the tiny model; yields their base URLs."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    ports, servers, logs = [free_port(), free_port()], [], []
    try:
        for port in ports:
            logs.append(tmp_path_factory.mktemp("serve") / "serve.log")
            with open(logs[-1], "w") as out:
                servers.append(subprocess.Popen(
                    [sys.executable, "-m", "transformers.cli.transformers", "serve", chatty_llama, "--host",
                     "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env))
        deadline = time.time() + 180
        for port, server, log in zip(ports, servers, logs):
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
                    time.sleep(0.5)
        yield [f"http://127.0.0.1:{port}/v1" for port in ports]
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


PROMPTS = [[{"role": "user", "content": c}] for c in
           ["What has keys but cannot open locks?", "I am tall when I am young and short when I am old. What am I?",
            "Footsteps!"]]


def test_server_replies_equal_local_greedy(served, chatty_llama):
    greedy = dict(max_new_tokens=10, temperature=0.0, top_p=1.0)
    remote = common.load_backend("openai", chatty_llama, served[0]).generate(PROMPTS, [1, 2, 3], **greedy)
    local = common.load_backend("hf", chatty_llama).generate(PROMPTS, [1, 2, 3], **greedy)
    # The texts; not `ended`: on this random model the server's stop rule and ours differ on one row (it says
    # "stop" where our 10 tokens without an end token say cut). Each side's signal is tested on its own.
    assert [r.text for r in remote] == [r.text for r in local]
    assert all(r.text for r in remote) and len({r.text for r in remote}) == 3


def test_stage_02_through_server_equals_hf(served, chatty_llama, tmp_path, monkeypatch):
    riddles = tmp_path / "01.jsonl"
    riddles.write_text("".join(json.dumps({"id": f"r{i}", "messages": p}) + "\n" for i, p in enumerate(PROMPTS)))

    def args(d, *more):
        return [f"--generator={chatty_llama}", f"--in-file={riddles}", f"--out-file={d / '02.jsonl'}",
                f"--rejected-file={d / 'rej.jsonl'}", "--temperature=0", "--max-new-tokens=10", *more]

    run_stage(monkeypatch, "02_answer_riddles.py", *args(tmp_path / "hf"))
    # Through both replicas: the requests are shared, the records are the same.
    run_stage(monkeypatch, "02_answer_riddles.py", *args(tmp_path / "api", "--backend=openai",
                                                         f"--base-url={','.join(served)}"))
    for name in ("02.jsonl", "rej.jsonl"):
        hf = (tmp_path / "hf" / name).read_bytes() if (tmp_path / "hf" / name).exists() else b""
        assert (tmp_path / "api" / name).read_bytes() == hf, name
    assert len(lines(tmp_path / "api" / "02.jsonl")) + len(lines(tmp_path / "api" / "rej.jsonl")) == 3


class Stub(BaseHTTPRequestHandler):
    """Chat completions that fail on purpose: "flaky" once with 503, "broken" always with 400."""

    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.seen.append((body, self.headers.get("Authorization")))
        text = body["messages"][-1]["content"]
        tries = sum(b["messages"][-1]["content"] == text for b, _ in Stub.seen)
        if text == "bytes":  # a reply that is not UTF-8
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "52")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"message": {"content": "\xff\xfe ok"}}]}'.ljust(52))
            return
        if text == "broken" or (text == "flaky" and tries == 1):
            self.send_response(400 if text == "broken" else 503)
            self.end_headers()
            self.wfile.write(b"no")
            return
        self.reply(f" re: {text} ", {"cut": "length", "silent": None}.get(text, "stop"))

    def reply(self, content, finish="stop"):
        choice = {"message": {"role": "assistant", "content": content}}
        if finish:
            choice["finish_reason"] = finish
        body = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retry_backoff_and_failures(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = common.OpenAIBackend("some-model", f"http://127.0.0.1:{server.server_port}/v1/", api_key="k",
                                       retries=3)
        prompts = [[{"role": "user", "content": t}] for t in ("flaky", "fine", "broken")]
        start = time.time()
        sampling = dict(max_new_tokens=16, temperature=0.7, top_p=0.9)
        assert backend.generate(prompts, [5, 6, 2**40 + 7], **sampling) == [("re: flaky", True), ("re: fine", True),
                                                                           None]
        assert 0.3 <= time.time() - start < 10  # one backoff (the client's first: 0.5 s less up to 25% jitter)
        assert "request failed: http://127.0.0.1" in capsys.readouterr().err
        body, auth = Stub.seen[0]
        assert auth == "Bearer k"
        assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p")} == {
            "model": "some-model", "max_tokens": 16, "temperature": 0.7, "top_p": 0.9}
        assert sorted(b["seed"] for b, _ in Stub.seen) == [5, 5, 6, 7]  # 2**40 + 7 sent modulo 2**31
        with pytest.raises(common.InputError, match=r"\d+ requests in a row failed"):
            backend.generate(prompts[2:], [1], **sampling)
        with pytest.raises(common.InputError, match="the openai backend needs --base-url"):
            common.load_backend("openai", "m", "")
    finally:
        server.shutdown()
        server.server_close()


def test_finish_reason_says_whether_a_reply_was_cut(capsys):
    """finish_reason "length" is a reply cut by max_tokens, "stop" one that ended; a server that names none
    gives no signal (ended None: the stages fall back on the last character)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = common.OpenAIBackend("m", f"http://127.0.0.1:{server.server_port}/v1", retries=1)
        prompts = [[{"role": "user", "content": t}] for t in ("cut", "done", "silent", "bytes")]
        got = backend.generate(prompts, [1, 2, 3, 4], max_new_tokens=8, temperature=0.0, top_p=1.0)
        # A reply that is not UTF-8 is a failed request (retried by a rerun), not a traceback.
        assert got == [("re: cut", False), ("re: done", True), ("re: silent", None), None]
    finally:
        server.shutdown()
        server.server_close()


def test_requests_spread_over_servers_and_a_dead_one_loses_nothing(capsys):
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Stub) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        a, b = (f"http://127.0.0.1:{server.server_port}/v1" for server in servers)
        dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        backend = common.OpenAIBackend("m", [a, dead, b], retries=2)
        prompts = [[{"role": "user", "content": f"riddle {i}"}] for i in range(9)]
        replies = backend.generate(prompts, list(range(9)), max_new_tokens=8, temperature=0.0, top_p=1.0)
        assert replies == [(f"re: riddle {i}", True) for i in range(9)]
        assert backend.served[a] >= 3 and backend.served[b] >= 3 and backend.served[dead] == 0
        assert sum(backend.served.values()) == 9
        assert f"request failed: {dead}" in capsys.readouterr().err
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


class Slow(Stub):
    """Chat completions after the delay a prompt names ("wait 0.3"), counting the requests in flight."""

    lock, now, most = threading.Lock(), 0, 0

    def do_POST(self):
        seconds = float(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
                        .split()[-1])
        with Slow.lock:
            Slow.now += 1
            Slow.most = max(Slow.most, Slow.now)
        time.sleep(seconds)
        with Slow.lock:
            Slow.now -= 1
        self.reply(f"waited {seconds}")


def test_requests_stream_batch_size_at_a_time():
    """batch_size requests are out at a time, and each reply is handed on as it comes (a slow one does not hold
    the others back), once the first batch_size are in; if those all failed, nothing is handed on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = common.OpenAIBackend("m", f"http://127.0.0.1:{server.server_port}/v1", retries=1)
        waits = [0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
        prompts = [[{"role": "user", "content": f"wait {w}"}] for w in waits]
        heard = []
        texts = backend.generate(prompts, list(range(7)), max_new_tokens=8, temperature=0.0, top_p=1.0,
                                 batch_size=2, on_reply=lambda k, t: heard.append((k, t)))
        assert texts == [(f"waited {w}", True) for w in waits]
        assert Slow.most == 2 and sorted(heard) == list(enumerate(texts))
        assert heard[-1][0] == 0  # the slow first request came last, after the six behind it
    finally:
        server.shutdown()
        server.server_close()
    dead = common.OpenAIBackend("m", f"http://127.0.0.1:{free_port()}/v1", retries=1)
    heard = []
    with pytest.raises(common.InputError, match="2 requests in a row failed"):
        dead.generate(prompts, list(range(7)), max_new_tokens=8, temperature=0.0, top_p=1.0, batch_size=2,
                      on_reply=lambda k, t: heard.append(k))
    assert heard == []


class Timed(common.OpenAIBackend):
    """Replies scripted in the prompt: "ok 0.1" after 0.1 s, "fail 0.3" None after 0.3 s (as after the retries).
    Keeps the indices of the requests sent."""

    sent = []

    def _one(self, first, messages, seed, *sampling):
        Timed.sent.append(first)
        verdict, seconds = messages[-1]["content"].split()
        time.sleep(float(seconds))
        return verdict if verdict == "ok" else None


def test_servers_that_die_midway_stop_the_stage():
    """batch_size failures in a row mean no server is up: the replies before them were handed on, the rest is
    left to a rerun. Two at a time, the replies come in order 0, 1, 2 (failed), 3 (failed): there it stops,
    and the requests not yet sent never are (nor after a crash in the writer)."""
    prompts = [[{"role": "user", "content": c}] for c in
               ("ok 0", "ok 0.1", "fail 0.2", "fail 0.3", "ok 0.4", "ok 0.4", "ok 0", "ok 0")]
    heard, sampling = [], dict(max_new_tokens=8, temperature=0.0, top_p=1.0, batch_size=2)
    backend = Timed("m", "http://127.0.0.1:9/v1")
    with pytest.raises(common.InputError, match="2 requests in a row failed"):
        backend.generate(prompts, list(range(8)), on_reply=lambda *a: heard.append(a), **sampling)
    assert heard == [(0, "ok"), (1, "ok"), (2, None)]
    assert 6 not in Timed.sent and 7 not in Timed.sent  # 4 and 5 were out: waited for
    Timed.sent.clear()

    def crash(k, text):
        raise Died

    with pytest.raises(Died):
        backend.generate([[{"role": "user", "content": "ok 0.3"}]] * 8, list(range(8)), on_reply=crash, **sampling)
    assert sorted(Timed.sent) == [0, 1, 2, 3]  # 0 and 1 came, 2 and 3 were out


class Died(Exception):
    pass
