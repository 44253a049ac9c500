"""pipeline/evaluation.py: the loss log, the riddle tasks' docs and lm-eval task files (loaded and run by
the lm-eval CLI from a copy elsewhere), the score tables and their flags.
"""

import json
import os
import subprocess
import sys

import pytest

from common import IM_END, render_chatml
from helpers import eval_conversations, write_jsonl
from pipeline.evaluation import (best_eval, compare_scores, lm_eval_scores, read_train_log, riddle_docs,
                                 write_riddle_tasks)
from pipeline.knobs import InputError


def test_read_train_log_splits_sorts_and_finds_best(tmp_path):
    log = tmp_path / "log.jsonl"
    write_jsonl(log, [{"step": 20, "epoch": 1.0, "loss": 1.5}, {"step": 10, "epoch": 0.5, "loss": 2.0},
                      {"step": 10, "epoch": 0.5, "eval_loss": 1.8}, {"step": 20, "epoch": 1.0, "eval_loss": 1.7},
                      {"step": 30, "epoch": 1.5, "eval_loss": 1.7}, {"train_runtime": 12.5}])
    train, evals = read_train_log(log)
    assert train == [(10, 0.5, 2.0), (20, 1.0, 1.5)]
    assert evals == [(10, 0.5, 1.8), (20, 1.0, 1.7), (30, 1.5, 1.7)]
    assert best_eval(evals) == (20, 1.0, 1.7)  # ties go to the earlier step
    assert best_eval([(5, 0.1, float("nan"))]) is None


def test_read_train_log_names_the_bad_record(tmp_path):
    log = tmp_path / "log.jsonl"
    write_jsonl(log, [{"step": 1, "epoch": 0.1, "loss": 2.0}, {"step": 2, "epoch": 0.2, "eval_loss": "low"}])
    with pytest.raises(InputError, match=r"log.jsonl: record 2: eval_loss record needs numbers"):
        read_train_log(log)
    write_jsonl(log, [{"train_runtime": 1.0}])
    with pytest.raises(InputError, match="no record has a loss or an eval_loss"):
        read_train_log(log)


def test_riddle_docs_render_chatml_and_draw_distractors_from_other_riddles(tokenizer):
    convs = eval_conversations()
    replies, choices = riddle_docs(convs, tokenizer, seed=3, n_choices=4)
    assert len(replies) == 12 and len(choices) == 6
    second = replies[1]  # r0's second reply, given riddle, first reply and follow-up
    assert second["id"] == "r0/3"
    assert second["context"] == ("<|im_start|>user\nWhat has keys but cannot open locks?<|im_end|>\n"
                                 "<|im_start|>assistant\nA piano has keys.<|im_end|>\n"
                                 "<|im_start|>user\nWhy keys?<|im_end|>\n<|im_start|>assistant\n")
    assert second["target"] == "Because they play notes.<|im_end|>"
    assert second["n_tokens"] == len(tokenizer(second["target"], add_special_tokens=False)["input_ids"])
    firsts = {c["id"]: c["messages"][1]["content"] + IM_END for c in convs}
    for doc in choices:
        assert doc["context"] == render_chatml(convs[int(doc["id"][1:])]["messages"][:1], add_generation_prompt=True)[0]
        assert len(doc["choices"]) == 4 == len(set(doc["choices"]))
        assert doc["choices"][doc["label"]] == firsts[doc["id"]]
        assert set(doc["choices"]) <= set(firsts.values())
    assert riddle_docs(convs, tokenizer, seed=3)[1] == choices  # seeded: the same questions every run
    assert riddle_docs(convs[:1], tokenizer)[1] == []  # one riddle has no other answers to offer


def test_write_riddle_tasks_drops_a_task_without_docs(tmp_path, tokenizer):
    replies, choices = riddle_docs(eval_conversations(), tokenizer)
    assert write_riddle_tasks(tmp_path, replies, choices) == ["riddle_replies", "riddle_choice"]
    config = (tmp_path / "riddle_choice.yaml").read_text()
    assert "custom_dataset: !function riddle_tasks.choices" in config and 'target_delimiter: ""' in config
    assert str(tmp_path) not in config  # nothing absolute: the folder works wherever it is copied
    assert write_riddle_tasks(tmp_path, replies, []) == ["riddle_replies"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["riddle_replies.jsonl", "riddle_replies.yaml", "riddle_tasks.py"]


def test_saved_tasks_load_from_a_copy_elsewhere(tmp_path, tokenizer, monkeypatch):
    import shutil

    from lm_eval.tasks import TaskManager

    replies, choices = riddle_docs(eval_conversations(), tokenizer)
    write_riddle_tasks(tmp_path / "made", replies, choices)
    shutil.copytree(tmp_path / "made", tmp_path / "moved")
    shutil.rmtree(tmp_path / "made")
    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path / "moved"), include_defaults=False).load(
        ["riddle_replies", "riddle_choice"])["tasks"]
    docs = {t.config.task: list(t.test_docs()) for t in tasks.values()}
    assert docs == {"riddle_replies": replies, "riddle_choice": choices}


def test_saved_tasks_run_with_the_lm_eval_cli_from_a_copy(tmp_path, tokenizer, tiny_llama):
    import shutil

    replies, choices = riddle_docs(eval_conversations(), tokenizer)
    write_riddle_tasks(tmp_path / "made", replies, choices)
    shutil.copytree(tmp_path / "made", tmp_path / "elsewhere" / "tasks")
    shutil.rmtree(tmp_path / "made")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tiny_llama}", "--device", "cpu", "--include_path", "tasks", "--tasks",
                        "riddle_replies,riddle_choice", "--limit", "2", "--output_path", "results"],
                       cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in (tmp_path / "elsewhere" / "results").rglob("results*.json")]
    assert found and set(found[0]["results"]) == {"riddle_replies", "riddle_choice"}
    assert found[0]["results"]["riddle_replies"]["nll_per_token,none"] > 0


def test_scores_and_comparison_flag_deltas_over_two_stderr():
    results = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.70, "acc_stderr,none": 0.01,
                                    "acc_norm,none": 0.72, "acc_norm_stderr,none": "N/A"}}}
    base = lm_eval_scores(results)
    assert base == {"piqa": {"acc": {"value": 0.70, "stderr": 0.01}, "acc_norm": {"value": 0.72, "stderr": None}}}
    tuned = {"piqa": {"acc": {"value": 0.75, "stderr": 0.01}, "acc_norm": {"value": 0.60, "stderr": 0.01}}}
    rows = compare_scores(base, tuned)
    assert [(r["metric"], r["flagged"]) for r in rows] == [("acc", True), ("acc_norm", False)]
    assert rows[0]["delta"] == pytest.approx(0.05) and rows[0]["stderr"] == pytest.approx(0.01 * 2 ** 0.5)
    assert rows[1]["stderr"] is None  # no stderr, no flag, however large the delta
    tuned["piqa"]["acc"]["value"] = 0.72  # 0.02 < 2 * 0.0141
    assert not compare_scores(base, tuned)[0]["flagged"]
