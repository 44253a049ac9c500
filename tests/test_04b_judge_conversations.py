"""Stage 04b (04b_judge_conversations.py), the quality gate: the threshold, rejects with reasons, resume,
bad input, both backends. The stage runs in this process on a scripted judge (helpers.ScriptedJudge), on the
tiny random llama (mechanics only: its replies are noise, so unparsed), and through the openai backend
against a loopback stub server; one run is a real SIGKILL of a subprocess in the middle of a write.
"""

import json
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import JUDGEMENTS, ROOT, ScriptedJudge, lines, run_killed, run_stage
from pipeline.knobs import InputError, KNOB_RANGES, _knob_comments, configure
from pipeline.records import read_conversations


SCRIPT = "04b_judge_conversations.py"


def conversation(i, word, **extra):
    turns = [f"Riddle about {word}?", f"It is {word}.", f"Why {word}?", f"Because of {word}."]
    return {"id": f"c{i}", "messages": [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 2, turns)],
            **extra}


def write_input(d):
    records = [conversation(i, w, source="demo") if w == "keys" else conversation(i, w)
               for i, w in enumerate(JUDGEMENTS)]
    (d / "04.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def args(d, *more):
    return [f"--in-file={d / '04.jsonl'}", f"--out-file={d / '04b.jsonl'}", f"--rejected-file={d / 'rej.jsonl'}",
            "--batch-size=2", *more]


def test_stage_threshold_rejects_and_retry(tmp_path, monkeypatch, capsys, scripted_backend):
    records = write_input(tmp_path)
    backend = scripted_backend(ScriptedJudge(fail=("map",)))
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


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch, capsys, scripted_backend):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        d.mkdir()
        write_input(d)
    scripted_backend(ScriptedJudge())
    run_stage(monkeypatch, SCRIPT, *args(ref))

    class Crash(Exception):
        pass

    class Dying(ScriptedJudge):
        def generate(self, prompts, *a, **k):
            if len(self.calls) == 2:
                raise Crash  # in the middle of the third batch: two batches are on disk
            return super().generate(prompts, *a, **k)

    scripted_backend(Dying())
    with pytest.raises(Crash):
        run_stage(monkeypatch, SCRIPT, *args(crash))
    written = len(lines(crash / "04b.jsonl")) + len(lines(crash / "rej.jsonl"))
    assert written == 4
    with open(crash / "04b.jsonl", "a") as f:
        f.write('{"id": "c9", "messages": [{"ro')  # a write torn by the kill
    scripted_backend(ScriptedJudge())
    capsys.readouterr()
    run_stage(monkeypatch, SCRIPT, *args(crash))
    out = capsys.readouterr().out
    assert "repaired 04b.jsonl: dropped a torn last line" in out and "skipped 4 as existing" in out
    for name in ("04b.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


def test_resume_after_sigkill(tmp_path, monkeypatch, scripted_backend):
    """A real SIGKILL (helpers.KILLER) of a subprocess in the middle of its second batch's write."""
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    for d in (ref, crash):
        d.mkdir()
        write_input(d)
    scripted_backend(ScriptedJudge())
    run_stage(monkeypatch, SCRIPT, *args(ref))
    r = run_killed(SCRIPT, *args(crash), KILL_BACKEND="helpers:ScriptedJudge", KILL_AT="3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert any(not (crash / n).read_text().endswith("\n") for n in ("04b.jsonl", "rej.jsonl"))  # really torn
    run_stage(monkeypatch, SCRIPT, *args(crash))
    for name in ("04b.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


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
