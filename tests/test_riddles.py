"""pipeline/riddles.py: the text rules (riddle lines, answers and follow-up questions cleaned, with the
reason of each reject), stage 01's exact and near-duplicate filter, riddle ids, and the seed files.
"""

import json

import pytest

from helpers import ROOT, SEED_TEXTS, lines
from pipeline import riddles
from pipeline.knobs import InputError
from pipeline.riddles import clean_followup, clean_riddle, filter_riddles, load_seed_riddles, load_seed_rows, riddle_id


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


def test_clean_answer():
    assert riddles.clean_answer("  It is a towel.\n") == ("It is a towel.", None)
    # The backend's word comes first: cut after a full stop is cut, ended without one is whole.
    assert riddles.clean_answer("It is a towel.", ended=False) == ("It is a towel.", "unfinished")
    assert riddles.clean_answer("It is a towel", ended=True) == ("It is a towel", None)
    assert riddles.clean_answer("It is a towel", ended=None) == ("It is a towel", "unfinished")
    assert riddles.clean_answer(" \n") == ("", "empty")
    assert riddles.clean_answer("First, think about what dries") == ("First, think about what dries", "unfinished")


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
    kept, rejected = filter_riddles(raw, SEED_TEXTS, min_words=5, max_chars=300, threshold=0.5)
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
    kept, _ = filter_riddles(raw, SEED_TEXTS, threshold=0.65)  # the near-seed pair is at 10/15
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
