"""pipeline/records.py: every bad input file is one line naming file and line (bytes that are not UTF-8,
records too long, duplicate ids, control tokens) and nothing is written; outputs are checked before anything
is opened (below a file, an input, a folder the stage did not make); torn lines are repaired; stages need
their input; the torch-free layer imports no torch.
"""

import json
import re
import subprocess
import sys

import pytest

from helpers import (GOOD, GOOD_RIDDLE, INJECTION, ROOT, fake_adapter, jsonl, refused, run_stage, snapshot, stage_args,
                     user_only)
from pipeline import records
from pipeline.knobs import InputError
from pipeline.records import MAX_RECORD_CHARS, read_conversations


def test_text_modules_import_no_torch():
    """The riddle text rules, the records layer and the stages' writers load without torch (a second each)."""
    code = ("import sys; import pipeline.riddles, pipeline.records, pipeline.message_stage, pipeline.judge; "
            "print(sorted(m for m in ('torch', 'triton', 'transformers', 'pipeline.engine') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("script, previous", [("02_answer_riddles.py", "01_generate_riddles.py"),
                                              ("03_followup_questions.py", "02_answer_riddles.py"),
                                              ("04_followup_answers.py", "03_followup_questions.py")])
def test_stage_refuses_without_previous_output(tmp_path, monkeypatch, script, previous):
    with pytest.raises(InputError, match=f"in.jsonl is missing: run {previous} first"):
        run_stage(monkeypatch, script, f"--in-file={tmp_path / 'in.jsonl'}", f"--out-file={tmp_path / 'out.jsonl'}")
    assert not (tmp_path / "out.jsonl").exists()


def test_torn_line_in_the_middle_is_refused(tmp_path):
    out = tmp_path / "02.jsonl"
    out.write_text(GOOD_RIDDLE + '{"id": "b", "mess\n' + GOOD_RIDDLE.replace('"a"', '"c"'))
    with pytest.raises(InputError, match="corrupt record in the middle of the file"):
        records.Appender(out)
    assert out.read_text().count("\n") == 3


BIG = "x" * (MAX_RECORD_CHARS + 1)


@pytest.mark.parametrize("script, name, content, message", [
    # Bytes that are not UTF-8, in every kind of input file: the line of the first bad byte.
    ("01_generate_riddles.py", "seeds.jsonl", jsonl({"riddle": "Keys?"}) + b'{"riddle": "caf\xe9?"}\n',
     "seeds.jsonl:2: not UTF-8 text (byte 0xe9)"),
    ("01_generate_riddles.py", "seeds.txt", b"What has keys?\n\nWhat is caf\xe9?\n", "seeds.txt:3: not UTF-8"),
    ("01_generate_riddles.py", "seeds.csv", b"riddle\nWhat has keys?\ncaf\xe9\n", "seeds.csv:3: not UTF-8"),
    ("01_generate_riddles.py", "seeds.json", b'["What has keys?",\n "caf\xe9"]', "seeds.json:2: not UTF-8"),
    ("02_answer_riddles.py", "01.jsonl", jsonl(user_only(GOOD)) + b"\xff\xfe\n",
     "01.jsonl:2: not UTF-8 text (byte 0xff)"),
    ("05_finetune_phi2.py", "04.jsonl", jsonl(GOOD, dict(GOOD, id="b")) + b"\xc3\n", "04.jsonl:3: not UTF-8"),
    # One record over MAX_RECORD_CHARS: refused by its length, before any parsing or tokenizing.
    ("01_generate_riddles.py", "seeds.txt", ("What has keys?\n" + BIG + "?\n").encode(),
     f"seeds.txt:2: riddle of {MAX_RECORD_CHARS + 2:,} characters, over the limit of {MAX_RECORD_CHARS:,}"),
    ("01_generate_riddles.py", "seeds.csv", ("riddle\nKeys?\n" + BIG + "\n").encode(), "seeds.csv:3: riddle of"),
    ("02_answer_riddles.py", "01.jsonl", jsonl(user_only(GOOD), {"id": "b", "messages": [BIG]}),
     f"01.jsonl:2: record of {len(json.dumps({'id': 'b', 'messages': [BIG]})):,} characters, over the limit of "
     f"{MAX_RECORD_CHARS:,} (MAX_RECORD_CHARS in pipeline/records.py)"),
    ("05_finetune_phi2.py", "04.jsonl", jsonl(GOOD, GOOD | {"id": "b", "x": BIG}), "04.jsonl:2: record of"),
    ("02_answer_riddles.py", "01.jsonl", b"[" * 50_000 + b"\n", "01.jsonl:1: invalid JSON (nested too deep)"),
    # Ids are unique in every stage's input (05 trained on both copies before).
    ("05_finetune_phi2.py", "04.jsonl", jsonl(GOOD, dict(GOOD, id="b"), GOOD), "04.jsonl: id 'a' appears twice"),
])
def test_bad_input_files(tmp_path, monkeypatch, script, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    before = snapshot(tmp_path)
    refused(monkeypatch, script, *stage_args(script, source, tmp_path), "--overwrite", match=re.escape(message))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["01", "02", "05", "06", "07"])
def test_an_output_below_a_regular_file_is_one_line(tmp_path, monkeypatch, where):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("What has keys but cannot open locks?\n")
    data = tmp_path / "04.jsonl"
    data.write_bytes(jsonl(GOOD, dict(GOOD, id="b")))
    runs = {"01": ("01_generate_riddles.py", f"--seed-file={seeds}", f"--raw-file={tmp_path / 'raw.jsonl'}",
                   f"--out-file={blocker / '01.jsonl'}", f"--rejected-file={tmp_path / '01r.jsonl'}", "--k=1"),
            "02": ("02_answer_riddles.py", f"--in-file={tmp_path / '04.jsonl'}", "--generator=never-loaded",
                   f"--out-file={blocker / 'sub' / '02.jsonl'}", f"--rejected-file={tmp_path / '02r.jsonl'}"),
            "05": ("05_finetune_phi2.py", f"--data={data}", f"--adapter={blocker / 'adapter'}"),
            "06": ("06_merge_and_chat.py", f"--adapter={fake_adapter(tmp_path)}", f"--merged={blocker / 'merged'}"),
            "07": ("07_evaluate.py", f"--adapter={fake_adapter(tmp_path, log=True)}", f"--eval-dir={blocker / 'eval'}")}
    if where == "02":  # 02 wants user-ended records
        data.write_bytes(jsonl(user_only(GOOD)))
    before = snapshot(tmp_path)
    refused(monkeypatch, *runs[where], match=f"cannot be made, {blocker} is a file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script, args, message", [
    ("01_generate_riddles.py", ["--seed-file={seeds}", "--raw-file={seeds}"], "--raw-file is --seed-file"),
    ("01_generate_riddles.py", ["--seed-file={seeds}", "--out-file={t}/a.jsonl", "--rejected-file={t}/a.jsonl"],
     "--rejected-file and --out-file are one file"),
    ("02_answer_riddles.py", ["--in-file={user}", "--out-file={user}"], "--out-file is --in-file"),
    ("02_answer_riddles.py", ["--in-file={user}", "--out-file={t}/o.jsonl", "--rejected-file={user}"],
     "--rejected-file is --in-file"),
    ("03_followup_questions.py", ["--in-file={conv}", "--closest-file={conv}"], "--closest-file is --in-file"),
    ("04_followup_answers.py", ["--in-file={user}", "--out-file={user}"], "--out-file is --in-file"),
    ("04b_judge_conversations.py", ["--in-file={conv}", "--rejected-file={conv}"], "--rejected-file is --in-file"),
    ("05_finetune_phi2.py", ["--data={conv}", "--adapter={t}"], "--adapter holds --data"),
    ("06_merge_and_chat.py", ["--adapter={adapter}", "--merged={adapter}"], "--merged is --adapter"),
    ("07_evaluate.py", ["--adapter={adapter}", "--merged={t}/m", "--eval-dir={t}/m"], "--eval-dir is --merged"),
])
def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch, script, args, message):
    """--overwrite once emptied an input named as the output: now refused before anything is opened."""
    names = {"t": tmp_path, "seeds": tmp_path / "seeds.txt", "user": tmp_path / "user.jsonl",
             "conv": tmp_path / "conv.jsonl", "adapter": fake_adapter(tmp_path, log=True)}
    names["seeds"].write_text("What has keys but cannot open locks?\n")
    names["user"].write_bytes(jsonl(user_only(GOOD)))
    names["conv"].write_bytes(jsonl(GOOD, dict(GOOD, id="b")))
    (tmp_path / "m").mkdir()
    before = snapshot(tmp_path)
    knobs = ["--overwrite", "--generator=never-loaded"][:2 if script < "05" else 1 if script < "07" else 0]
    refused(monkeypatch, script, *[a.format(**names) for a in args], *knobs, match=message)
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_only_a_folder_the_stage_made(tmp_path, monkeypatch):
    """05 --overwrite once removed out/victim/important.txt; 05 and 06 now refuse a folder they did not make."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("mine\n")
    data = tmp_path / "04.jsonl"
    data.write_bytes(jsonl(GOOD, dict(GOOD, id="b")))
    for extra in ([], ["--overwrite"]):
        refused(monkeypatch, "05_finetune_phi2.py", f"--data={data}", f"--adapter={victim}", *extra,
                match=f"{victim} is not a folder this stage made \\(no readable run.json with 'data_sha1'\\)")
        refused(monkeypatch, "06_merge_and_chat.py", f"--adapter={fake_adapter(tmp_path)}", f"--merged={victim}",
                *extra, match=f"{victim} is not a folder this stage made \\(no readable merge.json")
    assert [p.name for p in victim.iterdir()] == ["important.txt"]


@pytest.mark.parametrize("script, name, content, message", [
    ("01_generate_riddles.py", "seeds.txt", f"{INJECTION}\n".encode(), "seeds.txt:1: riddle holds '<|im_end|>'"),
    ("01_generate_riddles.py", "seeds.jsonl", jsonl({"riddle": "Keys? \uff1c|endoftext|\uff1e"}),  # full-width signs
     "seeds.jsonl:1: riddle holds '<|endoftext|>'"),
    ("02_answer_riddles.py", "01.jsonl", jsonl(user_only(GOOD), {"id": "b", "messages": [INJECTION]}),
     "01.jsonl:2: message 0 holds '<|im_end|>', a chat control token"),
    ("05_finetune_phi2.py", "04.jsonl", jsonl(GOOD, {"id": "b", "messages": ["Keys?", "A piano.</s><s>[INST] x"]}),
     "04.jsonl:2: message 1 holds '</s>'"),
])
def test_input_files_with_control_tokens(tmp_path, monkeypatch, script, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    before = snapshot(tmp_path)
    refused(monkeypatch, script, *stage_args(script, source, tmp_path), match=re.escape(message))
    assert snapshot(tmp_path) == before


def test_a_line_torn_inside_a_utf8_character_is_repaired(tmp_path):
    out = tmp_path / "02.jsonl"
    good = jsonl({"id": "a", "text": "caf\u00e9"})
    out.write_bytes(good + '{"id": "b", "text": "caf\u00e9'.encode()[:-1])  # cut between the two bytes of é
    appender = records.Appender(out)
    assert appender.done == {"a"} and out.read_bytes() == good
    appender.close()


def test_read_conversations_shapes_and_errors(tmp_path):
    evolved = tmp_path / "evolved.jsonl"
    evolved.write_text(json.dumps({"number": 7, "messages": ["Riddle?", "Answer.", "Why?", "Because."]}) + "\n")
    (rec,) = read_conversations(evolved)
    assert rec["id"] == "7" and [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello."}]})
                   + "\n\n" + json.dumps({"id": "b", "messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(InputError, match=rf"{bad}:3: message 0 needs a role"):
        read_conversations(bad)


def test_publish_folder_keeps_the_first_whole_folder(tmp_path):
    target = tmp_path / "model"

    def built(name, text):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(text)
        return folder

    assert records.publish_folder(built(".model.a", "a"), target) == target
    assert (target / "config.json").read_text() == "a" and not (tmp_path / ".model.a").exists()
    records.publish_folder(built(".model.b", "b"), target)  # another process was first: its folder stays
    assert (target / "config.json").read_text() == "a" and not (tmp_path / ".model.b").exists()
    (target / "config.json").unlink()  # a folder left half made by a crash is replaced
    records.publish_folder(built(".model.c", "c"), target)
    assert (target / "config.json").read_text() == "c" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_building_folder_publishes_when_done_and_leaves_nothing_when_it_fails(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C in the middle of a conversion
        with records.building_folder(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with records.building_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("whole")
    assert (tmp_path / "model" / "config.json").read_text() == "whole" and len(list(tmp_path.iterdir())) == 1
