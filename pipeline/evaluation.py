"""What stage 07 reports on: loss curves, the offline riddle tasks for lm-eval, before/after tables, the
sample turns, and the judged win rate (a judge's verdicts on pairs of replies, read and counted).

read_train_log and plot_loss serve stage 05 too (one loss.png, loss against step).
"""

import hashlib
import json
import math
import os
import random
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from common import ALIASES, CACHE, IM_END, render_chatml  # noqa: E402
from pipeline.knobs import InputError  # noqa: E402
from pipeline.records import Appender, control_string, path, read_jsonl, seed_of, write_jsonl_atomic  # noqa: E402

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


# -----------------------------------------------------------------------------
# Sample turns: what each model is asked, from a held-out conversation


def sample_turns(messages):
    """A held-out conversation's turns for the models to answer, or None when no user turn has a reply.

    {"prompt": the messages up to the first user turn (a system message kept), "reference": the reply
    to it, "follow_up": the next user turn, "reference2": its reply}; the last two are None in a
    one-turn conversation.
    """
    u = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if u is None or u + 1 >= len(messages) or messages[u + 1]["role"] != "assistant":
        return None
    more = messages[u + 2:u + 4]
    two = [m["role"] for m in more] == ["user", "assistant"]
    return {"prompt": messages[:u + 1], "reference": messages[u + 1]["content"],
            "follow_up": more[0]["content"] if two else None, "reference2": more[1]["content"] if two else None}


# -----------------------------------------------------------------------------
# The judged win rate: base and fine-tuned answer the same riddles, a judge compares each pair in both orders


def win_rate_riddles(conversations, n, seed=0):
    """Up to n held-out riddles {"id", "prompt", "riddle"}: each conversation's first user turn (sample_turns), one
    per id, in an order set by a hash of id and seed alone, so a larger n keeps a smaller one's riddles (and their
    judged pairs)."""
    items, seen = [], set()
    for conv in conversations:
        turns = sample_turns(conv["messages"])
        if turns is None or conv["id"] in seen:
            continue
        seen.add(conv["id"])
        items.append({"id": conv["id"], "prompt": turns["prompt"], "riddle": turns["prompt"][-1]["content"]})
    items.sort(key=lambda it: (seed_of(it["id"], seed, "win rate"), it["id"]))
    return items[:n]


def model_fingerprint(name):
    """What names a model's weights in the win rate's caches: a local folder (or a converted alias) by its weight and
    JSON files' names, sizes and modification times, so a folder saved again (a new merge) is a new model; a hub id
    by its name."""
    folder = CACHE / name if name in ALIASES else path(name)
    if not folder.is_dir():
        return name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return name + "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def setup_key(*parts):
    """12 hex digits naming a setup (models, settings): the caches' records carry it, and count only under it."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]


class KeyedCache:
    """A JSONL file of records, each under a "key", read back whole (records: key -> record) and appended to
    crash-safely (Appender: a torn last line is repaired at open). With overwrite the old records are ignored and
    the file is emptied at the first add."""

    def __init__(self, file, overwrite=False):
        self.appender = Appender(file, overwrite=overwrite, key="key")
        file = Path(file)
        fresh = overwrite or not file.exists() or not file.stat().st_size
        self.records = {} if fresh else {r["key"]: r for r in read_jsonl(file)}

    def add(self, records):
        if records:
            self.appender.write(records)
            self.records.update((r["key"], r) for r in records)

    def close(self):
        self.appender.close()


def defuse(text, tokenizer=None):
    """text with each control-token string (CONTROL_STRINGS, and the tokenizer's own special tokens) broken by a
    zero-width space after its first character: a reply quoted in a judge's prompt stays text, never a turn marker."""
    while (found := control_string(text, tokenizer)) and len(found) > 1:
        text = text.replace(found, found[0] + "\u200b" + found[1:])
    return text


def judge_prompt(template, riddle, reply_a, reply_b, tokenizer=None):
    """The judge's chat prompt (one user message) for one order of a pair; an empty reply reads "(no reply)"."""
    fields = {k: defuse(v.strip() or "(no reply)", tokenizer)
              for k, v in (("riddle", riddle), ("reply_a", reply_a), ("reply_b", reply_b))}
    return [{"role": "user", "content": template.format(**fields)}]


# A label starts the text, a line, or a part after , ; | . { (one-line and JSON replies); markdown is dropped first.
_MARKUP = re.compile(r"\*\*?|`|__|^\s*#+\s*|^\s*(?:[-+\u2022]|\d{1,2}[.)])\s+", re.M)
_START = r"(?:^|[,;|.{]\s*)[\"']?"
_SEP = r"[\"']?\s*[:=\-\u2013]\s*"
_WINNER = re.compile(_START + r"(?:winner|better[\s_-]*reply|verdict)" + _SEP, re.I | re.M)
_REASON = re.compile(_START + r"(?:reasons?|explanation|justification|why)" + _SEP, re.I | re.M)
_CHOICE = re.compile(r"[\"'\[(]?(?:(?:reply|response|assistant)\s+)?"
                     r"(?:(?P<letter>(?-i:[AB]))|tie|draw|equal|both|neither)(?![\w'])", re.I)
_NAMES = {"A": re.compile(r"\bA\b|\b(?i:tie|draw)\b"), "B": re.compile(r"\bB\b|\b(?i:tie|draw)\b")}


def parse_verdict(text):
    """A judge's reply -> ("A" | "B" | "tie", reason), or None when it names no winner or its winner line names
    another choice too ("winner: A, B or tie", the prompt's format echoed; "winner: B is better than A" reads None
    as well: nothing is guessed). The first winner label counts; the reason ("" if none) runs from its label to the
    next winner label or the end, on one line."""
    text = _MARKUP.sub("", text)
    label = _WINNER.search(text)
    if not label:
        return None
    line = text[label.end():].split("\n", 1)[0]
    cut = _REASON.search(line)
    line = line[:cut.start()] if cut else line
    choice = _CHOICE.match(line)
    if not choice:
        return None
    verdict = choice.group("letter").upper() if choice.group("letter") else "tie"
    if verdict != "tie" and _NAMES["B" if verdict == "A" else "A"].search(line[choice.end():]):
        return None
    reason = ""
    found = _REASON.search(text)
    if found:
        later = _WINNER.search(text, found.end())
        reason = " ".join(text[found.end():later.start() if later else len(text)].split()).strip("\"',;|{}[] ")
    return verdict, reason[:500]


# Which model won, by the order of the pair (A = the first named) and the judge's pick.
ORDERS = ("base_first", "tuned_first")
_WINNER_OF = {"base_first": {"A": "base", "B": "tuned", "tie": "tie"},
              "tuned_first": {"A": "tuned", "B": "base", "tie": "tie"}}


def winner(order, verdict):
    """The model a verdict ("A", "B", "tie") picks in an order of ORDERS: "base", "tuned" or "tie"; None for None."""
    return None if verdict is None else _WINNER_OF[order][verdict]


def pair_outcome(base_first, tuned_first):
    """The pair's outcome for the fine-tuned model from the verdicts of its two orders (A = base, then A = tuned):
    "win" or "loss" only when both orders pick the same model, else "tie"; None when either verdict is None."""
    if base_first is None or tuned_first is None:
        return None
    first, second = _WINNER_OF["base_first"][base_first], _WINNER_OF["tuned_first"][tuned_first]
    if first == second != "tie":
        return "win" if first == "tuned" else "loss"
    return "tie"


def wilson(score, n, z=1.959964):
    """Wilson score interval (95% at the default z) of the proportion score / n, or None for n = 0. A score of
    wins + ties / 2 gives a conservative interval: a tie spreads less than a coin flip."""
    if n <= 0:
        return None
    p = score / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _share(k, n):
    return k / n if n else None


def summarize_win_rate(pairs, examples=5):
    """Counts of judged pairs ({"id", "riddle", "base", "tuned", "base_first", "tuned_first"}: the two replies and the
    judge's reply {"text", "ended"} in each order), verdicts read again with parse_verdict.

    wins, ties and losses count pairs whose two judgements both parse; win_rate = (wins + ties / 2) / judged with a
    Wilson interval. A pair with an unparseable judgement counts in none of them: its judgements are listed under
    unparsed. position: the judge's picks by position over all parsed judgements (share_a: picked A of those that
    picked a side, in all and by which model stood in A) and agree: judged pairs whose two orders named one winner.
    """
    counts = {"win": 0, "tie": 0, "loss": 0}
    picks = {order: {"A": 0, "B": 0, "tie": 0} for order in ORDERS}
    unparsed, shown, agree = [], [], 0
    for pair in pairs:
        verdicts = {}
        for order in ORDERS:
            parsed = parse_verdict(pair[order]["text"])
            verdicts[order] = parsed
            if parsed is None:
                unparsed.append({"id": pair["id"], "order": order, "text": pair[order]["text"]})
            else:
                picks[order][parsed[0]] += 1
        outcome = pair_outcome(*(verdicts[o] and verdicts[o][0] for o in ORDERS))
        if outcome is None:
            continue
        counts[outcome] += 1
        agree += len({winner(o, verdicts[o][0]) for o in ORDERS}) == 1
        if len(shown) < examples:
            shown.append({"id": pair["id"], "riddle": pair["riddle"], "base": pair["base"], "tuned": pair["tuned"],
                          "outcome": outcome, **{o: {"verdict": verdicts[o][0], "winner": winner(o, verdicts[o][0]),
                                                     "reason": verdicts[o][1]} for o in ORDERS}})
    judged = sum(counts.values())
    score = counts["win"] + counts["tie"] / 2
    a = {o: picks[o]["A"] for o in ORDERS}
    sided = {o: picks[o]["A"] + picks[o]["B"] for o in ORDERS}
    return {
        "pairs": len(pairs), "judged": judged, "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
        "unparsed_pairs": len({u["id"] for u in unparsed}), "unparsed_judgements": len(unparsed),
        "win_rate": _share(score, judged), "interval": wilson(score, judged),
        "interval_method": "Wilson score interval, 95%, a tie counted as half a win",
        "position": {"picks": picks, "share_a": _share(sum(a.values()), sum(sided.values())),
                     "share_a_base_in_a": _share(a["base_first"], sided["base_first"]),
                     "share_a_tuned_in_a": _share(a["tuned_first"], sided["tuned_first"]),
                     "agree": agree, "agree_share": _share(agree, judged)},
        "examples": shown, "unparsed": unparsed,
    }
