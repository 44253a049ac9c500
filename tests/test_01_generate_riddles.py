"""Stage 01 (01_generate_riddles.py): a crash in the middle of a batch and a torn line, then a rerun, end
with the records of an uninterrupted run.
"""

import pytest

import common
from helpers import ROOT, lines, run_stage


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
