"""Stage 04b, the quality gate: reading judgements, the threshold, rejects with reasons, resume, both backends.

The stage runs in this process (runpy) on a scripted backend whose judgements are fixed by the riddle,
on the tiny random llama (mechanics only: its replies are noise, so unparsed), and through the openai
backend against a loopback stub server. One run is a real SIGKILL of a subprocess in the middle of a write.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import common
from helpers import ROOT, lines, run_stage
from pipeline.judge import parse_judgement
from pipeline.knobs import KNOB_RANGES, InputError, _knob_comments, configure
from pipeline.records import read_conversations

SCRIPT = "04b_judge_conversations.py"
S = {"answer": 4, "follow_up": 5, "second_answer": 3}


# -----------------------------------------------------------------------------
# Reading a judgement

@pytest.mark.parametrize("reply, parsed", [
    ("answer: 4\nfollow-up: 5\nsecond answer: 3\nreason: Right, but the second answer drifts.",
     (S, "Right, but the second answer drifts.")),
    ("**Answer:** 4/5\n**Follow-up question:** 5\n**Second answer:** 3\n**Reason:** fine.", (S, "fine.")),
    ("Sure! Here is my judgement:\n\n1. Answer (right and simple): 4\n2. Follow up: 5 out of 5\n3. Answer 2: 3\n\n"
     "Reason:\nThe riddle is solved.\nThe follow-up is a child's.",
     (S, "The riddle is solved. The follow-up is a child's.")),
    ('{"answer": 4, "follow-up": 5, "second answer": 3, "reason": "all on topic"}', (S, "all on topic")),
    ("ANSWER: 4, FOLLOW-UP: 5, SECOND ANSWER: 3. REASON: ok", (S, "ok")),
    ("### Answer: 4\n- Follow-up answer: 3\n- Child's question: 5", (S, "")),  # no reason: ""
    ("Reason: the follow-up is fine.\nanswer: 4\nfollow_up: 5\nsecond_answer: 3", (S, "the follow-up is fine.")),
    ("answer: `4`\nfollow-up score: [5]\nsecond answer = 3.0\nreason: x\nanswer: 1", (S, "x")),  # the first counts
    ("Answer: 2\nFollow-up: 1\nSecond answer: 5\nReason: wrong answer.",
     ({"answer": 2, "follow_up": 1, "second_answer": 5}, "wrong answer.")),
])
def test_parse_judgement(reply, parsed):
    assert parse_judgement(reply) == parsed


@pytest.mark.parametrize("reply", [
    "", "The answer to the riddle is a piano.",
    "answer: N\nfollow-up: N\nsecond answer: N\nreason: one short sentence",  # the format echoed
    "answer: 4\nfollow-up: 5\nreason: the second answer is missing",
    "answer: 6\nfollow-up: 5\nsecond answer: 3", "answer: 0\nfollow-up: 5\nsecond answer: 3",
    "answer: 10\nfollow-up: 5\nsecond answer: 3", "answer: 4.5\nfollow-up: 5\nsecond answer: 3",
    "Assistant's answer: 4 legs\nfollow-up: 5\nsecond answer: 3",  # an echoed transcript line is no score
])
def test_unparsable_judgements(reply):
    assert parse_judgement(reply) is None


# -----------------------------------------------------------------------------
# The stage on a scripted backend

JUDGEMENTS = {  # by riddle; None: the request failed
    "keys": "**Answer:** 5\n**Follow-up:** 4\n**Second answer:** 5\n**Reason:** Clear and on topic.",
    "towel": "answer: 3\nfollow-up: 3\nsecond answer: 3\nreason: Just good enough.",
    "echo": "answer: 2\nfollow-up: 5\nsecond answer: 5\nreason: The answer is wrong.",
    "candle": "I think this conversation is lovely!",
    "map": None,
    "footsteps": "answer: 5\nfollow-up: 5\nsecond answer: 4\nreason: Good.",
}


def conversation(i, word, **extra):
    turns = [f"Riddle about {word}?", f"It is {word}.", f"Why {word}?", f"Because of {word}."]
    return {"id": f"c{i}", "messages": [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 2, turns)],
            **extra}


class Scripted:
    """Judgements fixed by the riddle's word; `fail` names words whose request fails (None)."""

    def __init__(self, fail=("map",)):
        self.fail, self.calls = set(fail), []

    def prompt_length(self, messages):
        return sum(len(m["content"]) for m in messages)

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p):
        self.calls.append({"prompts": prompts, "temperature": temperature, "max_new_tokens": max_new_tokens})
        words = [re.search(r"Riddle: Riddle about (\w+)\?", p[-1]["content"]).group(1) for p in prompts]
        return [None if w in self.fail else JUDGEMENTS[w] or "" for w in words]


def write_input(d):
    records = [conversation(i, w, source="demo") if w == "keys" else conversation(i, w)
               for i, w in enumerate(JUDGEMENTS)]
    (d / "04.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def args(d, *more):
    return [f"--in-file={d / '04.jsonl'}", f"--out-file={d / '04b.jsonl'}", f"--rejected-file={d / 'rej.jsonl'}",
            "--batch-size=2", *more]


def test_stage_threshold_rejects_and_retry(tmp_path, monkeypatch, capsys):
    records = write_input(tmp_path)
    backend = Scripted()
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: backend)
    with pytest.raises(SystemExit, match="1 requests failed; rerun to retry them"):
        run_stage(monkeypatch, SCRIPT, *args(tmp_path))
    out = capsys.readouterr().out
    assert ("04b: kept 3 conversations, rejected 2 (low_score 1, unparsed 1), mean score 3.25 of 4 judged, "
            "skipped 0 as existing, failed 1; 3 in 04b.jsonl;") in out
    # The prompt holds the four turns in their places; greedy by default.
    prompt = next(p for c in backend.calls for p in c["prompts"] if "about keys" in p[0]["content"])[0]["content"]
    assert "Riddle: Riddle about keys?\n\nAssistant: It is keys.\n\nChild: Why keys?\n\nAssistant: Because of keys." \
        in prompt and prompt.endswith("reason: one short sentence")
    assert {(c["temperature"], c["max_new_tokens"]) for c in backend.calls} == {(0.0, 96)}
    kept = {r["id"]: r for r in lines(tmp_path / "04b.jsonl")}
    assert kept["c0"] == dict(records[0], judge={"scores": {"answer": 5, "follow_up": 4, "second_answer": 5},
                                                 "score": 4, "reason": "Clear and on topic."})  # extra fields kept
    assert kept["c1"]["judge"]["score"] == 3  # at the threshold: kept
    assert sorted(kept) == ["c0", "c1", "c5"]
    assert sorted(lines(tmp_path / "rej.jsonl"), key=lambda r: r["id"]) == [
        {"id": "c2", "reason": "low_score", "score": 2, "scores": {"answer": 2, "follow_up": 5, "second_answer": 5},
         "judge_reason": "The answer is wrong.", "text": JUDGEMENTS["echo"]},
        {"id": "c3", "reason": "unparsed", "text": JUDGEMENTS["candle"]}]
    # 05 reads the kept file as it is (the judgement rides along).
    assert [r["id"] for r in read_conversations(tmp_path / "04b.jsonl")] == [r["id"] for r in kept.values()]

    # A rerun asks again only for the failed one's batch (batches stay as cut, so a resume equals a whole run)
    # and writes only the failed one; unparsed and low ones are done. Then nothing is left to do.
    backend.fail, backend.calls = set(), []
    run_stage(monkeypatch, SCRIPT, *args(tmp_path))
    assert len(backend.calls) == 1 and any("about map" in p[0]["content"] for p in backend.calls[0]["prompts"])
    assert "kept 0 conversations, rejected 1 (unparsed 1), mean score - of 0 judged, skipped 5 as existing, failed 0" \
        in capsys.readouterr().out  # map's judgement is empty: unparsed
    assert lines(tmp_path / "rej.jsonl")[-1] == {"id": "c4", "reason": "unparsed", "text": ""}
    assert (tmp_path / "report.md").exists()  # the data card, rewritten once all is judged (pipeline/datacard.py)
    before = {n: (tmp_path / n).read_bytes() for n in ("04b.jsonl", "rej.jsonl")}
    backend.calls = []
    run_stage(monkeypatch, SCRIPT, *args(tmp_path))
    assert backend.calls == [] and "skipped 6 as existing" in capsys.readouterr().out
    assert {n: (tmp_path / n).read_bytes() for n in before} == before

    # A stricter threshold, from scratch: only the all-4-or-better conversations stay.
    run_stage(monkeypatch, SCRIPT, *args(tmp_path, "--min-score=4", "--overwrite"))
    assert sorted(r["id"] for r in lines(tmp_path / "04b.jsonl")) == ["c0", "c5"]
    assert sorted((r["id"], r["reason"]) for r in lines(tmp_path / "rej.jsonl")) == [
        ("c1", "low_score"), ("c2", "low_score"), ("c3", "unparsed"), ("c4", "unparsed")]


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        d.mkdir()
        write_input(d)
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Scripted(fail=()))
    run_stage(monkeypatch, SCRIPT, *args(ref))

    class Crash(Exception):
        pass

    class Dying(Scripted):
        def generate(self, prompts, *a, **k):
            if len(self.calls) == 2:
                raise Crash  # in the middle of the third batch: two batches are on disk
            return super().generate(prompts, *a, **k)

    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Dying(fail=()))
    with pytest.raises(Crash):
        run_stage(monkeypatch, SCRIPT, *args(crash))
    written = len(lines(crash / "04b.jsonl")) + len(lines(crash / "rej.jsonl"))
    assert written == 4
    with open(crash / "04b.jsonl", "a") as f:
        f.write('{"id": "c9", "messages": [{"ro')  # a write torn by the kill
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Scripted(fail=()))
    capsys.readouterr()
    run_stage(monkeypatch, SCRIPT, *args(crash))
    out = capsys.readouterr().out
    assert "repaired 04b.jsonl: dropped a torn last line" in out and "skipped 4 as existing" in out
    for name in ("04b.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


KILLER = """
import json, os, runpy, signal, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import common, test_judge
from pipeline import records
common.load_backend = lambda *a, **k: test_judge.Scripted(fail=())
write, calls = records.Appender.write, [0]
def write_then_die(self, records):
    calls[0] += 1
    if calls[0] >= 3 and records:  # from the 2nd batch on: half a line reaches the disk, then SIGKILL
        text = "".join(json.dumps(r) + "\\n" for r in records)
        self._f.write(text[:len(text) // 2]); self._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, records)
records.Appender.write = write_then_die
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_resume_after_sigkill(tmp_path, monkeypatch):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        d.mkdir()
        write_input(d)
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Scripted(fail=()))
    run_stage(monkeypatch, SCRIPT, *args(ref))
    r = subprocess.run([sys.executable, "-c", KILLER, str(ROOT), str(ROOT / "tests"), str(ROOT / SCRIPT), *args(crash)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert any(not (crash / n).read_text().endswith("\n") for n in ("04b.jsonl", "rej.jsonl"))  # really torn
    run_stage(monkeypatch, SCRIPT, *args(crash))
    for name in ("04b.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


# -----------------------------------------------------------------------------
# Knobs and bad input

def test_knobs_have_ranges_and_are_checked(tmp_path, monkeypatch):
    knobs = {"__file__": str(ROOT / SCRIPT)}
    for name, (source, _) in _knob_comments(ROOT / SCRIPT).items():
        knobs[name] = eval(source)  # noqa: S307 (our own literals)
    numeric = [k for k, v in knobs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert "MIN_SCORE" in numeric and [k for k in numeric if k not in KNOB_RANGES] == []
    configure(dict(knobs), [])  # the defaults lie in their ranges
    with pytest.raises(InputError, match=re.escape("--min-score must be in [1, 5], got 6")):
        configure(dict(knobs), ["--min-score=6"])
    with pytest.raises(InputError, match=r"--prompt must use \{riddle\}, \{answer\}, \{followup\}, \{second_answer\}"):
        run_stage(monkeypatch, SCRIPT, "--prompt=Judge {riddle} and {answer}.", *args(tmp_path))
    assert not list(tmp_path.iterdir())


ONE_TURN = dict(conversation(1, "map"), messages=conversation(1, "map")["messages"][:2])


@pytest.mark.parametrize("content, message", [
    (None, "04.jsonl is missing: run 04_followup_answers.py first"),
    (json.dumps(conversation(0, "keys")) + "\n" + json.dumps(ONE_TURN) + "\n",
     "04.jsonl:2: expected a two-turn conversation (user, assistant, user, assistant), got 2 messages"),
    (json.dumps(conversation(0, "keys")) * 2, "04.jsonl:1: invalid JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, content, message):
    if content is not None:
        (tmp_path / "04.jsonl").write_text(content)
    with pytest.raises(InputError, match=re.escape(message)):
        run_stage(monkeypatch, SCRIPT, *args(tmp_path))
    assert not (tmp_path / "04b.jsonl").exists() and not (tmp_path / "rej.jsonl").exists()


# -----------------------------------------------------------------------------
# Real backends: a tiny random model (mechanics), an OpenAI-compatible stub server

def test_tiny_model_every_record_once(tmp_path, chatty_llama, monkeypatch, capsys):
    """The tiny llama with weights that write text (tiny_llama's write ""): noise, so unparsed as a rule."""
    write_input(tmp_path)
    run_stage(monkeypatch, SCRIPT, *args(tmp_path, f"--generator={chatty_llama}", "--max-new-tokens=8"))
    kept, rejected = lines(tmp_path / "04b.jsonl"), lines(tmp_path / "rej.jsonl")
    assert sorted(r["id"] for r in kept + rejected) == [f"c{i}" for i in range(6)]
    assert {r["reason"] for r in rejected} <= {"unparsed", "low_score"}
    assert any(r["text"] for r in rejected if r["reason"] == "unparsed")  # the judge's raw reply is kept
    capsys.readouterr()
    run_stage(monkeypatch, SCRIPT, *args(tmp_path, f"--generator={chatty_llama}", "--max-new-tokens=8"))
    assert "skipped 6 as existing" in capsys.readouterr().out


class Judge(BaseHTTPRequestHandler):
    """A chat completions server that judges every conversation the same: follow-up 2, so low_score at 3."""

    seen = []

    def do_POST(self):
        Judge.seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        text = "**Answer:** 5\n**Follow-up:** 2\n**Second answer:** 4\n**Reason:** The follow-up is not a question."
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_openai_backend(tmp_path, monkeypatch, capsys):
    write_input(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        run_stage(monkeypatch, SCRIPT, *args(tmp_path, "--backend=openai", f"--base-url={url}", "--generator=judge-m"))
        assert "rejected 6 (low_score 6), mean score 2.00 of 6 judged" in capsys.readouterr().out
        assert (tmp_path / "04b.jsonl").read_text() == ""  # nothing kept
        rejected = lines(tmp_path / "rej.jsonl")
        assert sorted(r["id"] for r in rejected) == [f"c{i}" for i in range(6)]
        assert {(r["reason"], r["score"], r["judge_reason"]) for r in rejected} == {
            ("low_score", 2, "The follow-up is not a question.")}
        assert {(b["model"], b["temperature"], b["top_p"], b["max_tokens"]) for b in Judge.seen} == {
            ("judge-m", 0.0, 1.0, 96)}
        run_stage(monkeypatch, SCRIPT, *args(tmp_path, "--backend=openai", f"--base-url={url}", "--min-score=2",
                                             "--overwrite"))
        assert [r["judge"]["score"] for r in lines(tmp_path / "04b.jsonl")] == [2] * 6
    finally:
        server.shutdown()
        server.server_close()
