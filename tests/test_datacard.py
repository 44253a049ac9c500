"""pipeline/datacard.py: counts per stage and reason, lengths, rewording clusters, closest pairs, samples, valid PNGs."""

import json

import matplotlib.image
import pytest

from pipeline import datacard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def conversation(i, follow_up="Why is it wet?"):
    return {"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Riddle {i}: what gets {'very ' * i}wet?"},  # 5 + i words
        {"role": "assistant", "content": "Step 1: it dries you.\nSo it is a towel."},
        {"role": "user", "content": follow_up},
        {"role": "assistant", "content": "Because it soaks up water."}]}


def write(folder, name, records):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def lines(file):
    return [json.loads(x) for x in file.read_text().splitlines()]


def reworded(rid, of, reason, trick):
    return {"id": rid, "reason": reason, "text": f"Reworded {rid}?", "duplicate_of": {"id": of, "text": f"Riddle {of}?"},
            "scores": {"question": 0.5, "trick": trick, "answer": 1.0}, "answers": ["a towel", "A towel"]}


@pytest.fixture
def data(tmp_path):
    """Stage files: 01 keeps 8 of 12 lines, 02 answers 7 (1 empty), 03 drops 3 rewordings and 1 follow-up,
    04 finishes 3 and rejects none; one riddle of 04 is still open (an interrupted run)."""
    convs = [conversation(i) for i in range(4)]
    write(tmp_path, "01_riddles.jsonl", [{"id": f"r{i}", "messages": convs[0]["messages"][:1]} for i in range(8)])
    write(tmp_path, "01_rejected.jsonl", [{"line": "x", "prompt_id": "p0", "reason": r}
                                           for r in ["header"] * 3 + ["near_duplicate"]])
    write(tmp_path, "02_answers.jsonl", [{"id": f"r{i}", "messages": convs[0]["messages"][:2]} for i in range(7)])
    write(tmp_path, "02_rejected.jsonl", [{"id": "r7", "reason": "empty", "text": ""}])
    write(tmp_path, "03_followups.jsonl", [{"id": c["id"], "messages": c["messages"][:3]} for c in convs])
    write(tmp_path, "03_rejected.jsonl", [reworded("r4", "s1", "reworded_seed", 0.9),
                                           reworded("r5", "s1", "reworded_seed", 0.7),
                                           reworded("r6", "r0", "reworded_duplicate", 0.8),
                                           {"id": "r9", "reason": "not_a_question", "text": "A towel."}])
    write(tmp_path, "03_closest.jsonl", [
        {"id": f"r{i}", "text": f"Riddle {i}?", "closest": {"id": "s1", "text": "Seed?", "seed": True},
         "scores": {"question": 0.3, "trick": t, "answer": 0.2}, "answers": ["a towel", "a map" if i else ""],
         "kept_because": "answers differ"} for i, t in enumerate([0.4, 0.62, 0.5])])
    write(tmp_path, "04_conversations.jsonl", convs[:3])
    (tmp_path / "04_rejected.jsonl").write_text("")  # a stage that rejected nothing leaves an empty file
    return tmp_path


def test_card_counts_clusters_and_pictures(data):
    file = datacard.write_card(data, samples=2)
    text = file.read_text()
    assert file == data / "report.md"
    assert "3 conversations (stage 04) from 12 candidate lines (stage 01)." in text
    assert "| 01 riddles | 12 | 8 | 4 | 0 | header 3, near_duplicate 1 |" in text
    assert "| 02 answers | 8 | 7 | 1 | 0 | empty 1 |" in text
    assert "| 03 follow-ups | 7 | 4 | 4 | 0 | reworded_seed 2, reworded_duplicate 1, not_a_question 1 |" in text
    assert "| 04 conversations | 4 | 3 | 0 | 1 | none |" in text
    assert "## Lengths of the 3 conversations, in words" in text
    assert "| riddle | 3 | 6 | 6 | 7 |" in text and "| answer | 3 | 10 | 10 | 10 |" in text
    assert "| follow-up | 3 | 4 | 4 | 4 |" in text and "| follow-up answer | 3 | 5 | 5 | 5 |" in text
    assert "3 riddles removed as rewordings: 2 of a seed, 1 of an earlier riddle, in 2 clusters" in text
    seed_cluster = text.index("- seed: Riddle s1?")
    assert text.index("removed (trick 0.90") > seed_cluster and text.index("- kept: Riddle r0?") > seed_cluster
    assert "### Closest pairs kept (top 3 of 3 by trick cosine)" in text
    rows = [line for line in text.splitlines() if line.startswith("| Riddle ") and "(seed)" in line]
    assert [r.split(" | ")[2] for r in rows] == ["0.62", "0.50", "0.40"]  # closest first
    assert rows[2].endswith("| 0.40 | 0.30 | a towel / ? | answers differ |")  # ?: no short answer found
    assert text.count("\n### r") == 2 and "> **assistant:** Step 1: it dries you.\n> So it is a towel." in text
    assert "judge" not in text.lower() and not (data / "report_judge.png").exists()  # 04b did not run: no section
    for name in ("report_stages.png", "report_lengths.png", "report_similarity.png"):
        png = data / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        height, width, _ = matplotlib.image.imread(png).shape
        assert height > 100 and width > 100, name
    assert sorted(p.name for p in data.glob("*.tmp")) == []
    # Deterministic: the same files, the same card (the samples are seeded).
    assert datacard.write_card(data, samples=2).read_text() == text


def test_card_counts_tokens_and_leaves_out_missing_stages(data, tokenizer):
    for name in ("01_riddles.jsonl", "01_rejected.jsonl", "03_closest.jsonl"):
        (data / name).unlink()
    text = datacard.write_card(data, tokenizer=tokenizer, tokenizer_name="tiny").read_text()
    assert "Not found, left out: 01_riddles.jsonl." in text and "| 01 " not in text
    assert "| 02 answers | 8 | 7 | 1 | 0 | empty 1 |" in text  # no stage 01: its own kept + rejected
    assert "in tokens (tiny tokenizer)" in text
    answer = len(tokenizer(conversation(0)["messages"][1]["content"], add_special_tokens=False)["input_ids"])
    assert f"| answer | 3 | {answer} | {answer} | {answer} |" in text and answer != 10
    assert "### Closest pairs kept" not in text and "3 riddles removed as rewordings" in text
    write(data, "03_rejected.jsonl", [])
    write(data, "03_closest.jsonl", [{"id": "r1", "text": "Riddle?", "closest": {"id": "r0", "text": "R?", "seed": False},
                                       "scores": {"question": 0.1, "trick": 0.2, "answer": 0.0}, "answers": ["a", "b"],
                                       "kept_because": "trick cosine below 0.55"}])
    text = datacard.write_card(data).read_text()
    assert "No riddle was removed as a rewording." in text and "### Largest clusters" not in text


def test_card_shows_the_judge_scores_once_04b_ran(data):
    convs = lines(data / "04_conversations.jsonl")
    write(data, "04b_judged.jsonl", [dict(convs[0], judge={"scores": {"answer": 4, "follow_up": 5, "second_answer": 4},
                                                         "score": 4, "reason": "Fine."})])
    write(data, "04b_rejected.jsonl", [
        {"id": "r1", "reason": "low_score", "score": 2, "scores": {"answer": 2, "follow_up": 3, "second_answer": 5},
         "judge_reason": "Wrong answer.", "text": "answer: 2 ..."},
        {"id": "r2", "reason": "unparsed", "text": "What a nice riddle!"}])
    text = datacard.write_card(data, samples=5).read_text()
    assert "1 judged conversations (stage 04b) from 12 candidate lines (stage 01)." in text
    assert "| 04b judged conversations | 3 | 1 | 2 | 0 | low_score 1, unparsed 1 |" in text
    assert "2 conversations judged (unreadable judgements left out" in text
    table = text[text.index("| score | lowest | answer | follow-up | second answer |"):].splitlines()[2:7]
    assert table == ["| 5 | 0 | 0 | 1 | 1 |", "| 4 | 1 | 1 | 0 | 1 |", "| 3 | 0 | 0 | 1 | 0 |",
                     "| 2 | 1 | 1 | 0 | 0 |", "| 1 | 0 | 0 | 0 | 0 |"]
    assert "Judge: 4 (answer 4, follow-up 5, second answer 4), kept." in text
    assert "Judge: 2 (answer 2, follow-up 3, second answer 5), rejected." in text
    assert text.count("Judge: ") == 2  # r2's judgement could not be read
    assert (data / "report_judge.png").read_bytes()[:8] == PNG_SIGNATURE


def test_clusters_largest_first():
    groups = datacard.clusters([reworded("a", "x", "reworded_duplicate", 0.7), reworded("b", "y", "reworded_seed", 0.8),
                                reworded("c", "y", "reworded_seed", 0.9)])
    assert [(head["id"], head["seed"], [m["id"] for m in members]) for head, members in groups] == [
        ("y", True, ["b", "c"]), ("x", False, ["a"])]
