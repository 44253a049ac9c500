"""Stage 04 (04_followup_answers.py): the conversations and their data card pushed to the Hub in one commit.
"""

import pytest

from helpers import ScriptedGenerator, lines, run_stage, server_error, snapshot, write_jsonl
from pipeline.knobs import InputError


def test_04_pushes_the_conversations_and_their_card_in_one_commit(tmp_path, monkeypatch, scripted_backend, hub):
    """--push-to-hub: one commit of the train split as parquet in the messages layout, the data card as README
    with the Hub's YAML header and its pictures; a failed push is one line and changes no local file."""
    import datasets

    scripted_backend(ScriptedGenerator())
    followups = tmp_path / "03_followups.jsonl"
    write_jsonl(followups, [{"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Riddle {i}?"}, {"role": "assistant", "content": "A candle."},
        {"role": "user", "content": "Why?"}]} for i in range(3)])
    args = [f"--in-file={followups}", f"--out-file={tmp_path / '04_conversations.jsonl'}",
            f"--rejected-file={tmp_path / '04_rejected.jsonl'}", "--push-to-hub=me/riddles", "--private"]
    run_stage(monkeypatch, "04_followup_answers.py", *args)
    assert hub["repos"] == [{"repo_id": "me/riddles", "repo_type": "dataset", "private": True, "exist_ok": True}]
    [commit] = hub["commits"]
    assert (commit["repo_id"], commit["repo_type"], commit["commit_message"]) == (
        "me/riddles", "dataset", "Upload conversations (train 3)")
    files = commit["files"]
    assert sorted(files) == ["README.md", "data/train-00000-of-00001.parquet", "report_lengths.png",
                             "report_stages.png"]
    (tmp_path / "got.parquet").write_bytes(files["data/train-00000-of-00001.parquet"])
    got = datasets.load_dataset("parquet", data_files=str(tmp_path / "got.parquet"), split="train")
    assert got.to_list() == lines(tmp_path / "04_conversations.jsonl")
    header, card = files["README.md"].decode().split("\n---\n", 1)
    for line in ("license: apache-2.0", "- n<1K", "- text-generation", "  - split: train",
                 "    path: data/train-*.parquet", "generator: mistralai/Mistral-7B-Instruct-v0.2",
                 "seed_file: data/seed_riddles.jsonl"):
        assert line in header.split("\n"), line
    assert card.strip() == (tmp_path / "report.md").read_text().strip()

    hub["fail"] = server_error("me/riddles")
    (tmp_path / "got.parquet").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"^push to me/riddles failed \(HfHubHTTPError: 500 Server Error"):
        run_stage(monkeypatch, "04_followup_answers.py", *args)
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError, match="not a Hub repository name|name it as user/name"):
        run_stage(monkeypatch, "04_followup_answers.py", *args[:3], "--push-to-hub=no slash")
