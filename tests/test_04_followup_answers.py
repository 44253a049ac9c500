"""Stage 04 (04_followup_answers.py): the conversations and their data card pushed to the Hub in one commit.
"""

import json
from pathlib import Path

import pytest

from helpers import ScriptedGenerator, lines, run_stage
from pipeline.knobs import InputError


def test_04_pushes_the_conversations_and_their_card_in_one_commit(tmp_path, monkeypatch, scripted_backend):
    """--push-to-hub: one commit of the train split as parquet in the messages layout, the data card as README
    with the Hub's YAML header and its pictures; a failed push is one line and changes no local file."""
    import datasets
    import httpx
    import huggingface_hub

    scripted_backend(ScriptedGenerator())
    followups = tmp_path / "03_followups.jsonl"
    followups.write_text("".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"Riddle {i}?"}, {"role": "assistant", "content": "A candle."},
        {"role": "user", "content": "Why?"}]}) + "\n" for i in range(3)))
    sent, made = [], []

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **k):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        sent.append((repo_id, repo_type, commit_message, files))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/1", commit_message="",
                                          commit_description="", oid="1")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: made.append((repo_id, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    args = [f"--in-file={followups}", f"--out-file={tmp_path / '04_conversations.jsonl'}",
            f"--rejected-file={tmp_path / '04_rejected.jsonl'}", "--push-to-hub=me/riddles", "--private"]
    run_stage(monkeypatch, "04_followup_answers.py", *args)
    assert made == [("me/riddles", {"repo_type": "dataset", "private": True, "exist_ok": True})]
    [(repo, kind, message, files)] = sent
    assert (repo, kind, message) == ("me/riddles", "dataset", "Upload conversations (train 3)")
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

    def refused(self, *a, **k):
        request = httpx.Request("POST", "https://huggingface.co/api/datasets/me/riddles/commit/main")
        raise huggingface_hub.errors.HfHubHTTPError("401 Client Error: Unauthorized",
                                                    response=httpx.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refused)
    (tmp_path / "got.parquet").unlink()
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match=r"^push to me/riddles failed \(HfHubHTTPError: 401 Client Error"):
        run_stage(monkeypatch, "04_followup_answers.py", *args)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(InputError, match="not a Hub repository name|name it as user/name"):
        run_stage(monkeypatch, "04_followup_answers.py", *args[:3], "--push-to-hub=no slash")
