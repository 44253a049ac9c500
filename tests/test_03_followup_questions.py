"""Stage 03 (03_followup_questions.py): reworded riddles rejected before the generator is asked (a
bag-of-words stand-in for the embedder), and a SIGKILL in the middle of either output.
"""

import json
import signal

import pytest

from helpers import ScriptedGenerator, bag_of_words, lines, run_killed, run_stage
from pipeline import dedup
from pipeline.riddles import riddle_id


DEDUP_SEEDS = [
    {"instruction": "What has plenty of keys but cannot open a single lock?", "answer": "A piano",
     "output": "A piano's keys are pressed to make music, not turned in locks."},
    {"instruction": "What can you catch but not throw?", "answer": "A cold",
     "output": "You catch a cold, but you cannot throw one."},
    {"instruction": "What has hands but cannot clap?"},  # no answer: not compared
]


ANSWERED = [  # stage 02's records: (id, riddle, answer)
    ("n1", "What has plenty of keys but can never open one lock?",
     "The answer is a piano. Its keys are pressed to make music, not turned in locks."),  # rewords a seed
    ("n2", "What has a bark but no bite?", "The answer is a tree. A tree has bark and it cannot bite."),
    ("n3", "What has a bite but no bark?", "The answer is a tree. A tree has bark and it cannot bite."),  # swapped
    ("n4", "What has a bark, but no bite at all?", "A tree! A tree has bark and it cannot bite."),  # rewords n2
    ("n5", "What runs all day but never gets tired?", "The answer is a clock. Its hands run all day."),
    ("n6", "What has one eye but cannot see a thing?", "The answer is a needle. The eye of a needle holds thread."),
    ("n7", "What can you catch but never throw?",
     "The answer is a cold. You catch a cold, but you cannot throw it."),  # rewords a seed
    ("n8", "What goes up and never comes down?", "The answer is your age. It only goes up."),
]


def write_answered(d):
    """Stage 02's output and a seed file for stage 03's dedup; returns 03's file arguments."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in DEDUP_SEEDS))
    (d / "02.jsonl").write_text("".join(json.dumps({"id": i, "messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for i, q, a in ANSWERED))
    return [f"--seed-file={d / 'seeds.jsonl'}", f"--in-file={d / '02.jsonl'}", f"--out-file={d / '03.jsonl'}",
            f"--rejected-file={d / 'rej.jsonl'}", f"--closest-file={d / 'closest.jsonl'}"]


def test_03_rejects_reworded_riddles_before_asking(tmp_path, monkeypatch, capsys, scripted_backend):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    monkeypatch.setattr(dedup, "load_embedder", lambda *a, **k: None)
    backend = scripted_backend(ScriptedGenerator())
    asked = []
    monkeypatch.setattr(backend, "generate", lambda prompts, *a, **k: asked.extend(prompts) or
                        [ScriptedGenerator.reply(backend, p, s) for p, s in zip(prompts, a[0])])
    args = write_answered(tmp_path)
    run_stage(monkeypatch, "03_followup_questions.py", *args)
    out = capsys.readouterr().out
    seed_id = {s["instruction"]: riddle_id(s["instruction"]) for s in DEDUP_SEEDS}
    rejected = lines(tmp_path / "rej.jsonl")
    reworded = [(r["id"], r["reason"], r["duplicate_of"]["id"]) for r in rejected if r["reason"].startswith("reworded")]
    assert reworded == [("n1", "reworded_seed", seed_id[DEDUP_SEEDS[0]["instruction"]]),
                        ("n4", "reworded_duplicate", "n2"),
                        ("n7", "reworded_seed", seed_id[DEDUP_SEEDS[1]["instruction"]])]
    assert rejected[1]["text"] == ANSWERED[3][1] and rejected[1]["duplicate_of"]["text"] == ANSWERED[1][1]
    assert rejected[1]["answers"] == ["A tree", "a tree"] and set(rejected[1]["scores"]) == {"question", "trick", "answer"}
    assert len(asked) == 5  # the generator never sees a reworded riddle
    done = {r["id"] for r in lines(tmp_path / "03.jsonl")} | {r["id"] for r in rejected}
    assert done == {i for i, _, _ in ANSWERED} and len(done) == len(lines(tmp_path / "03.jsonl")) + len(rejected)
    assert "dedup: 3 of 8 riddles reworded (2 a seed, 1 an earlier riddle; 2 seeds with answers compared)" in out
    assert "03: kept " in out and "reworded_duplicate 1, reworded_seed 2" in out
    closest = lines(tmp_path / "closest.jsonl")
    assert [(c["id"], c["closest"]["id"], c["kept_because"]) for c in closest] == [
        ("n2", seed_id[DEDUP_SEEDS[0]["instruction"]], "trick cosine below 0.55"), ("n3", "n2", "swapped words: bark, bit"),
        ("n5", "n2", "trick cosine below 0.55"), ("n6", "n2", "answers differ"), ("n8", "n2", "trick cosine below 0.55")]
    # Done: a rerun loads no embedder and writes nothing.
    before = {n: (tmp_path / n).read_bytes() for n in ("03.jsonl", "rej.jsonl", "closest.jsonl")}
    monkeypatch.setattr(dedup, "load_embedder", None)
    run_stage(monkeypatch, "03_followup_questions.py", *args)
    assert "rejected 0 (none), skipped 8 as existing" in capsys.readouterr().out
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("kill_at", [1, 4], ids=["in-dedup-rejects", "in-follow-ups"])
def test_resume_03_after_sigkill(tmp_path, chatty_llama, monkeypatch, capsys, kill_at):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    monkeypatch.setattr(dedup, "load_embedder", lambda *a, **k: None)
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    sampling = [f"--generator={chatty_llama}", "--batch-size=1", "--max-new-tokens=8"]
    run_stage(monkeypatch, "03_followup_questions.py", *write_answered(ref), *sampling)
    r = run_killed("03_followup_questions.py", *write_answered(crash), *sampling, KILL_AT=str(kill_at))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    capsys.readouterr()
    run_stage(monkeypatch, "03_followup_questions.py", *write_answered(crash), *sampling)
    assert "repaired" in capsys.readouterr().out
    for name in ("03.jsonl", "rej.jsonl", "closest.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name
    assert len(lines(ref / "03.jsonl")) + len(lines(ref / "rej.jsonl")) == len(ANSWERED)
