"""Stage 07 (07_evaluate.py): a fine-tuned tiny model scores better than its base on the riddle task, a
benchmark without reachable data is one line, held-out data of one or two turns, no samples, 05's adapter folder
passed as the merged model, bad input. The judged win rate: tests/test_winrate.py.
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


DEMO = ["--limit=20", "--samples=2", "--max-new-tokens=48"]  # demo.sh's 07 line


def held_out_adapter(folder, convs):
    """A stage 05 folder as 07 reads it: the held-out conversations and a loss log."""
    folder.mkdir()
    write_jsonl(folder / "eval.jsonl", convs)
    write_jsonl(folder / "log.jsonl", [{"step": s, "epoch": s / 4, "loss": 3.0 / s} for s in range(1, 5)])
    return folder


def run_07_here(monkeypatch, *args):
    """07 in this process (seconds, not a process's imports), no benchmark, no judge."""
    run_stage(monkeypatch, "07_evaluate.py", "--tasks=", "--win-rate=false", *args)


def test_one_turn_held_out_data_gets_samples_without_a_follow_up(tmp_path, monkeypatch, tiny_llama, chatty_llama):
    """An adapter trained on one-turn conversations holds out one-turn ones: the demo's 07 line once handed
    chat_replies an empty list for want of a follow-up (IndexError, right after the base model's lm-eval run)."""
    adapter, out = held_out_adapter(tmp_path / "05_adapter", [dict(c, messages=c["messages"][:2])
                                                             for c in eval_conversations()]), tmp_path / "07_eval"
    run_07_here(monkeypatch, f"--adapter={adapter}", f"--student={tiny_llama}", f"--merged={chatty_llama}",
                f"--eval-dir={out}", *DEMO)
    results = json.loads((out / "results.json").read_text())
    assert results["riddle_docs"] == {"replies": 6, "choices": 6} and len(results["samples"]) == 2
    assert all(s[m]["reply2"] is None and s[m]["ended2"] is None for s in results["samples"] for m in ("base", "tuned"))
    report = (out / "report.md").read_text()
    assert report.count("| reply | ") == 2 and "| follow-up: " not in report
    assert "## Win rate (judged)\n\nNot run: --win-rate=false.\n" in report


def test_two_turn_and_one_turn_held_out_data_mixed(tmp_path, monkeypatch, tiny_llama, chatty_llama):
    """The held-out split of two-turn training data (user, assistant, user, assistant), beside one-turn ones:
    every sample gets its first reply, the follow-up row only where the conversation has one."""
    convs = eval_conversations()
    for c in convs[::2]:
        c["messages"] = c["messages"][:2]
    adapter, out = held_out_adapter(tmp_path / "05_adapter", convs), tmp_path / "07_eval"
    run_07_here(monkeypatch, f"--adapter={adapter}", f"--student={tiny_llama}", f"--merged={chatty_llama}",
                f"--eval-dir={out}", *DEMO, "--samples=6")
    samples = {s["id"]: s for s in json.loads((out / "results.json").read_text())["samples"]}
    assert sorted(samples) == [c["id"] for c in convs]
    for c in convs:
        two = len(c["messages"]) == 4
        assert all((samples[c["id"]][m]["reply2"] is not None) == two for m in ("base", "tuned"))
    report = (out / "report.md").read_text()
    assert report.count("| reply | ") == 6 and report.count("| follow-up: ") == 3
    assert f"| follow-up: {EVAL_RIDDLES[1][2]} | {EVAL_RIDDLES[1][3]} | " in report


def test_samples_zero_is_a_report_without_samples(tmp_path, monkeypatch, tiny_llama, chatty_llama):
    adapter, out = held_out_adapter(tmp_path / "05_adapter", eval_conversations()), tmp_path / "07_eval"
    run_07_here(monkeypatch, f"--adapter={adapter}", f"--student={tiny_llama}", f"--merged={chatty_llama}",
                f"--eval-dir={out}", *DEMO, "--samples=0")
    results = json.loads((out / "results.json").read_text())
    assert results["samples"] == [] and results["scores"]["tuned"]["riddle_replies"]
    assert "## Samples\n\nNo samples: --samples=0.\n" in (out / "report.md").read_text()


def test_an_adapter_folder_as_the_merged_model_is_one_line(tmp_path, monkeypatch, tiny_llama):
    """05's folder (a LoRA adapter) where 06's merged model belongs: refused before any model loads, not left to
    peft (an IndexError where 05 added tokens the base has no rows for)."""
    adapter, out = held_out_adapter(tmp_path / "05_adapter", eval_conversations()), tmp_path / "07_eval"
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                             "base_model_name_or_path": tiny_llama}))
    with pytest.raises(InputError) as stop:
        run_07_here(monkeypatch, f"--adapter={adapter}", f"--student={tiny_llama}", f"--merged={adapter}",
                    f"--eval-dir={out}", *DEMO)
    assert str(stop.value) == (f"{adapter} is a LoRA adapter (stage 05's output), not a merged model: run "
                               f"06_merge_and_chat.py --adapter={adapter} and pass its output folder "
                               "(--merged=out/06_merged)")
    assert not out.exists()
