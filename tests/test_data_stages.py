"""Stages 01-04: cleaning, dedup, ids, knobs, seed files, batching, resume, bad input.

Stages run in this process (runpy) with absolute paths in a temp folder, on the tiny
random llama or on a scripted backend whose replies are fixed text (for the chain).
Some run as subprocesses SIGKILLed in the middle of a write, or under torchrun with one of
its two processes SIGKILLed in the middle of the run.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import common
from helpers import ROOT, bag_of_words, lines, run_stage
from pipeline import dedup, records, riddles
from pipeline.knobs import InputError, configure
from pipeline.riddles import clean_followup, clean_riddle, filter_riddles, load_seed_riddles, load_seed_rows, riddle_id

PY = sys.executable


# -----------------------------------------------------------------------------
# Cleaning

@pytest.mark.parametrize("line, text, reason", [
    ("1. I weigh 1.5 kg but have no body. What am I?", "I weigh 1.5 kg but have no body. What am I?", None),
    ("1) What has keys but cannot open locks?", "What has keys but cannot open locks?", None),
    ("(2) What runs all day but never walks?", "What runs all day but never walks?", None),
    ("12. What has a neck but no head?", "What has a neck but no head?", None),
    ("- What can you catch but not throw?", "What can you catch but not throw?", None),
    ("* What has hands but cannot clap?", "What has hands but cannot clap?", None),
    ("\u2022 What has one eye but cannot see?", "What has one eye but cannot see?", None),
    ("Riddle 3: What gets wetter the more it dries?", "What gets wetter the more it dries?", None),
    ("**What goes up but never comes down?**", "What goes up but never comes down?", None),
    ('"What has a head and a tail but no body?"', "What has a head and a tail but no body?", None),
    ("\u201cWhat has teeth but cannot bite?\u201d", "What has teeth but cannot bite?", None),
    ('1. **Riddle 1:** "What has roots that nobody sees?"', "What has roots that nobody sees?", None),
    ("1.5 kilograms of feathers or of bricks: which is heavier?",
     "1.5 kilograms of feathers or of bricks: which is heavier?", None),
    ("10 men dig a hole in ten days. How long for five men?",
     "10 men dig a hole in ten days. How long for five men?", None),
    ("What has one eye but cannot see? (Answer: a needle)", "What has one eye but cannot see?", None),
    ("I can\u2019t   be seen,\tbut I\u2019m always there. What am I?", "I can't be seen, but I'm always there. What am I?",
     None),
    ("   ", "", "empty"),
    ("Here are 10 new riddles:", "Here are 10 new riddles:", "header"),
    ("**Riddle 4:**", "", "header"),
    ("### More riddles", "### More riddles", "header"),
    ("Sure! I hope you enjoy these new riddles.", "Sure! I hope you enjoy these new riddles.", "meta"),
    ("Answer: a towel, because it dries you.", "Answer: a towel, because it dries you.", "answer"),
    ("The answer to the riddle would be 2.", "The answer to the riddle would be 2.", "answer"),
    ("I've been racing against time all day long. What am I?", "I've been racing against time all day long. What am I?",
     None),
    ("I've written five new riddles for you.", "I've written five new riddles for you.", "meta"),
    ("3. What am I?", "What am I?", "too_short"),
    ("What " + "very " * 70 + "long thing am I?", "What " + "very " * 70 + "long thing am I?", "too_long"),
    ("I speak without a mouth and hear without ears. What am", "I speak without a mouth and hear without ears. What am",
     "unfinished"),
])
def test_clean_riddle(line, text, reason):
    assert clean_riddle(line, min_words=5, max_chars=300) == (text, reason)


@pytest.mark.parametrize("reply, question, reason", [
    ("Kid: Why does a towel get wetter?", "Why does a towel get wetter?", None),
    ('User: "How do maps show rivers?"', "How do maps show rivers?", None),
    ("**Child:** Does the echo ever get tired?", "Does the echo ever get tired?", None),
    ('A curious child might ask: "Can a piano have gold keys?"', "Can a piano have gold keys?", None),
    ("A curious 10-year-old would ask something like: Why is the candle short?", "Why is the candle short?", None),
    ("Follow-up question: What is an echo made of?", "What is an echo made of?", None),
    ('One very short question for the assistant: "What is that?"', "What is that?", None),
    ("The child's next message: Can a map get wet?", "Can a map get wet?", None),
    ("Sure! Here's the question:\nWhy do maps never get wet?", "Why do maps never get wet?", None),
    ("Wow! But why does it get wetter?", "Wow! But why does it get wetter?", None),
    ("Why is the sky blue? Because light scatters.", "Why is the sky blue?", None),
    ("Charm: 1\n\n### Question: What's next, a bigger riddle?", "What's next, a bigger riddle?", None),
    ("The answer is a towel, of course.\nDo you want another riddle?", "Do you want another riddle?",
     "answer_not_question"),
    ("It is a map! Do you want another riddle?", "It is a map! Do you want another riddle?", "answer_not_question"),
    ("The answer is a towel because it soaks up water.", "The answer is a towel because it soaks up water.",
     "not_a_question"),
    ("Assistant: The answer is a map. Any more?", "Assistant: The answer is a map. Any more?", "assistant_turn"),
    ("  \n ", "", "empty"),
    ("Kid: Why?", "Why?", "too_short"),
    ("A towel gets wet as it dries you, and that is why it is the answer to this old riddle everyone loves. "
     "Want another?", "A towel gets wet as it dries you, and that is why it is the answer to this old riddle "
     "everyone loves. Want another?", "answer_not_question"),
    ("Why " + "very " * 30 + "long?", "Why " + "very " * 30 + "long?", "too_long"),
])
def test_clean_followup(reply, question, reason):
    assert clean_followup(reply, max_words=25) == (question, reason)


def test_text_modules_import_no_torch():
    """The riddle text rules, the records layer and the stages' writers load without torch (a second each)."""
    code = ("import sys; import pipeline.riddles, pipeline.records, pipeline.message_stage, pipeline.judge; "
            "print(sorted(m for m in ('torch', 'triton', 'transformers', 'pipeline.engine') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_clean_answer():
    assert riddles.clean_answer("  It is a towel.\n") == ("It is a towel.", None)
    # The backend's word comes first: cut after a full stop is cut, ended without one is whole.
    assert riddles.clean_answer("It is a towel.", ended=False) == ("It is a towel.", "unfinished")
    assert riddles.clean_answer("It is a towel", ended=True) == ("It is a towel", None)
    assert riddles.clean_answer("It is a towel", ended=None) == ("It is a towel", "unfinished")
    assert riddles.clean_answer(" \n") == ("", "empty")
    assert riddles.clean_answer("First, think about what dries") == ("First, think about what dries", "unfinished")


# -----------------------------------------------------------------------------
# Dedup and ids

SEEDS = ["What has plenty of keys but cannot open a single lock?",
         "I am tall when I am young and short when I am old. What am I?"]


def test_filter_riddles_exact_near_and_seeds():
    raw = [
        {"id": "p0", "text": "What has plenty of keys but cannot open a single lock?\n"
                             "2. what has plenty of KEYS, but cannot open a single lock!\n"
                             "I am tall when I am young and short when I am old. What could I be?\n\n"
                             "What runs all night but never walks anywhere at all?\n"
                             "Which animal keeps the best time in the whole forest?"},
        {"id": "p1", "text": "What runs all day but never walks anywhere at all?\n"
                             "- What runs all night but never walks anywhere at all?\n"
                             "Here you go:\n"
                             "Which animal keeps the best time in the whole forest?"},
    ]
    kept, rejected = filter_riddles(raw, SEEDS, min_words=5, max_chars=300, threshold=0.5)
    # The first of two near-duplicates stays, though it sorts after the other.
    assert [r["messages"][0]["content"] for r in kept] == [
        "What runs all night but never walks anywhere at all?", "Which animal keeps the best time in the whole forest?"]
    assert kept[0] == {"id": riddle_id("What runs all night but never walks anywhere at all?"),
                       "messages": [{"role": "user", "content": "What runs all night but never walks anywhere at all?"}]}
    assert [(r["prompt_id"], r["reason"]) for r in rejected] == [
        ("p0", "seed_copy"), ("p0", "seed_copy"), ("p0", "near_seed"),
        ("p1", "near_duplicate"), ("p1", "duplicate"), ("p1", "header"), ("p1", "duplicate")]
    assert rejected[1]["line"] == "2. what has plenty of KEYS, but cannot open a single lock!"
    # The threshold is a knob: the day/night pair (Jaccard 7/11) survives a stricter one.
    kept, _ = filter_riddles(raw, SEEDS, threshold=0.65)  # the near-seed pair is at 10/15
    assert len(kept) == 3


def test_deduper_jaccard():
    d = riddles.Deduper(threshold=0.5)
    d.add("one two three four five", "seed")
    assert d.check("One, two three four FIVE!") == "seed_copy"
    assert d.check("one two three four six") == "near_seed"  # 3 of 5 bigrams shared: 3/5
    assert d.check("one two nine ten eleven") is None  # 1/7
    assert riddles.shingles("a b c") == {"a b", "b c"}
    assert riddles.shingles("word") == {"word"}


def test_riddle_id_is_stable():
    rid = riddle_id("What has keys but cannot open locks?")
    assert rid == "r-9626b517b72a"  # sha1 of the dedup key: never changes between runs or machines
    assert riddle_id("  what has KEYS but cannot open locks ? ") == rid
    assert riddle_id("What has keys but cannot open doors?") != rid


# -----------------------------------------------------------------------------
# Knobs

def test_configure_types_unknown_bool_and_help(tmp_path, capsys):
    script = tmp_path / "stage.py"
    script.write_text('N = 3  # rows\nLR = 0.1  # learning rate\nNAME = "x"  # a name\nFLAG = False  # on/off\n')
    knobs = {"__file__": str(script), "__doc__": "A stage.", "N": 3, "LR": 0.1, "NAME": "x", "FLAG": False,
             "ITEMS": ["a"], "lower": 1}
    configure(knobs, ["--n=5", "--lr", "0.5", "--name=y", "--flag", "--items=a,b"])
    assert (knobs["N"], knobs["LR"], knobs["NAME"], knobs["FLAG"], knobs["ITEMS"]) == (5, 0.5, "y", True, ["a", "b"])
    assert "override: N = 5" in capsys.readouterr().out
    configure(knobs, ["--flag=false"])
    assert knobs["FLAG"] is False
    capsys.readouterr()
    for argv, message in [(["--nope=1"], "unknown knob --nope"), (["--lower=2"], "unknown knob --lower"),
                          (["--n=abc"], "--n wants an int, got 'abc'"), (["--flag=maybe"], "--flag wants true or false"),
                          (["--lr=fast"], "--lr wants a float"), (["n=3"], "unexpected argument 'n=3'"),
                          (["--name"], "--name needs a value")]:
        with pytest.raises(InputError, match=message):
            configure(dict(knobs), argv)
    with pytest.raises(SystemExit) as exit_:
        configure(dict(knobs), ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("A stage.")
    assert any(line.split() == ["--lr", "0.1", "learning", "rate"] for line in out.splitlines())


def test_script_help_and_exit_code_2(tmp_path):
    """Real scripts: --help lists the knobs; bad input is one stderr line and exit code 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([PY, str(ROOT / "02_answer_riddles.py"), "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    assert "--max-new-tokens" in r.stdout and "answers cut off here are rejected" in r.stdout
    bad = tmp_path / "01.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "b", "mess\n')
    out = tmp_path / "02.jsonl"
    out.write_text("keep me\n")
    r = subprocess.run([PY, str(ROOT / "02_answer_riddles.py"), f"--in-file={bad}", f"--out-file={out}",
                        f"--rejected-file={tmp_path / 'rej.jsonl'}", "--overwrite"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: {bad}:2: invalid JSON (")
    assert out.read_text() == "keep me\n" and not (tmp_path / "rej.jsonl").exists()
    r = subprocess.run([PY, str(ROOT / "01_generate_riddles.py"), "--num-prompts=ten"], capture_output=True,
                       text=True, env=env)
    assert (r.returncode, r.stderr.strip()) == (2, "error: --num-prompts wants an int, got 'ten'")
    r = subprocess.run([PY, str(ROOT / "01_generate_riddles.py"), "--seed-file=nobody/no-such-riddles"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot load seed dataset 'nobody/no-such-riddles' from the hub (")
    assert r.stderr.strip().endswith("offline, pass a local .jsonl/.json/.csv/.txt file")


# -----------------------------------------------------------------------------
# Seed files

def test_seed_formats(tmp_path):
    expected = ["What has keys but cannot open locks?", "What gets wetter the more it dries?"]
    (tmp_path / "a.jsonl").write_text('{"instruction": "What has keys but cannot open locks?", "answer": "A piano"}\n\n'
                                      '{"riddle": "What gets wetter  the more it dries?"}\n')
    (tmp_path / "b.json").write_text(json.dumps({"train": [{"question": expected[0]}, {"text": expected[1]}]}))
    (tmp_path / "c.csv").write_text("riddle,answer\n\"What has keys but cannot open locks?\",piano\n"
                                    "What gets wetter the more it dries?,towel\n")
    (tmp_path / "d.txt").write_text("What has keys but cannot open locks?\n\n\u201cWhat gets wetter the more it dries?\u201d\n")
    for name in ("a.jsonl", "b.json", "c.csv"):
        assert load_seed_riddles(tmp_path / name) == expected, name
    assert load_seed_riddles(tmp_path / "d.txt") == [expected[0], '"What gets wetter the more it dries?"']
    # Rows keep their other fields (stage 03 compares seeds by their answers).
    assert load_seed_rows(tmp_path / "a.jsonl")[0] == {"instruction": expected[0], "answer": "A piano", "riddle": expected[0]}
    assert [r.get("answer") for r in load_seed_rows(tmp_path / "c.csv")] == ["piano", "towel"]
    assert load_seed_rows(tmp_path / "d.txt")[0] == {"riddle": expected[0]}
    # The shipped seeds: every record is read, in the riddles_v1 layout, and no two are the same riddle.
    shipped = ROOT / "data" / "seed_riddles.jsonl"
    records = lines(shipped)
    assert all(set(r) == {"instruction", "answer", "output"} and all(r.values()) for r in records)
    texts = load_seed_riddles(shipped)
    assert texts == [r["instruction"] for r in records]
    assert len({riddles.dedup_key(t) for t in texts}) == len(texts) >= 200


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("empty.jsonl", "", "empty.jsonl: no records \\(empty file\\)"),
    ("blank.txt", "\n \n", "blank.txt: no records \\(empty file\\)"),
    ("bad.jsonl", '{"instruction": "What has keys?"}\n\n{"instruction": oops}\n', "bad.jsonl:3: invalid JSON"),
    ("field.jsonl", '{"instruction": "What has keys?"}\n\n{"answer": "A piano"}\n',
     "field.jsonl:3: record has no riddle field \\(instruction, riddle, question, text\\)"),
    ("list.jsonl", '["What has keys?"]\n', "list.jsonl:1: expected a JSON object"),
    ("bad.json", '[\n{"instruction": "What has keys?"},\n{oops}\n]', "bad.json:3: invalid JSON"),
    ("field.json", '[{"instruction": "What?"}, {"answer": "A piano"}]', "field.json: record 2: record has no riddle"),
    ("nocol.csv", "answer,output\npiano,keys\n", "nocol.csv:1: no riddle column"),
    ("row.csv", "riddle,answer\nWhat has keys?,piano\n,towel\n", "row.csv:3: record has no riddle field"),
    ("seeds.parquet", "x", "seeds.parquet: seed file must be .jsonl, .json, .csv or .txt"),
])
def test_seed_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        load_seed_riddles(tmp_path / name)


# -----------------------------------------------------------------------------
# Batched generation on a tiny random model

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


# -----------------------------------------------------------------------------
# The chain 01 -> 04 on a scripted backend

class Scripted:
    """Fixed replies by stage, varied by the row seed (as a sampling generator would be)."""

    def prompt_length(self, messages):
        return sum(len(m["content"]) for m in messages)

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p):
        return [self.reply(p, s) for p, s in zip(prompts, seeds)]

    def reply(self, prompt, seed):
        text = prompt[-1]["content"]
        if len(prompt) == 3:
            return "Because it is made of wax, and wax melts."
        if text.startswith("Answer this riddle"):
            return "" if seed % 4 == 0 else "Step 1: it gets shorter. So it is a candle."
        if "curious 10-year-old asked" in text:
            return ["Kid: Why does wax melt?", 'A curious child might ask: "Is a candle alive?"',
                    "The answer is a candle."][seed % 3]
        n = seed % 997
        return (f"Sure! Here are some new riddles:\n1. What has {n} legs but never walks anywhere at all?\n"
                f"2. **Riddle 2:** What has {n} coins in a bank but cannot buy bread?\n"
                f"- I am tall when I am young and short when I am old. What am I?\n3. What am I, asked the")


def write_seeds(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    riddles = SEEDS + [f"What has {w} but never uses them at all, not even once?" for w in
                       ("wheels", "wings", "windows", "pages", "teeth", "hands", "eyes", "ears", "feet", "keys")]
    seeds.write_text("".join(json.dumps({"instruction": r, "answer": "x"}) + "\n" for r in riddles))
    return seeds


def test_chain_01_to_04(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Scripted())
    d = tmp_path
    names = {"raw": "01_raw", "01": "01_riddles", "01r": "01_rejected", "02": "02_answers", "02r": "02_rejected",
             "03": "03_followups", "03r": "03_rejected", "04": "04_conversations", "04r": "04_rejected"}
    f = {k: d / f"{n}.jsonl" for k, n in names.items()}  # the stages' own names: 04's data card reads them
    run_stage(monkeypatch, "01_generate_riddles.py", f"--seed-file={write_seeds(d)}", "--num-prompts=8", "--k=3",
              "--batch-size=3", f"--raw-file={f['raw']}", f"--out-file={f['01']}", f"--rejected-file={f['01r']}")
    out = capsys.readouterr().out
    raw, kept, rejected = lines(f["raw"]), lines(f["01"]), lines(f["01r"])
    assert [r["id"] for r in raw] != sorted(r["id"] for r in raw)  # batches go longest prompt first
    assert len(raw) == 8 and all(len(r["seed_ids"]) == 3 for r in raw)
    # Per prompt: header, 2 riddles, a seed copy, a cut-off line; the 2 riddles of later prompts
    # differ from the first prompt's only by a number, so they are near-duplicates.
    assert len(kept) == 2 and len(rejected) == 8 * 5 - 2
    reasons = sorted({r["reason"] for r in rejected})
    assert reasons == ["header", "near_duplicate", "seed_copy", "unfinished"]
    assert "01: kept 2 riddles (38 lines rejected)" in out and "8 generated, 0 skipped as existing" in out
    # A different seed would pair the stored replies with other prompts: refused.
    with pytest.raises(InputError, match="prompt p0000[0-7] was made from other seeds"):
        run_stage(monkeypatch, "01_generate_riddles.py", f"--seed-file={d / 'seeds.jsonl'}", "--num-prompts=8",
                  "--k=3", "--seed=1", f"--raw-file={f['raw']}", f"--out-file={f['01']}", f"--rejected-file={f['01r']}")

    # 01 makes only 2 riddles here; feed 02 a larger set so that every reason shows up.
    riddles = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Riddle number {i}?"}]} for i in range(12)]
    f["01"].write_text("".join(json.dumps(r) + "\n" for r in riddles))
    run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={f['01']}", f"--out-file={f['02']}",
              f"--rejected-file={f['02r']}", "--batch-size=5")
    answers, rejected = lines(f["02"]), lines(f["02r"])
    assert len(answers) + len(rejected) == 12 and answers and rejected
    assert {r["reason"] for r in rejected} == {"empty"} and all(r["text"] == "" for r in rejected)
    assert answers[0]["messages"][0] == riddles[int(answers[0]["id"][1:])]["messages"][0]  # the bare riddle
    assert answers[0]["messages"][1] == {"role": "assistant", "content": "Step 1: it gets shorter. So it is a candle."}

    # Every scripted answer is the same candle: dedup would keep one riddle (its own tests are below).
    run_stage(monkeypatch, "03_followup_questions.py", f"--in-file={f['02']}", f"--out-file={f['03']}",
              f"--rejected-file={f['03r']}", "--dedup=false")
    followups, rejected = lines(f["03"]), lines(f["03r"])
    assert len(followups) + len(rejected) == len(answers)
    assert {m["messages"][2]["content"] for m in followups} <= {"Why does wax melt?", "Is a candle alive?"}
    assert all(r["reason"] == "not_a_question" and r["text"] == "The answer is a candle." for r in rejected)

    run_stage(monkeypatch, "04_followup_answers.py", f"--in-file={f['03']}", f"--out-file={f['04']}",
              f"--rejected-file={f['04r']}")
    final = lines(f["04"])
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in followups) and not lines(f["04r"])
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"] for r in final)
    ds = datasets.load_dataset("json", data_files=str(f["04"]), split="train")
    assert ds.num_rows == len(final) and ds[0]["messages"] == final[0]["messages"]
    card = (d / "report.md").read_text()
    assert f"| 04 conversations | {len(followups)} | {len(final)} | 0 | 0 | none |" in card
    assert (d / "report_stages.png").exists() and "in words" in card  # the scripted backend has no tokenizer
    # Every stage resumes to a no-op: nothing generated, nothing written twice.
    before = {k: v.read_bytes() for k, v in f.items()}
    capsys.readouterr()
    run_stage(monkeypatch, "04_followup_answers.py", f"--in-file={f['03']}", f"--out-file={f['04']}",
              f"--rejected-file={f['04r']}")
    assert f"skipped {len(final)} as existing" in capsys.readouterr().out
    run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={f['01']}", f"--out-file={f['02']}",
              f"--rejected-file={f['02r']}")
    assert "kept 0 answers, rejected 0 (none), skipped 12 as existing" in capsys.readouterr().out
    run_stage(monkeypatch, "03_followup_questions.py", f"--in-file={f['02']}", f"--out-file={f['03']}",
              f"--rejected-file={f['03r']}")  # all done: the dedup is skipped too (no embedder here)
    assert f"skipped {len(answers)} as existing" in capsys.readouterr().out
    assert {k: v.read_bytes() for k, v in f.items()} == before


# -----------------------------------------------------------------------------
# Stage 03's dedup of reworded riddles, with a bag-of-words stand-in for the embedder

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


def test_03_rejects_reworded_riddles_before_asking(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    monkeypatch.setattr(dedup, "load_embedder", lambda *a, **k: None)
    backend = Scripted()
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: backend)
    asked = []
    monkeypatch.setattr(backend, "generate", lambda prompts, *a, **k: asked.extend(prompts) or
                        [Scripted.reply(backend, p, s) for p, s in zip(prompts, a[0])])
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


# -----------------------------------------------------------------------------
# Resume: crashes at any moment end with the records of an uninterrupted run

def stage01_args(d, model):
    return [f"--generator={model}", f"--seed-file={ROOT / 'data' / 'seed_riddles.jsonl'}", "--num-prompts=7", "--k=2",
            "--batch-size=2", "--max-new-tokens=10", "--min-words=1", f"--raw-file={d / 'raw.jsonl'}",
            f"--out-file={d / 'kept.jsonl'}", f"--rejected-file={d / 'rej.jsonl'}"]


def test_resume_01_after_crash_and_torn_line(tmp_path, chatty_llama, monkeypatch, capsys):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    run_stage(monkeypatch, "01_generate_riddles.py", *stage01_args(ref, chatty_llama))
    assert len(lines(ref / "raw.jsonl")) == 7

    calls = {"n": 0}
    generate = common.generate_ids  # on CPU, HFBackend calls it once a batch

    class Crash(Exception):
        pass

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash  # as if stopped in the middle of the third batch
        return generate(*a, **k)

    monkeypatch.setattr(common, "generate_ids", crashing)
    with pytest.raises(Crash):
        run_stage(monkeypatch, "01_generate_riddles.py", *stage01_args(crash, chatty_llama))
    assert len(lines(crash / "raw.jsonl")) == 4 and not (crash / "kept.jsonl").exists()
    with open(crash / "raw.jsonl", "a") as f:
        f.write('{"id": "p00003", "seed_ids": ["r-')  # a write torn by the crash
    capsys.readouterr()
    run_stage(monkeypatch, "01_generate_riddles.py", *stage01_args(crash, chatty_llama))
    out = capsys.readouterr().out
    assert "repaired raw.jsonl: dropped a torn last line" in out and "3 generated, 4 skipped as existing" in out
    for name in ("raw.jsonl", "kept.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name
    run_stage(monkeypatch, "01_generate_riddles.py", *stage01_args(crash, chatty_llama), "--overwrite", "--num-prompts=2")
    assert len(lines(crash / "raw.jsonl")) == 2


# Runs a stage (argv: the project folder, the script, its arguments) and SIGKILLs it in the middle: the writer tears
# the first write with records from its KILL_AT-th write on (default 5), or with KILL_AT_RECORD=n its nth record
# (those before it whole). Under torchrun, KILL_RANK picks the one process to kill (default 0, the writer); another
# rank dies once its KILL_AT-th batch is gathered; KILL_PIDS names a folder where each process leaves its pid.
KILLER = """
import json, os, runpy, signal, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import common, helpers
from pipeline import dedup, records
dedup.embed, dedup.load_embedder = helpers.bag_of_words, lambda *a, **k: None  # stage 03's dedup, fast
at, nth, rank = int(os.environ.get("KILL_AT", 5)), int(os.environ.get("KILL_AT_RECORD", 0)), os.environ.get("RANK", "0")
if os.environ.get("KILL_PIDS"):  # under torchrun: each process leaves its pid, to check that none outlives the run
    with open(os.path.join(os.environ["KILL_PIDS"], rank), "w") as f:
        f.write(str(os.getpid()))
write, gather, calls, count = records.Appender.write, common.dist.all_gather_object, [0], [0]
def write_then_die(self, records):
    calls[0] += 1
    keep, count[0] = nth - 1 - count[0], count[0] + len(records)
    if nth and keep < len(records):  # KILL_AT_RECORD: those before the nth record whole, half of it, then SIGKILL
        write(self, records[:keep])  # opens the file (at its first write)
        line = json.dumps(records[keep], ensure_ascii=False) + "\\n"
        self._f.write(line[:len(line) // 2]); self._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if not nth and calls[0] >= at and records:  # half a line reaches the disk, then SIGKILL
        text = "".join(json.dumps(r) + "\\n" for r in records)
        write(self, [])  # opens the file (at its first write)
        self._f.write(text[:len(text) // 2]); self._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    write(self, records)
def gather_then_die(*a, **k):  # a process that only generates: SIGKILL once its KILL_AT-th batch is gathered
    gather(*a, **k)
    calls[0] += 1
    if calls[0] >= at:
        os.kill(os.getpid(), signal.SIGKILL)
victim = os.environ.get("KILL_RANK", "0")  # under torchrun, the one process to kill (RANK); 0 is the writer
if rank == victim == "0":
    records.Appender.write = write_then_die
elif rank == victim:
    common.dist.all_gather_object = gather_then_die
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def stage02_args(d, riddles, model, batch_size=2):
    """Stage 02 on `riddles` into folder d: batches of batch_size, replies of at most 8 tokens."""
    return [f"--generator={model}", f"--in-file={riddles}", f"--out-file={d / '02.jsonl'}",
            f"--rejected-file={d / 'rej.jsonl'}", f"--batch-size={batch_size}", "--max-new-tokens=8"]


def write_riddles(file, n=9):
    """The first n shipped seed riddles as stage 01's output."""
    seeds = load_seed_riddles(ROOT / "data" / "seed_riddles.jsonl")[:n]
    file.write_text("".join(json.dumps({"id": riddle_id(s), "messages": [{"role": "user", "content": s}]}) + "\n"
                            for s in seeds))
    return file


def test_a_reply_cut_right_after_a_full_stop_is_rejected_as_cut(tmp_path, chatty_llama, monkeypatch):
    """Whether a reply was cut is the backend's word (it reached an end token before MAX_NEW_TOKENS), not its last
    character: the same reply, forced, is rejected when the cap stops it right after its full stop and kept when
    it ends there on its own."""
    tok = common.load_tokenizer(chatty_llama)
    target = tok("It is a towel.", add_special_tokens=False)["input_ids"]
    assert tok.decode(target).strip() == "It is a towel."
    generate_ids = common.generate_ids

    def forced(model, prompts, seeds, **k):  # the target's tokens, then an end token
        eos = k["eos_ids"] if isinstance(k["eos_ids"], int) else k["eos_ids"][0]
        want = torch.tensor(target + [eos])

        def processor(scores, rows, steps):
            pick = want[steps.clamp(max=len(target))]
            return torch.where(torch.arange(scores.shape[-1]) == pick[:, None], 0.0, float("-inf"))
        return generate_ids(model, prompts, seeds, **dict(k, processor=processor))

    monkeypatch.setattr(common, "generate_ids", forced)
    riddles_file = write_riddles(tmp_path / "01.jsonl", n=1)
    for cap, reason in ((len(target), "unfinished"), (len(target) + 1, None)):
        d = tmp_path / str(cap)
        run_stage(monkeypatch, "02_answer_riddles.py", *stage02_args(d, riddles_file, chatty_llama),
                  f"--max-new-tokens={cap}", "--temperature=0")
        if reason:
            assert [(r["reason"], r["text"]) for r in lines(d / "rej.jsonl")] == [(reason, "It is a towel.")]
            assert not lines(d / "02.jsonl")
        else:
            assert [r["messages"][-1]["content"] for r in lines(d / "02.jsonl")] == ["It is a towel."]


def test_resume_02_after_sigkill(tmp_path, chatty_llama, monkeypatch, capsys):
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    ref, crash = tmp_path / "ref", tmp_path / "crash"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    assert len(lines(ref / "02.jsonl")) + len(lines(ref / "rej.jsonl")) == 9
    assert lines(ref / "02.jsonl") and lines(ref / "rej.jsonl")  # both files take part in the resume
    r = subprocess.run([PY, "-c", KILLER, str(ROOT), str(ROOT / "02_answer_riddles.py"), *args(crash)],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    torn = [n for n in ("02.jsonl", "rej.jsonl") if not (crash / n).read_text().endswith("\n")]
    assert len(torn) == 1  # the torn line is really there
    capsys.readouterr()
    run_stage(monkeypatch, "02_answer_riddles.py", *args(crash))
    out = capsys.readouterr().out
    assert f"repaired {torn[0]}: dropped a torn last line" in out
    for name in ("02.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


class DiskFull:
    """A file whose second write puts half of its text on the disk, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, text):
        self.writes += 1
        if self.writes == 2:
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_is_one_line_and_the_rerun_goes_on(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a batch: one line naming the file and what was kept (exit 2, no traceback); once
    there is space, the rerun repairs the torn last line as after a kill and ends as an uninterrupted run."""
    riddles = write_riddles(tmp_path / "01.jsonl")
    args = partial(stage02_args, riddles=riddles, model="never-loaded")
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Piano())
    ref, full = tmp_path / "ref", tmp_path / "full"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    open_file = records.Appender.open

    def open_full(self):
        open_file(self)
        if self.file.name == "02.jsonl" and not isinstance(self._f, DiskFull):
            self._f = DiskFull(self._f)

    with monkeypatch.context() as m:
        m.setattr(records.Appender, "open", open_full)
        with pytest.raises(InputError, match=r"02\.jsonl: disk full \(\d+ records were kept before this batch\); "
                                             r"free space and rerun") as stop:
            run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    assert "\n" not in str(stop.value)
    assert not (full / "02.jsonl").read_text().endswith("\n")  # half a batch reached the disk
    capsys.readouterr()
    run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    assert "repaired 02.jsonl: dropped a torn last line" in capsys.readouterr().out
    for name in ("02.jsonl", "rej.jsonl"):
        assert (full / name).read_bytes() == (ref / name).read_bytes(), name


def test_an_output_below_a_place_that_takes_no_files_is_one_line(tmp_path, monkeypatch):
    """/proc takes no new files: the stage stops in one line at its first write, not with a traceback."""
    riddles = write_riddles(tmp_path / "01.jsonl", n=2)
    monkeypatch.setattr(common, "load_backend", lambda *a, **k: Piano())
    with pytest.raises(InputError, match=r"^/proc/riddles/02\.jsonl.*: cannot be written"):
        run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={riddles}", "--out-file=/proc/riddles/02.jsonl",
                  f"--rejected-file={tmp_path / 'rej.jsonl'}")


class Piano:
    """A backend that answers every prompt "It is a piano." (ended)."""

    def prompt_length(self, messages):
        return len(messages[-1]["content"])

    def generate(self, prompts, seeds, **sampling):
        return [records.Reply("It is a piano.", True) for _ in prompts]


@pytest.mark.parametrize("kill", ["marker made", "output emptied", "rejects emptied", "marker gone"])
def test_overwrite_killed_before_its_first_record_never_mixes_two_runs(tmp_path, monkeypatch, kill):
    """--overwrite is one step: killed anywhere between clearing and the first new record, a resume without
    --overwrite keeps none of the old run's records beside the new ones."""
    from pipeline.message_stage import MessageStage

    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Riddle {i}?"}]} for i in range(4)]
    out, rej = tmp_path / "02.jsonl", tmp_path / "rej.jsonl"
    out.write_text("".join(json.dumps(dict(r, old=True)) + "\n" for r in recs[:2]))
    rej.write_text(json.dumps({"id": "r2", "reason": "old", "text": "x"}) + "\n")

    class Killed(Exception):
        pass

    def stage(overwrite):
        return MessageStage(recs, "assistant", riddles.clean_answer, out, rej, overwrite)

    real_open = records.Appender.open

    def open_then_die(self):
        if kill == "marker made":
            raise Killed
        real_open(self)
        if self.file == {"output emptied": out, "rejects emptied": rej}.get(kill):
            raise Killed

    def write_dies(self, batch):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(records.Appender, "open", open_then_die)
        if kill == "marker gone":
            m.setattr(records.Appender, "write", write_dies)
        with pytest.raises(Killed):
            stage(overwrite=True).save([{"id": "r0"}], [records.Reply("It is a towel.", True)])
    resumed = stage(overwrite=False)
    assert resumed.skipped == 0  # nothing of the old run counts as done
    resumed.save([{"id": "r3"}, {"id": "r1"}], [records.Reply("It is a clock.", True), records.Reply("Ice", False)])
    resumed.finish("02", "answers")
    assert [r["id"] for r in lines(out)] == ["r3"] and not any("old" in r for r in lines(out))
    assert [(r["id"], r["reason"]) for r in lines(rej)] == [("r1", "unfinished")]
    assert not Path(str(out) + ".overwrite").exists()


def torchrun(*args, timeout=300, **env):
    """`torchrun --nproc_per_node=2 args...` on CPU (gloo), on a free port; env adds variables. A run still going
    after `timeout` seconds (a hang) fails the test, stopped first with SIGTERM, which torchrun passes on to its
    processes (each in a session of its own, out of reach of a kill of torchrun's group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s (a hang?):\n{out[-2000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_processes_write_what_one_writes_and_resume(tmp_path, chatty_llama, monkeypatch):
    """torchrun x2 (accelerate launch alike): batches dealt out, one writer, the same bytes as one process."""
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama, batch_size=4)

    def two_processes(d, *more):
        r = torchrun(ROOT / "02_answer_riddles.py", *args(d), *more)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(one))
    out = two_processes(two)
    assert out.count("02: kept") == 1  # one summary: the first process writes, the other only generates
    for name in ("02.jsonl", "rej.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    # Resume under two processes from a file cut after its first record.
    first = (two / "02.jsonl").read_text().splitlines(keepends=True)[0]
    (two / "02.jsonl").write_text(first)
    (two / "rej.jsonl").write_text("")
    two_processes(two)
    for name in ("02.jsonl", "rej.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    two_processes(two, "--overwrite")  # only the first process deletes and writes
    for name in ("02.jsonl", "rej.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


# Runs a stage (argv: the project folder, the script, its arguments) on the slot engine, as on a GPU: HFBackend
# streams (one generate call, each reply handed on as it ends).
STREAMING = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import common
common.slot_engine_runs = lambda model: True
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_streaming_write_what_one_writes(tmp_path, chatty_llama, monkeypatch):
    """The GPU path of 01-04 under torchrun x2, on CPU: each process streams its share through the slot engine
    and gathers a batch once its shares of it and of the next batch are in; the writer writes the bytes of one
    process on transformers' generate. Resumes the same way."""
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(one))
    (tmp_path / "streaming.py").write_text(STREAMING)
    for cut in (False, True):  # whole, then resumed from a file cut after its first record
        if cut:
            (two / "02.jsonl").write_text((two / "02.jsonl").read_text().splitlines(keepends=True)[0])
            (two / "rej.jsonl").write_text("")
        r = torchrun(tmp_path / "streaming.py", ROOT, ROOT / "02_answer_riddles.py", *args(two))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        for name in ("02.jsonl", "rej.jsonl"):
            assert (two / name).read_bytes() == (one / name).read_bytes(), name


def running(pid_file):
    """Whether the process whose pid a KILLER under torchrun left in pid_file still runs (a zombie does not)."""
    try:
        return b"killer.py" in Path(f"/proc/{pid_file.read_text()}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("victim, kill", [("0", {"KILL_AT_RECORD": "4"}), ("1", {"KILL_AT": "3"})],
                         ids=["writer", "non-writer"])
def test_two_processes_resume_after_sigkill_of_one(tmp_path, chatty_llama, monkeypatch, victim, kill):
    """Issue 12: kill -9 of either process of `torchrun --nproc_per_node=2` in the middle of stage 02, rerun under two
    processes: nothing lost or doubled, the bytes of one process. 9 riddles in batches of 2 make 5 batches, each
    one all_gather_object (on CPU each process generates its shares of two batches a call). The writer (rank 0) dies
    halfway through its 4th record, so batch 2 is half written (the rerun regenerates it and writes only its other
    record) and the rerun deals the batches out in other groups; the other (rank 1) dies once the third batch is
    gathered, so the writer wrote the first two (and the third, unless torchrun's SIGTERM came first) and never the
    fourth (it needs rank 1's share). torchrun must fail and leave no process behind."""
    riddles = write_riddles(tmp_path / "01.jsonl")
    names = ("02.jsonl", "rej.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    ref, crash, pids = tmp_path / "ref", tmp_path / "crash", tmp_path / "pids"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    (tmp_path / "killer.py").write_text(KILLER)
    pids.mkdir()
    r = torchrun(tmp_path / "killer.py", ROOT, ROOT / "02_answer_riddles.py", *args(crash),
                 KILL_RANK=victim, KILL_PIDS=str(pids), **kill)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.search(rf"rank +: {victim} \(local_rank: {victim}\)\n +exitcode +: -9 ", r.stderr), r.stderr[-3000:]
    assert sorted(p.name for p in pids.iterdir()) == ["0", "1"]
    assert not [p.name for p in pids.iterdir() if running(p)]  # the survivor too is gone (torchrun stops it)
    # On disk: whole records in the order of one process, at least a batch, not all; the writer's kill tore a line.
    text = {n: (crash / n).read_text() if (crash / n).exists() else "" for n in names}
    whole = {n: t[:t.rfind("\n") + 1] for n, t in text.items()}
    torn = [n for n in names if text[n] != whole[n]]
    assert len(torn) == (victim == "0")
    assert all((ref / n).read_text().startswith(whole[n]) for n in names)
    written = sum(t.count("\n") for t in whole.values())
    assert written == 3 if victim == "0" else written in (4, 6)  # 4: SIGTERM stopped the writer before batch 3
    r = torchrun(ROOT / "02_answer_riddles.py", *args(crash))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"skipped {written} as existing" in r.stdout
    assert all(f"repaired {n}: dropped a torn last line" in r.stdout for n in torn)
    for n in names:
        assert (crash / n).read_bytes() == (ref / n).read_bytes(), n


@pytest.mark.parametrize("kill_at", [1, 4], ids=["in-dedup-rejects", "in-follow-ups"])
def test_resume_03_after_sigkill(tmp_path, chatty_llama, monkeypatch, capsys, kill_at):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    monkeypatch.setattr(dedup, "load_embedder", lambda *a, **k: None)
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    sampling = [f"--generator={chatty_llama}", "--batch-size=1", "--max-new-tokens=8"]
    run_stage(monkeypatch, "03_followup_questions.py", *write_answered(ref), *sampling)
    r = subprocess.run([PY, "-c", KILLER, str(ROOT), str(ROOT / "03_followup_questions.py"),
                        *write_answered(crash), *sampling], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", KILL_AT=str(kill_at)))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    capsys.readouterr()
    run_stage(monkeypatch, "03_followup_questions.py", *write_answered(crash), *sampling)
    assert "repaired" in capsys.readouterr().out
    for name in ("03.jsonl", "rej.jsonl", "closest.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name
    assert len(lines(ref / "03.jsonl")) + len(lines(ref / "rej.jsonl")) == len(ANSWERED)


# -----------------------------------------------------------------------------
# Bad input: one line naming file and line, outputs untouched; stages need their input

GOOD = '{"id": "a", "messages": [{"role": "user", "content": "What has keys?"}]}\n'


@pytest.mark.parametrize("content, message", [
    (None, "01.jsonl is missing: run 01_generate_riddles.py first"),
    ("", "01.jsonl: no records \\(empty file\\)"),
    (GOOD + "\n" + '{"id": "b", "messages": [}\n', "01.jsonl:3: invalid JSON"),
    (GOOD + '{"id": "b", "text": "What?"}\n', "01.jsonl:2: record has no field 'messages'"),
    (GOOD + '{"id": "b", "messages": []}\n', "01.jsonl:2: 'messages' must be a non-empty list"),
    (GOOD + '{"id": "b", "messages": [{"role": "user"}]}\n', "01.jsonl:2: message 0 needs a role"),
    (GOOD + '{"id": "b", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}\n',
     "01.jsonl:2: last message should be from the user"),
    (GOOD + GOOD, "01.jsonl: id 'a' appears twice"),
])
def test_bad_input_leaves_outputs_untouched(tmp_path, monkeypatch, content, message):
    source = tmp_path / "01.jsonl"
    if content is not None:
        source.write_text(content)
    (tmp_path / "02.jsonl").write_text("old output\n")
    with pytest.raises(InputError, match=message):
        run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={source}", f"--out-file={tmp_path / '02.jsonl'}",
                  f"--rejected-file={tmp_path / 'rej.jsonl'}", "--overwrite")
    assert (tmp_path / "02.jsonl").read_text() == "old output\n" and not (tmp_path / "rej.jsonl").exists()


@pytest.mark.parametrize("script, previous", [("02_answer_riddles.py", "01_generate_riddles.py"),
                                              ("03_followup_questions.py", "02_answer_riddles.py"),
                                              ("04_followup_answers.py", "03_followup_questions.py")])
def test_stage_refuses_without_previous_output(tmp_path, monkeypatch, script, previous):
    with pytest.raises(InputError, match=f"in.jsonl is missing: run {previous} first"):
        run_stage(monkeypatch, script, f"--in-file={tmp_path / 'in.jsonl'}", f"--out-file={tmp_path / 'out.jsonl'}")
    assert not (tmp_path / "out.jsonl").exists()


def test_torn_line_in_the_middle_is_refused(tmp_path):
    out = tmp_path / "02.jsonl"
    out.write_text(GOOD + '{"id": "b", "mess\n' + GOOD.replace('"a"', '"c"'))
    with pytest.raises(InputError, match="corrupt record in the middle of the file"):
        records.Appender(out)
    assert out.read_text().count("\n") == 3
