"""Stage 07 (07_evaluate.py): a fine-tuned tiny model scores better than its base on the riddle task, a
benchmark without reachable data is one line, held-out data of one or two turns, bad input.
"""

import json

import pytest
import torch

from helpers import EVAL_RIDDLES, eval_conversations, make_model_folder, run_script, run_stage, write_jsonl
from pipeline.knobs import InputError


def fine_tune(base, out, convs, steps=60):
    """A few plain optimizer steps on the eval_conversations' assistant turns: the 'merged' model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import collate_padded, tokenize_chat

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    batch = collate_padded([tokenize_chat(tok, c["messages"]) for c in convs], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def run_07_offline(args, cwd):
    """07 as a subprocess with the hub offline (in this process huggingface_hub has read HF_HUB_OFFLINE already)."""
    return run_script("07_evaluate.py", *args, cwd=cwd, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cwd / "datasets"))


def test_end_to_end_fine_tuned_beats_base_and_missing_benchmark_is_one_line(tmp_path):
    base = make_model_folder(tmp_path / "base")
    convs = eval_conversations()
    tuned = fine_tune(base, tmp_path / "merged", convs)
    adapter, out = tmp_path / "05_adapter", tmp_path / "07_eval"
    adapter.mkdir()
    write_jsonl(adapter / "eval.jsonl", convs)
    write_jsonl(adapter / "log.jsonl", [{"step": s, "epoch": s / 10, "loss": 3.0 / s} for s in range(1, 21)]
                + [{"step": s, "epoch": s / 10, "eval_loss": l} for s, l in ((10, 2.0), (20, 2.5))])
    (adapter / "run.json").write_text(json.dumps({"student": base, "data": str(tmp_path / "data" / "04.jsonl")}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "report.md").write_text("# Data card\n")  # stage 04's, beside the data 05 trained on
    # A benchmark whose data is at hand (lm-eval takes a YAML path as a task name), beside one whose data is not.
    write_jsonl(tmp_path / "quiz.jsonl", [{"q": r[0], "choices": [r[1], "An echo."], "label": 0} for r in EVAL_RIDDLES[:4]])
    (tmp_path / "quiz.yaml").write_text(
        f"task: local_quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'quiz.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Question: {{q}}\\nAnswer:'\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - {metric: acc, aggregation: mean}\n")

    proc = run_07_offline([f"--adapter={adapter}", f"--merged={tuned}", f"--eval-dir={out}",
                      f"--tasks=arc_easy,{tmp_path / 'quiz.yaml'}",
                      "--samples=2", "--max-new-tokens=24", "--temperature=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy: skipped, ConnectionError" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["base_model"] == base
    assert results["riddle_docs"] == {"replies": 12, "choices": 6}
    base_s, tuned_s = results["scores"]["base"], results["scores"]["tuned"]
    assert tuned_s["riddle_replies"]["nll_per_token"]["value"] < base_s["riddle_replies"]["nll_per_token"]["value"] - 1
    assert tuned_s["riddle_replies"]["bits_per_byte"]["value"] < base_s["riddle_replies"]["bits_per_byte"]["value"]
    assert tuned_s["riddle_choice"]["acc"]["value"] == 1.0 > base_s["riddle_choice"]["acc"]["value"]
    assert list(results["unavailable"]) == ["arc_easy"] and "arc_easy" not in tuned_s
    assert set(tuned_s["local_quiz"]) == {"acc"} and [r["task"] for r in results["comparison"]].count("local_quiz") == 1
    assert results["loss"]["best"] == [10, 1.0, 2.0]
    ids = [s["id"] for s in results["samples"]]
    assert len(set(ids)) == 2 and set(ids) <= {c["id"] for c in convs}
    learned = results["samples"][0]
    assert learned["tuned"]["ended"] and learned["tuned"]["reply"] == learned["messages"][1]["content"]

    report = (out / "report.md").read_text()
    for section in ("## Settings", "## Riddle task", "## Benchmarks", "## Loss curves", "## Samples",
                    "![train and eval loss](loss.png)"):
        assert section in report
    assert "| riddle_choice | acc (higher is better) | " in report
    assert "| local_quiz | acc (higher is better) | " in report
    assert "Benchmarks: 1 scores compared" in report
    assert f"| training data | {tmp_path / 'data' / '04.jsonl'}, described in its [data card](../data/report.md) |" in report
    notes = [line for line in report.splitlines() if "arc_easy" in line]
    assert len(notes) == 1
    assert notes[0].startswith("- arc_easy: not run, task or data could not be loaded (ConnectionError")
    assert "<br>**no `<\\|im_end\\|>`** |" in report  # the random base never ends a turn
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line_and_leaves_outputs(tmp_path, monkeypatch):
    """In this process: InputError is what a stage's process turns into one stderr line and exit code 2
    (tests/test_knobs.py runs that through a process)."""
    adapter, out = tmp_path / "05_adapter", tmp_path / "07_eval"
    adapter.mkdir()
    out.mkdir()
    (out / "report.md").write_text("old report\n")
    (adapter / "eval.jsonl").write_text(json.dumps(eval_conversations()[0]) + "\n{not json\n")
    (adapter / "log.jsonl").write_text(json.dumps({"step": 1, "epoch": 0.1, "loss": 1.0}) + "\n")
    with pytest.raises(InputError) as stop:
        run_stage(monkeypatch, "07_evaluate.py", f"--adapter={adapter}", f"--eval-dir={out}", "--merged=smollm2")
    assert str(stop.value) == \
        f"{adapter / 'eval.jsonl'}:2: invalid JSON (Expecting property name enclosed in double quotes)"
    assert (out / "report.md").read_text() == "old report\n"
    with pytest.raises(InputError, match="run 05_finetune_phi2.py first"):
        run_stage(monkeypatch, "07_evaluate.py", f"--adapter={tmp_path / 'nowhere'}", f"--eval-dir={out}")
