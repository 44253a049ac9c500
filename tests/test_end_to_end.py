"""The pipeline end to end, as the README's demo runs it (make demo: demo.sh), at the smallest counts that still
carry real records through every stage: 01 -> 04 on the bundled SmolLM2 (stage 03's dedup on the bundled
MiniLM), the data card, 05 (QLoRA, 2 steps), the merge of 06 and 07's report.

The stages run in this process (helpers.run_stage: no process pays the imports again) with every path in a
temp folder laid out as the project's data/ and out/, so a developer's own stay as they are. demo.sh itself
runs in `make demo`; here its stage lines are checked against the stages' knobs.

"""

import hashlib
import json
import re
import shlex

import pytest

from helpers import ROOT, SEED_TEXTS, ScriptedGenerator, lines, run_stage, script_knobs
from pipeline.knobs import InputError, configure


GENERATE = ["--generator=smollm2", "--batch-size=64"]


# A short answer each (the demo's "step by step" runs to hundreds of tokens, and answers cut off are rejected).
SHORT = "--prompt=Answer this riddle in one short sentence.\n\nRiddle: {riddle}"


def test_pipeline_runs_every_stage(tmp_path, monkeypatch, capsys, smollm2, minilm_folder):
    """6 prompts of 3 seed riddles (of 20) -> ~7 riddles -> ~7 short answers -> some follow-up questions (SmolLM2
    often answers instead: rejected) -> at least 2 conversations, the data card -> 2 QLoRA steps -> the merge and
    one reply -> the report on the held-out conversation. About 100 s on one thread."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    f = {name: data / f"{name}.jsonl" for name in (
        "seed_riddles", "01_raw", "01_riddles", "01_rejected", "02_answers", "02_rejected", "03_followups",
        "03_rejected", "03_closest", "04_conversations", "04_rejected")}
    f["seed_riddles"].write_text("".join((ROOT / "data" / "seed_riddles.jsonl").read_text().splitlines(True)[:20]))
    run_stage(monkeypatch, "01_generate_riddles.py", *GENERATE, f"--seed-file={f['seed_riddles']}", "--num-prompts=6",
              "--k=3", "--max-new-tokens=80", f"--raw-file={f['01_raw']}", f"--out-file={f['01_riddles']}",
              f"--rejected-file={f['01_rejected']}")
    run_stage(monkeypatch, "02_answer_riddles.py", *GENERATE, SHORT, "--max-new-tokens=64",
              f"--in-file={f['01_riddles']}", f"--out-file={f['02_answers']}", f"--rejected-file={f['02_rejected']}")
    run_stage(monkeypatch, "03_followup_questions.py", *GENERATE, "--max-new-tokens=32", "--temperature=0.6",
              f"--seed-file={f['seed_riddles']}", f"--in-file={f['02_answers']}", f"--out-file={f['03_followups']}",
              f"--rejected-file={f['03_rejected']}", f"--closest-file={f['03_closest']}")
    run_stage(monkeypatch, "04_followup_answers.py", *GENERATE, "--max-new-tokens=64",
              f"--in-file={f['03_followups']}", f"--out-file={f['04_conversations']}",
              f"--rejected-file={f['04_rejected']}")
    counts = {name: len(lines(file)) for name, file in f.items()}
    assert counts["01_riddles"] and counts["02_answers"] and counts["03_followups"], counts

    conversations = lines(f["04_conversations"])
    assert len(conversations) >= 2, counts  # one to train on, one held out
    for rec in conversations:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"].strip() for m in rec["messages"])
    card = (data / "report.md").read_text()
    assert f"{len(conversations):,} conversations (stage 04) from " in card
    assert f["03_closest"].exists() and (data / "report_stages.png").exists()

    adapter, merged, report_dir = out / "05_adapter", out / "06_merged", out / "07_eval"
    run_stage(monkeypatch, "05_finetune_phi2.py", "--student=smollm2", f"--data={f['04_conversations']}",
              f"--adapter={adapter}", "--max-steps=2", "--tokens-per-batch=256", "--max-length=256", "--lr=2e-4",
              "--gradient-checkpointing=0", "--evals-per-epoch=0")
    log = lines(adapter / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert (adapter / "adapter_config.json").exists() and (adapter / "loss.png").exists()

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_stage(monkeypatch, "06_merge_and_chat.py", f"--adapter={adapter}", f"--merged={merged}",
                  "--prompt=What has keys but can't open locks?", "--temperature=0", "--max-new-tokens=8")
    assert stop.value.code in (0, None) and capsys.readouterr().out.strip()  # merged, then one reply
    assert (merged / "chat_template.jinja").exists() or "chat_template" in (merged / "tokenizer_config.json").read_text()
    merge = json.loads((merged / "merge.json").read_text())
    adapter_files = b"".join((adapter / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors"))
    assert merge["adapter_sha1"] == hashlib.sha1(adapter_files).hexdigest()
    assert merge["changed_tensors"] > 0 and merge["max_logit_diff_rel"] <= merge["tolerance"]

    # No benchmarks: they need the hub (the stage 07 tests cover a benchmark whose data cannot be loaded).
    run_stage(monkeypatch, "07_evaluate.py", f"--adapter={adapter}", f"--merged={merged}", f"--eval-dir={report_dir}",
              "--tasks=", "--limit=4", "--samples=1", "--max-new-tokens=8", "--win-rate=false")
    report = (report_dir / "report.md").read_text()
    for section in ("## Riddle task", "| riddle_replies | nll_per_token", "## Samples", "### 1. "):
        assert section in report
    assert "[data card](../../data/report.md)" in report


def demo_stage_lines():
    """demo.sh's stage commands as (script, arguments), with its $G expanded."""
    text = (ROOT / "demo.sh").read_text()
    g = shlex.split(re.search(r'^G="(.*)"$', text, re.M).group(1))
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["$PY"]:
            found.append((words[1], [a for w in words[2:] for a in (g if w == "$G" else [w])]))
    return found


def test_demo_runs_every_stage_with_knobs_the_stages_take():
    """What `make demo` runs: stages 01 -> 07 in order, each with knobs it knows, in their ranges."""
    stages = demo_stage_lines()
    assert [s[:2] for s, _ in stages] == ["01", "02", "03", "04", "05", "06", "07"]
    for script, args in stages:
        configure(script_knobs(script), args)


def write_seeds(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    riddles = SEED_TEXTS + [f"What has {w} but never uses them at all, not even once?" for w in
                       ("wheels", "wings", "windows", "pages", "teeth", "hands", "eyes", "ears", "feet", "keys")]
    seeds.write_text("".join(json.dumps({"instruction": r, "answer": "x"}) + "\n" for r in riddles))
    return seeds


def test_chain_01_to_04(tmp_path, monkeypatch, capsys, scripted_backend):
    import datasets

    scripted_backend(ScriptedGenerator())
    d = tmp_path
    names = {"raw": "01_raw", "01": "01_riddles", "01r": "01_rejected", "02": "02_answers", "02r": "02_rejected",
             "03": "03_followups", "03r": "03_rejected", "04": "04_conversations", "04r": "04_rejected"}
    f = {k: d / f"{n}.jsonl" for k, n in names.items()}  # the stages' own names: 04's data card reads them
    run_stage(monkeypatch, "01_generate_riddles.py", f"--seed-file={write_seeds(d)}", "--num-prompts=8", "--k=3",
              "--batch-size=3", f"--raw-file={f['raw']}", f"--out-file={f['01']}", f"--rejected-file={f['01r']}")
    out = capsys.readouterr().out
    raw, kept, rejected = lines(f["raw"]), lines(f["01"]), lines(f["01r"])
    assert [r["id"] for r in raw] != sorted(r["id"] for r in raw)  # batches go longest prompt first
    assert len(raw) == 8 and all(len(r["seed_ids"]) == 3 for r in raw)
    # Per prompt: header, 2 riddles, a seed copy, a cut-off line; the 2 riddles of later prompts
    # differ from the first prompt's only by a number, so they are near-duplicates.
    assert len(kept) == 2 and len(rejected) == 8 * 5 - 2
    reasons = sorted({r["reason"] for r in rejected})
    assert reasons == ["header", "near_duplicate", "seed_copy", "unfinished"]
    assert "01: kept 2 riddles (38 lines rejected)" in out and "8 generated, 0 skipped as existing" in out
    # A different seed would pair the stored replies with other prompts: refused.
    with pytest.raises(InputError, match="prompt p0000[0-7] was made from other seeds"):
        run_stage(monkeypatch, "01_generate_riddles.py", f"--seed-file={d / 'seeds.jsonl'}", "--num-prompts=8",
                  "--k=3", "--seed=1", f"--raw-file={f['raw']}", f"--out-file={f['01']}", f"--rejected-file={f['01r']}")

    # 01 makes only 2 riddles here; feed 02 a larger set so that every reason shows up.
    riddles = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Riddle number {i}?"}]} for i in range(12)]
    f["01"].write_text("".join(json.dumps(r) + "\n" for r in riddles))
    run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={f['01']}", f"--out-file={f['02']}",
              f"--rejected-file={f['02r']}", "--batch-size=5")
    answers, rejected = lines(f["02"]), lines(f["02r"])
    assert len(answers) + len(rejected) == 12 and answers and rejected
    assert {r["reason"] for r in rejected} == {"empty"} and all(r["text"] == "" for r in rejected)
    assert answers[0]["messages"][0] == riddles[int(answers[0]["id"][1:])]["messages"][0]  # the bare riddle
    assert answers[0]["messages"][1] == {"role": "assistant", "content": "Step 1: it gets shorter. So it is a candle."}

    # Every scripted answer is the same candle: dedup would keep one riddle (its own tests are below).
    run_stage(monkeypatch, "03_followup_questions.py", f"--in-file={f['02']}", f"--out-file={f['03']}",
              f"--rejected-file={f['03r']}", "--dedup=false")
    followups, rejected = lines(f["03"]), lines(f["03r"])
    assert len(followups) + len(rejected) == len(answers)
    assert {m["messages"][2]["content"] for m in followups} <= {"Why does wax melt?", "Is a candle alive?"}
    assert all(r["reason"] == "not_a_question" and r["text"] == "The answer is a candle." for r in rejected)

    run_stage(monkeypatch, "04_followup_answers.py", f"--in-file={f['03']}", f"--out-file={f['04']}",
              f"--rejected-file={f['04r']}")
    final = lines(f["04"])
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in followups) and not lines(f["04r"])
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"] for r in final)
    ds = datasets.load_dataset("json", data_files=str(f["04"]), split="train")
    assert ds.num_rows == len(final) and ds[0]["messages"] == final[0]["messages"]
    card = (d / "report.md").read_text()
    assert f"| 04 conversations | {len(followups)} | {len(final)} | 0 | 0 | none |" in card
    assert (d / "report_stages.png").exists() and "in words" in card  # the scripted backend has no tokenizer
    # Every stage resumes to a no-op: nothing generated, nothing written twice.
    before = {k: v.read_bytes() for k, v in f.items()}
    capsys.readouterr()
    run_stage(monkeypatch, "04_followup_answers.py", f"--in-file={f['03']}", f"--out-file={f['04']}",
              f"--rejected-file={f['04r']}")
    assert f"skipped {len(final)} as existing" in capsys.readouterr().out
    run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={f['01']}", f"--out-file={f['02']}",
              f"--rejected-file={f['02r']}")
    assert "kept 0 answers, rejected 0 (none), skipped 12 as existing" in capsys.readouterr().out
    run_stage(monkeypatch, "03_followup_questions.py", f"--in-file={f['02']}", f"--out-file={f['03']}",
              f"--rejected-file={f['03r']}")  # all done: the dedup is skipped too (no embedder here)
    assert f"skipped {len(answers)} as existing" in capsys.readouterr().out
    assert {k: v.read_bytes() for k, v in f.items()} == before
