"""What stage 07 reports on: loss curves, the offline riddle tasks for lm-eval, before/after tables.

read_train_log and plot_loss serve stage 05 too (one loss.png, loss against step).
"""

import math
import os
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from common import IM_END, render_chatml  # noqa: E402
from pipeline.knobs import InputError  # noqa: E402
from pipeline.records import read_jsonl, seed_of, write_jsonl_atomic  # noqa: E402

# -----------------------------------------------------------------------------
# Loss curves: stage 05's log.jsonl


def read_train_log(file):
    """Stage 05's log.jsonl as (train, evals): (step, epoch, loss) tuples sorted by step.

    Records with neither `loss` nor `eval_loss` (a run summary, say) are skipped.
    """
    train, evals = [], []
    for n, rec in enumerate(read_jsonl(file), 1):
        for key, out in (("loss", train), ("eval_loss", evals)):
            if key not in rec:
                continue
            values = (rec.get("step"), rec.get("epoch"), rec[key])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise InputError(f"{file}: record {n}: {key} record needs numbers in step, epoch and {key}")
            out.append((int(values[0]), float(values[1]), float(values[2])))
    if not train and not evals:
        raise InputError(f"{file}: no record has a loss or an eval_loss")
    return sorted(train), sorted(evals)


def best_eval(evals):
    """The (step, epoch, eval_loss) with the lowest finite eval loss (earliest on ties), or None."""
    finite = [e for e in evals if math.isfinite(e[2])]
    return min(finite, key=lambda e: (e[2], e[0])) if finite else None


def plot_loss(train, evals, file):
    """PNG of train and eval loss against step, epoch on the top axis, best eval step marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot([t[0] for t in train], [t[2] for t in train], lw=1, label="train loss")
    if evals:
        ax.plot([e[0] for e in evals], [e[2] for e in evals], "o-", label="eval loss")
    best = best_eval(evals)
    if best:
        ax.axvline(best[0], ls=":", color="red")
        ax.plot(best[0], best[2], "*", ms=14, color="red",
                label=f"best eval {best[2]:.4f} at step {best[0]:,} (epoch {best[1]:.2f})")
    points = sorted({(s, e) for s, e, _ in train + evals})
    (s0, e0), (s1, e1) = points[0], points[-1]
    if s1 > s0 and e1 > e0:  # a constant number of steps per epoch: epoch is linear in step
        rate = (e1 - e0) / (s1 - s0)
        top = ax.secondary_xaxis("top", functions=(lambda s: e0 + (s - s0) * rate, lambda e: s0 + (e - e0) / rate))
        top.set_xlabel("epoch")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file.with_suffix(".png.tmp"), format="png")  # aside, then renamed: never half a picture
    plt.close(fig)
    os.replace(file.with_suffix(".png.tmp"), file)


# -----------------------------------------------------------------------------
# The offline riddle tasks: lm-eval custom tasks over the held-out conversations


def riddle_docs(conversations, tokenizer, seed=0, n_choices=4):
    """Docs of the two offline riddle tasks, prompts rendered with CHATML_TEMPLATE.

    replies: one per assistant turn, {"id", "context", "target", "n_tokens"}: the conversation so
    far, the reference reply + <|im_end|>, and its length in `tokenizer`'s tokens.
    choices: one per conversation, {"id", "context", "choices", "label"}: its first reply among
    n_choices - 1 first replies of other riddles, drawn and shuffled with a seed per riddle.
    """
    replies, firsts = [], {}
    for conv in conversations:
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            context = render_chatml(msgs[:i], add_generation_prompt=True)[0]
            target = m["content"] + IM_END
            n = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            replies.append({"id": f"{conv['id']}/{i}", "context": context, "target": target, "n_tokens": n})
            firsts.setdefault(conv["id"], (context, m["content"]))
    pool = sorted({reply for _, reply in firsts.values()})
    choices = []
    for cid, (context, true) in firsts.items():
        others = [r for r in pool if r != true]
        if not others:
            continue
        rng = random.Random(seed_of(cid, seed))
        options = rng.sample(others, min(n_choices - 1, len(others))) + [true]
        rng.shuffle(options)
        choices.append({"id": cid, "context": context, "choices": [o + IM_END for o in options],
                        "label": options.index(true)})
    return replies, choices


# Written beside the tasks' YAML, where lm-eval's `!function` looks first: the saved tasks then
# run from any folder, as `lm_eval --include_path out/07_eval/tasks --tasks riddle_replies ...`.
TASK_MODULE = '''"""Docs and metrics of the riddle tasks (written by 07_evaluate.py), read from the files beside it."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def docs(name):
    lines = (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})


def replies(**metadata):
    return docs("riddle_replies")


def choices(**metadata):
    return docs("riddle_choice")


def reply_metrics(doc, results):
    """NLL per token of the reply (averaged over replies), and bits per byte (pooled)."""
    ll = results[0][0]
    return {"nll_per_token": -ll / doc["n_tokens"], "bits_per_byte": (ll, len(doc["target"].encode("utf-8")))}
'''

_RIDDLE_YAML = {
    "riddle_replies": """custom_dataset: !function riddle_tasks.replies
output_type: loglikelihood
doc_to_text: context
doc_to_target: target
process_results: !function riddle_tasks.reply_metrics
metric_list:
  - {metric: nll_per_token, aggregation: mean, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "riddle_choice": """custom_dataset: !function riddle_tasks.choices
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
}


def write_riddle_tasks(folder, replies, choices):
    """Write the riddle tasks as lm-eval YAML configs, their docs as JSONL and riddle_tasks.py beside
    them (no absolute path inside: the folder runs wherever it is copied); return the task names.

    A task without docs (choices need 2+ riddles) is left out and its old files removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "riddle_tasks.py").write_text(TASK_MODULE, encoding="utf-8")
    names = []
    for name, docs in (("riddle_replies", replies), ("riddle_choice", choices)):
        data, config = folder / f"{name}.jsonl", folder / f"{name}.yaml"
        if not docs:
            data.unlink(missing_ok=True)
            config.unlink(missing_ok=True)
            continue
        write_jsonl_atomic(data, docs)
        config.write_text(f"task: {name}\ntest_split: test\nnum_fewshot: 0\n{_RIDDLE_YAML[name]}metadata:\n"
                          "  version: 1.0\n", encoding="utf-8")
        names.append(name)
    return names


# -----------------------------------------------------------------------------
# Scores: lm-eval's results, base vs fine-tuned


def lm_eval_scores(results):
    """{task: {metric: {"value", "stderr"}}} from lm_eval.simple_evaluate's results (stderr None if absent)."""
    scores = {}
    for task, row in results["results"].items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            scores.setdefault(task, {})[metric] = {
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return scores


def compare_scores(base, tuned):
    """Rows (task, metric, base, tuned, delta, stderr of delta, flagged) for metrics both models have.

    The delta's stderr combines both as independent, sqrt(se_b^2 + se_t^2) (conservative, the
    items are shared); flagged means |delta| > 2 stderr. Without stderrs nothing is flagged.
    """
    rows = []
    for task in base:
        for metric, b in base[task].items():
            t = tuned.get(task, {}).get(metric)
            if t is None:
                continue
            delta = t["value"] - b["value"]
            se = None
            if b["stderr"] is not None and t["stderr"] is not None:
                se = (b["stderr"] ** 2 + t["stderr"] ** 2) ** 0.5
            rows.append({"task": task, "metric": metric, "base": b["value"], "tuned": t["value"], "delta": delta,
                         "stderr": se, "flagged": se is not None and abs(delta) > 2 * se})
    return rows


