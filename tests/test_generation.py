"""common.py's generation: the hf backend (batched equals per prompt), generate_all (streaming, batches
in order, gathers under two processes), chat_replies (cut at <|im_end|>), prompts checked for control tokens,
and the openai backend against loopback servers: a `transformers serve` of the tiny model (the same replies
and records as the hf backend) and stub servers (retries, several servers, a dead one, streaming).
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import common
from common import IM_END, chat_replies, render_chatml
from helpers import ControlTokenGenerator, INJECTION, chatml_tokenizer, free_port, lines, run_stage, train_tokenizer
from pipeline.knobs import InputError


def test_batched_equals_per_prompt(chatty_llama):
    backend = common.HFBackend(chatty_llama, device="cpu")
    prompts = [[{"role": "user", "content": c}] for c in
               ["What has keys?", "I weigh 1.5 kg and I speak without a mouth. What am I? Tell me now, please.",
                "Footsteps!", "Can you tell me a riddle about time, water, fire and the wind and the moon?"]]
    seeds = [11, 22, 33, 44]
    for temperature in (0.0, 1.0):
        sampling = dict(max_new_tokens=12, temperature=temperature, top_p=0.9)
        batched = backend.generate(prompts, seeds, **sampling)
        single = [backend.generate([p], [s], **sampling)[0] for p, s in zip(prompts, seeds)]
        assert batched == single
        assert all(r.text for r in batched) and len({r.text for r in batched}) > 1  # real, different texts
    # Sampling depends on the row's seed, not on its neighbours or position in the batch.
    swapped = backend.generate(prompts[::-1], seeds[::-1], **sampling)
    assert swapped[::-1] == backend.generate(prompts, seeds, **sampling)
    assert backend.generate(prompts[:1], [12], **sampling) != backend.generate(prompts[:1], [11], **sampling)


class Streaming:
    """A backend that streams (as HFBackend on a GPU): one call, each reply handed on as it ends, here in the
    order `ends` (pairs swapped); dies (Died) after `die_after` replies."""

    def __init__(self, streams=True, die_after=None):
        self.streams, self.die_after, self.heard = streams, die_after, 0

    def prompt_length(self, messages):
        return -int(messages[-1]["content"][1:])  # longest first: j0, j1, ... (batches in id order)

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p, on_reply=None, batch_size=None):
        texts = [f"re: {p[-1]['content']} ({s % 100})" for p, s in zip(prompts, seeds)]
        if on_reply is None:
            return texts
        ends = [k ^ 1 if k ^ 1 < len(prompts) else k for k in range(len(prompts))]
        for k in ends:
            if self.heard == self.die_after:
                raise Died
            self.heard += 1
            on_reply(k, texts[k])


class Died(Exception):
    pass


def test_generate_all_streams_batches_in_order(tmp_path):
    """A streaming backend gets all jobs in one call; each batch is handed on, in order, once its replies are in
    (while later ones still generate), the same batches as a batch-a-call backend; a crash loses only the
    batches not yet whole, and a rerun generates what is missing."""
    jobs = [{"id": f"j{i}", "prompt": [{"role": "user", "content": f"j{i}"}]} for i in range(7)]
    sampling = dict(batch_size=3, seed=0, max_new_tokens=8, temperature=0.7, top_p=0.9, desc="test")

    def run(backend, done=()):
        got = []
        n = common.generate_all(backend, jobs, set(done), lambda batch, texts: got.append(
            ([j["id"] for j in batch], texts, backend.heard)), **sampling)
        return got, n

    want, n = run(Streaming(streams=False))
    assert n == 7 and [ids for ids, _, _ in want] == [["j0", "j1", "j2"], ["j3", "j4", "j5"], ["j6"]]
    got, n = run(Streaming())
    assert [(ids, texts) for ids, texts, _ in got] == [(ids, texts) for ids, texts, _ in want] and n == 7
    assert [heard for _, _, heard in got] == [4, 6, 7]  # replies in the order 1 0 3 2 5 4 6: j2 is 4th
    crashed = []
    with pytest.raises(Died):
        common.generate_all(Streaming(die_after=5), jobs, set(), lambda batch, texts: crashed.append(
            [j["id"] for j in batch]), **sampling)
    assert crashed == [["j0", "j1", "j2"]]
    rest, n = run(Streaming(), done=crashed[0])
    assert n == 4 and [ids for ids, _, _ in rest] == [["j3", "j4", "j5"], ["j6"]]


def test_generate_all_gathers_a_batch_once_the_next_is_in(monkeypatch):
    """Under 2 processes (the first one's view; the gather faked) a batch is gathered once this process's share of
    the next batch is in too, so a gather seldom waits for the slower process; the last one at once. The writer
    gets the batches whole, as one process would."""
    jobs = [{"id": f"j{i}", "prompt": [{"role": "user", "content": f"j{i}"}]} for i in range(7)]
    sampling = dict(batch_size=3, seed=0, max_new_tokens=8, temperature=0.7, top_p=0.9, desc="test")
    want = []
    common.generate_all(Streaming(streams=False), jobs, set(), lambda b, t: want.append(t), **sampling)
    backend, gathered, got = Streaming(), [], []
    others = [want[0][1:2], want[1][1:2], []]  # the other process's shares: j1, j4, none

    def gather(parts, mine):
        parts[:] = [mine, others[len(gathered)]]
        gathered.append(backend.heard)

    monkeypatch.setattr(common, "process_share", lambda: (0, 2))
    monkeypatch.setattr(common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.dist, "all_gather_object", gather)
    common.generate_all(backend, jobs, set(), lambda b, t: got.append(t), **sampling)
    assert got == want
    assert gathered == [4, 5, 5]  # this share's replies end j2 j0 (batch 1 in), j5 j3 (batch 2 in), j6


def test_generation_prompts_are_checked_before_any_generation():
    backend = ControlTokenGenerator()
    for content, found in [(INJECTION, "<|im_end|>"), ("What is a <filename>?", "<filename>")]:
        jobs = [{"id": "r0", "prompt": [{"role": "user", "content": "Fine."}]},
                {"id": "r9", "prompt": [{"role": "user", "content": content}]}]
        with pytest.raises(InputError, match=f"02 answers: the prompt of r9 holds {re.escape(repr(found))}"):
            common.generate_all(backend, jobs, set(), lambda *a: None, batch_size=1, seed=0, max_new_tokens=8,
                                temperature=0.0, top_p=1.0, desc="02 answers")
    assert backend.calls == 0


def test_chat_refuses_control_tokens():
    tok = chatml_tokenizer("<filename>")
    for text in (INJECTION, "Open <filename> please"):
        with pytest.raises(InputError, match="a control token; text must stay text"):
            common.chat_replies(None, tok, [[{"role": "user", "content": text}]], [0], max_new_tokens=4,
                                temperature=0.0, top_p=1.0)


class StubModel:
    """Returns fixed continuations, as generate would (padded after the turn ends)."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, texts):
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.input_ids, self.kwargs = input_ids, kwargs
        new = [(r + [self.tokenizer.pad_token_id] * max_new_tokens)[:max_new_tokens] for r in self.rows]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_chat_replies_cut_at_im_end_and_flag_replies_that_never_end(tokenizer):
    model = StubModel(tokenizer, ["A piano.<|im_end|>\n<|im_start|>user", "keys keys keys keys keys keys"])
    prompts = [[{"role": "user", "content": "What has keys?"}], [{"role": "user", "content": "Why?"}]]
    out = chat_replies(model, tokenizer, prompts, [1, 2], max_new_tokens=12, temperature=0.0, top_p=1.0)
    assert out == [("A piano.", True), (tokenizer.decode(model.rows[1][:12]).strip(), False)]
    rendered = tokenizer.batch_decode(model.input_ids, skip_special_tokens=False)
    assert rendered[0].endswith(render_chatml(prompts[0], add_generation_prompt=True)[0])
    assert rendered[1].startswith("<|endoftext|>")  # left padded
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.kwargs["eos_token_id"]
    assert "stop_strings" not in model.kwargs and model.kwargs["logits_processor"] == []


def test_chat_replies_stop_on_im_end_text_when_the_tokenizer_lacks_it(tmp_path):
    """A base model without ChatML tokens (Phi-2) spells <|im_end|> in pieces: stop on the string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(["<|endoftext|>"], ["A piano has keys. <|im_end|>"] * 5, 300, eos_token="<|endoftext|>")
    assert IM_END not in tok.get_vocab()
    prompt = [{"role": "user", "content": "Keys?"}]
    sampling = dict(temperature=0.7, top_p=0.9)
    stub = StubModel(tok, ["A piano.<|im_end|>"])
    assert chat_replies(stub, tok, [prompt], [1], max_new_tokens=20, **sampling) == [("A piano.", True)]
    assert stub.kwargs["stop_strings"] == [IM_END] and stub.kwargs["tokenizer"] is tok

    class Scripted(LlamaForCausalLM):
        """A real model under the real generate whose next token always continues `script`."""

        def forward(self, **kwargs):  # one call per generated token, the first with the prompt
            out = super().forward(**kwargs)
            out.logits[:, -1] = -1e4
            out.logits[:, -1, self.script[min(self.steps, len(self.script) - 1)]] = 0.0
            self.steps += 1
            return out

    model = Scripted(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).eval()
    model.script = tok("A piano.<|im_end|> has keys. A piano has keys.")["input_ids"]
    model.steps = 0
    assert chat_replies(model, tok, [prompt], [1], max_new_tokens=30, **sampling) == [("A piano.", True)]
    assert model.steps < 30  # stopped at the string, not at the length
    model.steps = 0
    (text, ended), = chat_replies(model, tok, [prompt], [1], max_new_tokens=3, **sampling)
    assert not ended and text == tok.decode(model.script[:3]).strip()


@pytest.fixture(scope="module")
def served(chatty_llama, tmp_path_factory):
    """A `transformers serve` of the tiny model (a process: ~15 s to start); yields its base URL. Several servers
    (and a dead one) sharing requests: the stub tests below."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    ports, servers, logs = [free_port()], [], []
    try:
        for port in ports:
            logs.append(tmp_path_factory.mktemp("serve") / "serve.log")
            with open(logs[-1], "w") as out:
                servers.append(subprocess.Popen(
                    [sys.executable, "-m", "transformers.cli.transformers", "serve", chatty_llama, "--host",
                     "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env))
        deadline = time.time() + 900  # a start, not a hang, on a loaded machine can take minutes
        for port, server, log in zip(ports, servers, logs):
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
                    time.sleep(0.5)
        yield f"http://127.0.0.1:{ports[0]}/v1"
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
    remote = common.load_backend("openai", chatty_llama, served).generate(PROMPTS, [1, 2, 3], **greedy)
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
    # Through the server named twice (as two replicas would be): the requests are shared, the records the same.
    run_stage(monkeypatch, "02_answer_riddles.py", *args(tmp_path / "api", "--backend=openai",
                                                         f"--base-url={served},{served}"))
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
    Stub.seen.clear()  # what other tests sent: the seeds and tries below are this test's
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
        assert 0.3 <= time.time() - start < 120  # one backoff (the client's first: 0.5 s less up to 25% jitter)
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
        waits = [2.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # 2 s: the six behind it take 0.6 s, a busy machine more
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
    """Replies scripted in the prompt: "ok 0.1" after 0.1 s, "fail 0.3" None after 0.3 s (as after the retries),
    each time x SLOW, so that a busy machine's late thread wake-ups (tens of ms) keep the order. Keeps the
    indices of the requests sent."""

    sent, SLOW = [], 3

    def _one(self, first, messages, seed, *sampling):
        Timed.sent.append(first)
        verdict, seconds = messages[-1]["content"].split()
        time.sleep(float(seconds) * Timed.SLOW)
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
