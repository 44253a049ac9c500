"""The data card: what stages 01-04 (and the optional judge, 04b) kept and rejected, and what the
finished conversations look like.

write_card(folder) reads the stage files of `folder` by their fixed names (01_riddles.jsonl ...
04b_rejected.jsonl, and 03_closest.jsonl from stage 03's dedup) and writes report.md beside them,
with pictures where looking beats reading: report_stages.png (records kept and rejected per stage
and reason), report_lengths.png (lengths of the four turns), report_similarity.png (how close the
removed rewordings and the closest kept pairs were) and report_judge.png (04b's scores, once it
ran). Stages 04 and 04b call it when they are done; a stage whose files are absent is left out.
Deterministic: the same files give the same card.

    python -m pipeline.datacard                 # data/report.md, lengths in words
    python -m pipeline.datacard data smollm2    # lengths in tokens of a model's tokenizer (alias, folder or hub id)
"""

import os
import random
import sys
from collections import Counter

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from common import load_tokenizer  # noqa: E402
from pipeline.knobs import InputError  # noqa: E402
from pipeline.records import path, read_jsonl, write_text_atomic  # noqa: E402

STAGES = [  # stage, what it keeps, kept file, rejected file
    ("01", "riddles", "01_riddles.jsonl", "01_rejected.jsonl"),
    ("02", "answers", "02_answers.jsonl", "02_rejected.jsonl"),
    ("03", "follow-ups", "03_followups.jsonl", "03_rejected.jsonl"),
    ("04", "conversations", "04_conversations.jsonl", "04_rejected.jsonl"),
    ("04b", "judged conversations", "04b_judged.jsonl", "04b_rejected.jsonl"),  # the optional quality gate
]
TURNS = ("riddle", "answer", "follow-up", "follow-up answer")
JUDGED = (("score", "lowest"), ("answer", "answer"), ("follow_up", "follow-up"), ("second_answer", "second answer"))
REWORDED = ("reworded_seed", "reworded_duplicate")


def _records(file):
    """A JSONL file's records; [] when it is absent or empty (a stage that rejected nothing)."""
    return read_jsonl(file) if file.exists() and file.read_text(encoding="utf-8").strip() else []


def stage_counts(folder):
    """One row per stage whose output exists: {"stage", "what", "in", "kept", "reasons": Counter, "open"}.

    "in" is stage 01's candidate lines, else the previous stage's kept records; "open" counts
    those neither kept nor rejected yet (an interrupted run, or failed requests).
    """
    rows, previous = [], None
    for stage, what, kept_name, rejected_name in STAGES:
        if not (folder / kept_name).exists():
            previous = None
            continue
        kept = len(_records(folder / kept_name))
        reasons = Counter(r["reason"] for r in _records(folder / rejected_name))
        total_in = kept + sum(reasons.values()) if stage == "01" or previous is None else previous
        rows.append({"stage": stage, "what": what, "in": total_in, "kept": kept, "reasons": reasons,
                     "open": max(total_in - kept - sum(reasons.values()), 0)})
        previous = kept
    return rows


def turn_lengths(conversations, tokenizer=None):
    """{turn name: [length of that turn in each conversation]}, in tokens of `tokenizer`, else in words."""
    lengths = {}
    for i, name in enumerate(TURNS):
        texts = [c["messages"][i]["content"] for c in conversations if len(c["messages"]) > i]
        if tokenizer is None:
            lengths[name] = [len(t.split()) for t in texts]
        else:
            lengths[name] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return lengths


def judgements(judged, rejected):
    """{id: (kept, scores with "score" the lowest)} of 04b's judged records, kept or rejected as low_score."""
    found = {r["id"]: (True, {**r["judge"]["scores"], "score": r["judge"]["score"]}) for r in judged}
    found.update({r["id"]: (False, {**r["scores"], "score": r["score"]}) for r in rejected if r["reason"] == "low_score"})
    return found


def clusters(reworded):
    """Removed rewordings grouped by the riddle they reword: [(that riddle {"id", "text", "seed"}, [rewordings])],
    largest first (ties: in order of first appearance)."""
    groups = {}
    for r in reworded:
        key = r["duplicate_of"]["id"]
        groups.setdefault(key, (dict(r["duplicate_of"], seed=r["reason"] == "reworded_seed"), []))[1].append(r)
    return sorted(groups.values(), key=lambda g: -len(g[1]))


# -----------------------------------------------------------------------------
# Pictures


def _save(fig, file):
    fig.tight_layout()
    fig.savefig(file.with_suffix(".png.tmp"), format="png")  # aside, then renamed: never half a picture
    plt.close(fig)
    os.replace(file.with_suffix(".png.tmp"), file)


def plot_stages(rows, file):
    """One bar chart per stage: kept, each rejection reason, and the records not done yet."""
    heights = [2 + len(r["reasons"]) + bool(r["open"]) for r in rows]  # bars of each chart, its title
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.8 + 0.3 * sum(heights)), dpi=110, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, row in zip(axes[:, 0], rows):
        bars = [(f"kept ({row['what']})", row["kept"], "tab:green")]
        bars += [(reason, n, "tab:orange" if reason in REWORDED else "tab:gray") for reason, n in row["reasons"].most_common()]
        bars += [("not done yet", row["open"], "tab:blue")] if row["open"] else []
        names, values, colors = zip(*bars)
        ax.barh(range(len(bars)), values, color=colors)
        ax.set_yticks(range(len(bars)), names)
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
        ax.set_title(f"stage {row['stage']}: {row['in']:,} in, {row['kept']:,} kept", fontsize=10, loc="left")
        ax.set_xlim(0, max(values) * 1.15 + 1)
    _save(fig, file)


def plot_lengths(lengths, unit, file):
    """A histogram per turn, the median marked."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=110)
    for ax, (name, values) in zip(axes.flat, lengths.items()):
        if values:
            ax.hist(values, bins=min(30, max(len(set(values)), 1)), color="tab:blue")
            ax.axvline(np.median(values), ls=":", color="red", label=f"median {np.median(values):g}")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} ({len(values):,})", fontsize=10)
        ax.set_xlabel(unit)
    _save(fig, file)


def plot_similarity(reworded, closest, file):
    """Trick cosines (dedup.py) of the removed rewordings and of each kept riddle's closest one."""
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    bins = np.linspace(0, 1, 41)
    ax.hist([c["scores"]["trick"] for c in closest], bins=bins, alpha=0.6, color="tab:green",
            label=f"kept: closest seed or kept riddle ({len(closest):,})")
    ax.hist([r["scores"]["trick"] for r in reworded], bins=bins, alpha=0.6, color="tab:orange",
            label=f"removed as rewordings ({len(reworded):,})")
    ax.set_xlabel("trick cosine (riddle + explanation, answer hidden)")
    ax.set_ylabel("riddles")
    ax.legend(fontsize=8)
    _save(fig, file)


def plot_judge(found, file):
    """Bars of the scores 1-5, kept and rejected by 04b stacked: the lowest, then each of the three points."""
    fig, axes = plt.subplots(1, len(JUDGED), figsize=(11, 3), dpi=110, sharey=True)
    values = range(1, 6)
    for ax, (key, name) in zip(axes, JUDGED):
        kept = Counter(s[key] for k, s in found.values() if k)
        dropped = Counter(s[key] for k, s in found.values() if not k)
        ax.bar(values, [kept[v] for v in values], color="tab:green", label="kept")
        ax.bar(values, [dropped[v] for v in values], bottom=[kept[v] for v in values], color="tab:gray",
               label="rejected")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(values)
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("conversations")
    _save(fig, file)


# -----------------------------------------------------------------------------
# The card


def _one_line(text, limit=160):
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _answers(pair):
    return " / ".join(_one_line(a, 30) or "?" for a in pair["answers"])


def generator_tokenizer(backend, kind, name):
    """The generator's tokenizer for the card's lengths: the loaded hf backend's, else from local files only
    (a card never waits on the network); None (lengths in words) for a server or a tokenizer not at hand."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None and kind == "hf":
        try:
            tokenizer = load_tokenizer(name, local_files_only=True)
        except InputError:
            pass
    return tokenizer


def write_card(folder="data", tokenizer=None, tokenizer_name="", samples=5, seed=0, top=10):
    """Write report.md and its PNGs into `folder` from the stage files there; returns the report's path.

    Lengths count tokens of `tokenizer` (named tokenizer_name in the card), else words.
    """
    folder = path(folder)
    rows = stage_counts(folder)
    conversations = _records(folder / "04_conversations.jsonl")
    rejected_03 = _records(folder / "03_rejected.jsonl")
    reworded = [r for r in rejected_03 if r["reason"] in REWORDED]
    closest = _records(folder / "03_closest.jsonl")
    judged = judgements(_records(folder / "04b_judged.jsonl"), _records(folder / "04b_rejected.jsonl"))
    unit = f"tokens ({tokenizer_name or 'given'} tokenizer)" if tokenizer is not None else "words"

    card = [f"# Data card: {folder.name}/", ""]
    if rows:
        first, last = rows[0], rows[-1]
        card += [f"{last['kept']:,} {last['what']} (stage {last['stage']}) from {first['in']:,} "
                 f"{'candidate lines' if first['stage'] == '01' else 'records'} (stage {first['stage']}).", ""]
    card += ["## Records per stage", "",
             "in: stage 01's candidate lines, else the previous stage's kept records; not done: neither kept "
             "nor rejected yet (an interrupted run or failed requests).", "",
             "| stage | in | kept | rejected | not done | rejected by reason |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        reasons = ", ".join(f"{k} {v:,}" for k, v in r["reasons"].most_common()) or "none"
        card.append(f"| {r['stage']} {r['what']} | {r['in']:,} | {r['kept']:,} | {sum(r['reasons'].values()):,} | "
                    f"{r['open']:,} | {reasons} |")
    missing = [kept for stage, _, kept, _ in STAGES if stage != "04b" and not (folder / kept).exists()]
    card += [""] + ([f"Not found, left out: {', '.join(missing)}.", ""] if missing else [])
    if rows:
        plot_stages(rows, folder / "report_stages.png")
        card += ["![records kept and rejected per stage and reason](report_stages.png)", ""]

    if conversations:
        lengths = turn_lengths(conversations, tokenizer)
        card += [f"## Lengths of the {len(conversations):,} conversations, in {unit}", "",
                 "| turn | records | median | 90th percentile | max |", "|---|---:|---:|---:|---:|"]
        for name, values in lengths.items():
            if values:
                card.append(f"| {name} | {len(values):,} | {np.median(values):g} | "
                            f"{np.percentile(values, 90, method='lower'):g} | {max(values):,} |")
        plot_lengths(lengths, unit, folder / "report_lengths.png")
        card += ["", "![length of each turn](report_lengths.png)", ""]

    if reworded or closest:
        groups = clusters(reworded)
        on_seed = sum(r["reason"] == "reworded_seed" for r in reworded)
        removed = (f"{len(reworded):,} riddles removed as rewordings: {on_seed:,} of a seed, "
                   f"{len(reworded) - on_seed:,} of an earlier riddle, in {len(groups):,} clusters (a seed or kept "
                   "riddle and its removed rewordings)." if reworded else "No riddle was removed as a rewording.")
        card += ["## Reworded duplicates (stage 03, dedup.py)", "",
                 f"{removed} Cosines: trick = riddle + explanation with the answer hidden, riddle = the riddle "
                 "alone; answers: the short answers found in the replies (? where none was found).", ""]
        if groups:
            card += [f"### Largest clusters (of {len(groups):,})", ""]
            for head, members in groups[:5]:
                card.append(f"- {'seed' if head['seed'] else 'kept'}: {_one_line(head['text'])}")
                card += [f"  - removed (trick {m['scores']['trick']:.2f}, answers {_answers(m)}): "
                         f"{_one_line(m['text'])}" for m in members]
            card.append("")
        if closest:
            near = sorted(closest, key=lambda c: (-c["scores"]["trick"], c["id"]))[:top]
            card += [f"### Closest pairs kept (top {len(near)} of {len(closest):,} by trick cosine)", "",
                     "| riddle | closest (seed or kept) | trick | riddle cos | answers | kept because |",
                     "|---|---|---:|---:|---|---|"]
            card += [f"| {_one_line(c['text'], 100)} | {_one_line(c['closest']['text'], 100)}"
                     f"{' (seed)' if c['closest']['seed'] else ''} | {c['scores']['trick']:.2f} | "
                     f"{c['scores']['question']:.2f} | {_answers(c)} | {c['kept_because']} |" for c in near]
            card.append("")
        plot_similarity(reworded, closest, folder / "report_similarity.png")
        card += ["![trick cosines: removed rewordings and closest kept pairs](report_similarity.png)", ""]

    if judged:
        card += ["## Judge scores (stage 04b)", "",
                 f"{len(judged):,} conversations judged (unreadable judgements left out: see 04b's row above); "
                 "each point scored 1-5, the conversation's score is the lowest.", "",
                 "| score | " + " | ".join(name for _, name in JUDGED) + " |", "|---:|" + "---:|" * len(JUDGED)]
        for v in range(5, 0, -1):
            card.append(f"| {v} | " + " | ".join(f"{sum(s[key] == v for _, s in judged.values()):,}"
                                                  for key, _ in JUDGED) + " |")
        plot_judge(judged, folder / "report_judge.png")
        card += ["", "![judge scores](report_judge.png)", ""]

    if conversations:
        shown = random.Random(seed).sample(sorted(conversations, key=lambda c: c["id"]), min(samples, len(conversations)))
        card += [f"## {len(shown)} random conversations (seed {seed})", ""]
        for c in shown:
            card += [f"### {c['id']}", ""]
            for m in c["messages"]:
                card += [f"> **{m['role']}:** " + "\n> ".join(m["content"].splitlines()), ">"]
            card[-1] = ""
            if c["id"] in judged:
                kept, s = judged[c["id"]]
                card += [f"Judge: {s['score']} ({', '.join(f'{name} {s[key]}' for key, name in JUDGED[1:])}), "
                         f"{'kept' if kept else 'rejected'}.", ""]

    file = folder / "report.md"
    write_text_atomic(file, "\n".join(card))
    return file


if __name__ == "__main__":
    name = sys.argv[2] if len(sys.argv) > 2 else ""
    print(f"wrote {write_card(sys.argv[1] if len(sys.argv) > 1 else 'data', load_tokenizer(name) if name else None, name)}")
