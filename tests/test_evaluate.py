"""Stage 07: loss log parsing, the riddle task docs, score tables, reply flags, and one end-to-end run.

The end-to-end run fine-tunes a tiny random model on the held-out conversations for a few
steps, then checks that 07_evaluate.py scores it better than its base on the riddle task and
that a benchmark without reachable data becomes a one-line note.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from common import IM_END, chat_replies, render_chatml
from helpers import make_model_folder, run_script, train_tokenizer
from pipeline.evaluation import (best_eval, compare_scores, lm_eval_scores, read_train_log, riddle_docs,
                                 write_riddle_tasks)
from pipeline.knobs import InputError

RIDDLES = [
    ("What has keys but cannot open locks?", "A piano has keys.", "Why keys?", "Because they play notes."),
    ("The more you take, the more you leave behind.", "Footsteps!", "Do cats leave them?", "Yes, cats do."),
    ("What speaks without a mouth?", "An echo.", "Where do echoes live?", "In caves and empty halls."),
    ("Why does the moon shine?", "It reflects the light of the sun.", "Is the moon hot?", "No, it is cold at night."),
    ("How many legs does a spider have?", "Eight legs.", "Do all spiders spin webs?", "No, some hunt instead."),
    ("What weighs 1.5 kg and runs all day?", "A clock on the wall.", "Why does it run?", "It has a small motor."),
]


def conversations():
    return [{"id": f"r{i}", "messages": [{"role": ("user", "assistant")[k % 2], "content": c} for k, c in enumerate(r)]}
            for i, r in enumerate(RIDDLES)]


def write_jsonl(file, records):
    file.write_text("".join(json.dumps(r) + "\n" for r in records))


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
    convs = conversations()
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
    replies, choices = riddle_docs(conversations(), tokenizer)
    assert write_riddle_tasks(tmp_path, replies, choices) == ["riddle_replies", "riddle_choice"]
    config = (tmp_path / "riddle_choice.yaml").read_text()
    assert "custom_dataset: !function riddle_tasks.choices" in config and 'target_delimiter: ""' in config
    assert str(tmp_path) not in config  # nothing absolute: the folder works wherever it is copied
    assert write_riddle_tasks(tmp_path, replies, []) == ["riddle_replies"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["riddle_replies.jsonl", "riddle_replies.yaml", "riddle_tasks.py"]


def test_saved_tasks_load_from_a_copy_elsewhere(tmp_path, tokenizer, monkeypatch):
    import shutil

    from lm_eval.tasks import TaskManager

    replies, choices = riddle_docs(conversations(), tokenizer)
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

    replies, choices = riddle_docs(conversations(), tokenizer)
    write_riddle_tasks(tmp_path / "made", replies, choices)
    shutil.copytree(tmp_path / "made", tmp_path / "elsewhere" / "tasks")
    shutil.rmtree(tmp_path / "made")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tiny_llama}", "--device", "cpu", "--include_path", "tasks", "--tasks",
                        "riddle_replies,riddle_choice", "--limit", "2", "--output_path", "results"],
                       cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=600,
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


class StubModel:
    """Returns fixed continuations, as generate would (padded after the turn ends)."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, texts):
        self.rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.input_ids, self.kwargs = input_ids, kwargs
        new = [(r + [self.tokenizer.pad_token_id] * max_new_tokens)[:max_new_tokens] for r in self.rows]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)


def test_chat_replies_cut_at_im_end_and_flag_replies_that_never_end(tokenizer):
    model = StubModel(tokenizer, ["A piano.<|im_end|>\n<|im_start|>user", "keys keys keys keys keys keys"])
    prompts = [[{"role": "user", "content": "What has keys?"}], [{"role": "user", "content": "Why?"}]]
    out = chat_replies(model, tokenizer, prompts, [1, 2], max_new_tokens=12, temperature=0.0, top_p=1.0)
    assert out == [("A piano.", True), (tokenizer.decode(model.rows[1][:12]).strip(), False)]
    rendered = tokenizer.batch_decode(model.input_ids, skip_special_tokens=False)
    assert rendered[0].endswith(render_chatml(prompts[0], add_generation_prompt=True)[0])
    assert rendered[1].startswith("<|endoftext|>")  # left padded
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.kwargs["eos_token_id"]
    assert "stop_strings" not in model.kwargs and model.kwargs["logits_processor"] == []


def test_chat_replies_stop_on_im_end_text_when_the_tokenizer_lacks_it(tmp_path):
    """A base model without ChatML tokens (Phi-2) spells <|im_end|> in pieces: stop on the string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(["<|endoftext|>"], ["A piano has keys. <|im_end|>"] * 5, 300, eos_token="<|endoftext|>")
    assert IM_END not in tok.get_vocab()
    prompt = [{"role": "user", "content": "Keys?"}]
    sampling = dict(temperature=0.7, top_p=0.9)
    stub = StubModel(tok, ["A piano.<|im_end|>"])
    assert chat_replies(stub, tok, [prompt], [1], max_new_tokens=20, **sampling) == [("A piano.", True)]
    assert stub.kwargs["stop_strings"] == [IM_END] and stub.kwargs["tokenizer"] is tok

    class Scripted(LlamaForCausalLM):
        """A real model under the real generate whose next token always continues `script`."""

        def forward(self, **kwargs):  # one call per generated token, the first with the prompt
            out = super().forward(**kwargs)
            out.logits[:, -1] = -1e4
            out.logits[:, -1, self.script[min(self.steps, len(self.script) - 1)]] = 0.0
            self.steps += 1
            return out

    model = Scripted(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).eval()
    model.script = tok("A piano.<|im_end|> has keys. A piano has keys.")["input_ids"]
    model.steps = 0
    assert chat_replies(model, tok, [prompt], [1], max_new_tokens=30, **sampling) == [("A piano.", True)]
    assert model.steps < 30  # stopped at the string, not at the length
    model.steps = 0
    (text, ended), = chat_replies(model, tok, [prompt], [1], max_new_tokens=3, **sampling)
    assert not ended and text == tok.decode(model.script[:3]).strip()


def fine_tune(base, out, convs, steps=60):
    """A few plain optimizer steps on the conversations' assistant turns: the 'merged' model."""
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


def run_stage(args, cwd):
    # No benchmark data can be reached.
    return run_script("07_evaluate.py", *args, cwd=cwd, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cwd / "datasets"))


def test_end_to_end_fine_tuned_beats_base_and_missing_benchmark_is_one_line(tmp_path):
    base = make_model_folder(tmp_path / "base")
    convs = conversations()
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
    write_jsonl(tmp_path / "quiz.jsonl", [{"q": r[0], "choices": [r[1], "An echo."], "label": 0} for r in RIDDLES[:4]])
    (tmp_path / "quiz.yaml").write_text(
        f"task: local_quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'quiz.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: 'Question: {{q}}\\nAnswer:'\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - {metric: acc, aggregation: mean}\n")

    proc = run_stage([f"--adapter={adapter}", f"--merged={tuned}", f"--eval-dir={out}",
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


def test_bad_input_is_one_line_and_leaves_outputs(tmp_path):
    adapter, out = tmp_path / "05_adapter", tmp_path / "07_eval"
    adapter.mkdir()
    out.mkdir()
    (out / "report.md").write_text("old report\n")
    (adapter / "eval.jsonl").write_text(json.dumps(conversations()[0]) + "\n{not json\n")
    (adapter / "log.jsonl").write_text(json.dumps({"step": 1, "epoch": 0.1, "loss": 1.0}) + "\n")
    proc = run_stage([f"--adapter={adapter}", f"--eval-dir={out}", "--merged=smollm2"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {adapter / 'eval.jsonl'}:2: invalid JSON (Expecting property name enclosed in double quotes)"]
    assert (out / "report.md").read_text() == "old report\n"
    proc = run_stage([f"--adapter={tmp_path / 'nowhere'}", f"--eval-dir={out}"], tmp_path)
    assert proc.returncode == 2 and "run 05_finetune_phi2.py first" in proc.stderr
