"""Stage 07: did fine-tuning teach riddles without losing knowledge? Base vs fine-tuned.

Four views, written to one report that reads on its own:
- loss curves from stage 05's log (train and eval loss against step and epoch, best eval marked);
- an offline riddle task over the held-out conversations, run by lm-evaluation-harness as a
  custom task from local files: riddle_replies (NLL per token and bits per byte of each
  reference assistant reply given the conversation so far) and riddle_choice (pick the true
  first reply among replies of other held-out riddles: acc, acc_norm). Both models see the
  prompts in the fine-tuned model's ChatML, even a base model that never learned it;
- zero-shot benchmarks (arc_challenge, arc_easy, hellaswag, piqa, winogrande) without a chat
  template by default; a task whose data cannot be downloaded is skipped with a one-line note;
- sample conversations: held-out riddles and the reference follow-up question, both models
  decoding with the same seeded settings; replies without <|im_end|> are flagged.

Reads:  out/05_adapter/eval.jsonl  {"id", "messages": [user, assistant, user, assistant]}
        out/05_adapter/log.jsonl   {"step", "epoch", "loss"} or {"step", "epoch", "eval_loss"}
        out/05_adapter/run.json    {"student": base model name, "data": conversations file, ...}
        data/report.md             stage 04's data card beside that file, linked when it exists
        out/06_merged/             the fine-tuned model
Writes: out/07_eval/report.md, results.json (all numbers), loss.png,
        tasks/ (the riddle tasks' lm-eval YAML and JSONL, rewritten each run)

    python 07_evaluate.py
    python 07_evaluate.py --limit=20 --samples=2 --tasks=arc_easy,piqa,my_task.yaml

Offline (the hub unreachable), each benchmark without cached data is one line in the report.
No resume: it reruns from the start and replaces the outputs only once all is done.
Runtime: ~1.7 min on one H200 without the benchmarks (not measured); the CPU demo ~0.7 min on 2 cores.
"""

import gc
import os
import random
import re
import socket
import time
from urllib.parse import urlparse

from common import chat_replies, load_model, load_tokenizer
from pipeline.evaluation import (best_eval, compare_scores, lm_eval_scores, plot_loss, read_train_log, riddle_docs,
                                 write_riddle_tasks)
from pipeline.knobs import configure
from pipeline.records import (check_output, check_paths, path, read_conversations, read_json, require_stage, seed_of,
                              write_json_atomic, write_text_atomic)

# -----------------------------------------------------------------------------
ADAPTER = "out/05_adapter"  # stage 05's folder: eval.jsonl, log.jsonl, run.json
MERGED = "out/06_merged"  # the fine-tuned model (stage 06's output): folder, hub id or alias
STUDENT = ""  # the model before fine-tuning; "" = "student" of ADAPTER/run.json, else microsoft/phi-2
EVAL_DIR = "out/07_eval"  # this stage's output: report.md, results.json, loss.png, tasks/
TASKS = ["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"]  # lm-eval task names or YAML paths, comma list
LIMIT = 0  # docs per task, riddle tasks included; 0 = all
APPLY_CHAT_TEMPLATE = False  # wrap the benchmarks in each model's chat template (shifts scores)
BATCH_SIZE = 8  # lm-eval batch size
N_CHOICES = 4  # answers offered per riddle_choice question (1 true, the rest from other riddles)
SAMPLES = 5  # held-out conversations shown base vs fine-tuned
MAX_NEW_TOKENS = 256  # tokens per sample reply
TEMPERATURE = 0.7  # sample decoding; 0 = greedy
TOP_P = 0.9  # nucleus of sample decoding
SEED = 0  # distractors, choice of samples, decoding
# -----------------------------------------------------------------------------
configure(globals())
started = time.time()
adapter, out_dir = path(ADAPTER), path(EVAL_DIR)
check_paths({"adapter": adapter, "merged": path(MERGED)}, {"eval-dir": out_dir})

# %% Inputs: everything is checked before a model loads or an output is touched
require_stage(adapter / "eval.jsonl", "05_finetune_phi2.py")
require_stage(adapter / "log.jsonl", "05_finetune_phi2.py")
held_out = read_conversations(adapter / "eval.jsonl")
train_log, eval_log = read_train_log(adapter / "log.jsonl")
best = best_eval(eval_log)
print(f"held-out conversations: {len(held_out):,}; log: {len(train_log):,} train and {len(eval_log):,} eval points")

run_file = adapter / "run.json"
run_info = read_json(run_file) if run_file.exists() else {}
base_name = STUDENT or run_info.get("student") or "microsoft/phi-2"
# The data card (pipeline/datacard.py) that stage 04 wrote beside the conversations 05 trained on, if any.
data_card = path(run_info["data"]).parent / "report.md" if isinstance(run_info.get("data"), str) else None
check_output(out_dir, folder=True)


if not path(MERGED).exists() and path(MERGED).parent.is_dir():  # meant as a local folder, not a hub id
    require_stage(path(MERGED), "06_merge_and_chat.py")

# %% The benchmarks download their data from the hub; offline, fail at once instead of retrying for minutes.
# Before anything imports huggingface_hub: it reads HF_HUB_OFFLINE once, on import.
if TASKS and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"{host} unreachable: benchmarks use the local dataset cache only")

models = {"base": base_name, "tuned": MERGED}
tokenizers = {key: load_tokenizer(name) for key, name in models.items()}
print(f"base: {base_name}   fine-tuned: {MERGED}")

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

# %% Tasks: the riddle tasks from local files, then each benchmark on its own so one failure skips one task
replies, choices = riddle_docs(held_out, tokenizers["tuned"], seed=SEED, n_choices=N_CHOICES)
riddle_names = write_riddle_tasks(out_dir / "tasks", replies, choices)
print(f"riddle tasks: {len(replies):,} replies, {len(choices):,} choice questions")
manager = TaskManager(include_path=str(out_dir / "tasks"), include_defaults=bool(TASKS))
riddle_tasks = manager.load(riddle_names)["tasks"]
bench_tasks, unavailable = {}, {}
for name in TASKS:
    try:
        bench_tasks.update(manager.load([name])["tasks"])
    except Exception as e:  # no network, a gated dataset, an unknown name: note it and go on
        unavailable[name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        print(f"{name}: skipped, {unavailable[name]}")
print(f"benchmarks: {len(bench_tasks):,} of {len(TASKS):,} loaded")

# %% Evaluate each model in turn (one in memory at a time): lm-eval tasks, then sample conversations
with_follow_up = sorted((c for c in held_out if len(c["messages"]) >= 4), key=lambda c: c["id"])
shown = random.Random(SEED).sample(with_follow_up, min(SAMPLES, len(with_follow_up)))
scores, samples, seconds, device = {}, {}, {}, ""
for key, name in models.items():
    t0 = time.time()
    model, tok = load_model(name), tokenizers[key]
    device = f"{model.device.type}, {str(model.dtype).replace('torch.', '')}"
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH_SIZE)
    kwargs = dict(model=lm, task_manager=manager, num_fewshot=0, limit=LIMIT or None, bootstrap_iters=1000,
                  log_samples=False)
    # The riddle prompts already are ChatML text: a chat template on top would wrap them twice.
    result = lm_eval.simple_evaluate(tasks=list(riddle_tasks.values()), apply_chat_template=False, **kwargs)
    scores[key] = lm_eval_scores(result)
    if bench_tasks:
        result = lm_eval.simple_evaluate(tasks=list(bench_tasks.values()), apply_chat_template=APPLY_CHAT_TEMPLATE,
                                         **kwargs)
        scores[key].update(lm_eval_scores(result))
    t1 = time.time()
    sampling = dict(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P)
    first = chat_replies(model, tok, [c["messages"][:1] for c in shown], [seed_of(c["id"], SEED) for c in shown],
                         **sampling)
    # The follow-up turn: the model's own first reply, then the reference follow-up question.
    prompts = [[c["messages"][0], {"role": "assistant", "content": r}, c["messages"][2]]
               for c, (r, _) in zip(shown, first)]
    second = chat_replies(model, tok, prompts, [seed_of(c["id"], SEED, 2) for c in shown], **sampling)
    samples[key] = [{"reply": r1, "ended": e1, "reply2": r2, "ended2": e2} for (r1, e1), (r2, e2) in zip(first, second)]
    seconds[key] = round(time.time() - t0, 1)
    print(f"{key}: {name} evaluated in {seconds[key]:,.1f} s (samples {time.time() - t1:,.1f} s)")
    del lm, model
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

rows = compare_scores(scores["base"], scores["tuned"])

# %% Report: settings, tables, the loss picture, the samples; written last so a failed run leaves the old one
LOWER_IS_BETTER = {"nll_per_token", "bits_per_byte", "perplexity", "word_perplexity", "byte_perplexity"}


def cell(text):
    # Control characters (a random or broken model emits them) would make the file binary.
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return text.replace("|", "\\|").replace("\n", "<br>")


def show(text, ended):
    return (cell(text) or "*(empty)*") + ("" if ended else "<br>**no `<\\|im_end\\|>`**")  # in a table cell


def table(rows_of_task):
    lines = ["| task | metric | base | fine-tuned | delta | stderr of delta | > 2 stderr |",
             "|---|---|---:|---:|---:|---:|:---:|"]
    for r in rows_of_task:
        arrow = "lower is better" if r["metric"] in LOWER_IS_BETTER else "higher is better"
        se = f"{r['stderr']:.4f}" if r["stderr"] is not None else "n/a"
        lines.append(f"| {r['task']} | {r['metric']} ({arrow}) | {r['base']:.4f} | {r['tuned']:.4f} | "
                     f"{r['delta']:+.4f} | {se} | {'**yes**' if r['flagged'] else ''} |")
    return "\n".join(lines)


riddle_rows = [r for r in rows if r["task"] in riddle_names]
bench_rows = [r for r in rows if r["task"] not in riddle_names]
flagged = [f"{r['task']} {r['metric']} {r['delta']:+.4f}" for r in bench_rows if r["flagged"]]
limit_text = f"{LIMIT:,} docs per task" if LIMIT else "all docs"


def used(n):
    return f"{min(n, LIMIT):,} of {n:,}" if LIMIT and LIMIT < n else f"{n:,}"


scored = {r["metric"]: r for r in riddle_rows}
riddle_summary = ", ".join(f"{m} {scored[m]['base']:.3f} -> {scored[m]['tuned']:.3f}"
                           + (" (> 2 stderr)" if scored[m]["flagged"] else "")
                           for m in ("nll_per_token", "acc") if m in scored)
bench_summary = (f"{len(bench_rows):,} scores compared, {len(flagged):,} moved by more than 2 stderr"
                 + (f" ({'; '.join(flagged)})" if flagged else "")
                 + f"; {len(unavailable):,} of {len(TASKS):,} tasks not run (task or data could not be loaded)")
report = [
    f"# Evaluation: {base_name} (base) vs {MERGED} (fine-tuned)", "",
    f"Riddle task: {riddle_summary or 'no scores'}. Benchmarks: {bench_summary}.", "",
    "## Settings", "", "| setting | value |", "|---|---|",
    f"| base model | {base_name} |", f"| fine-tuned model | {MERGED} |",
    f"| held-out conversations | {len(held_out):,} ({ADAPTER}/eval.jsonl) |",
    *([f"| training data | {run_info['data']}, described in its [data card]"
       f"({os.path.relpath(data_card, out_dir)}) |"] if data_card and data_card.exists() else []),
    f"| harness | lm-evaluation-harness {lm_eval.__version__}, `hf` model, zero-shot, {limit_text}, "
    f"batch {BATCH_SIZE} |",
    "| chat template on benchmarks | "
    + ("yes: each model its own |" if APPLY_CHAT_TEMPLATE else "no (plain prompts, as the published scores) |"),
    "| riddle prompts | the fine-tuned model's ChatML (`<\\|im_start\\|>role ... <\\|im_end\\|>`) for both models, "
    "so the base model is scored on a format it may never have seen |",
    f"| device | {device} |",
    f"| sample decoding | temperature {TEMPERATURE}, top-p {TOP_P}, up to {MAX_NEW_TOKENS:,} new tokens, "
    f"seed {SEED} per riddle |",
    f"| runtime | base {seconds['base']:,.0f} s, fine-tuned {seconds['tuned']:,.0f} s, "
    f"total {time.time() - started:,.0f} s |", "",
    "## Riddle task (held-out conversations, offline)", "",
    f"- riddle_replies ({used(len(replies))} replies): each reference assistant reply (and its `<|im_end|>`) "
    "scored given the conversation so far. nll_per_token: negative log-likelihood per token, averaged over "
    "replies; tokens counted with the fine-tuned tokenizer for both models, so the two share one denominator. "
    "bits_per_byte: the same log-likelihood pooled over all replies per UTF-8 byte (no stderr).",
    f"- riddle_choice ({used(len(choices))} questions): the true first reply among {N_CHOICES - 1} first replies "
    f"of other held-out riddles (chance {1 / N_CHOICES:.2f}); acc picks the highest log-likelihood, acc_norm the "
    "highest per character.",
    "", table(riddle_rows) if riddle_rows else "No riddle scores.", "",
    "## Benchmarks (zero-shot)", "",
    table(bench_rows) if bench_rows else "No benchmark ran.", "",
    *[f"- {name}: not run, task or data could not be loaded ({note})" for name, note in unavailable.items()],
    "", "The stderr of a delta treats the two runs as independent (conservative: both saw the same items).", "",
    "## Loss curves (stage 05)", "", "![train and eval loss](loss.png)", "",
]
if train_log:
    report.append(f"- train loss: {train_log[0][2]:.4f} at step {train_log[0][0]:,} -> "
                  f"{train_log[-1][2]:.4f} at step {train_log[-1][0]:,} (epoch {train_log[-1][1]:.2f})")
if best:
    last = eval_log[-1]
    report.append(f"- eval loss: best {best[2]:.4f} at step {best[0]:,} (epoch {best[1]:.2f}); "
                  f"last {last[2]:.4f} at step {last[0]:,} (epoch {last[1]:.2f})")
    if last[2] > best[2]:
        report.append(f"- eval loss rose {last[2] - best[2]:.4f} after the best step: later steps overfit; "
                      "the checkpoint of the best epoch may be the better model")
report += ["", "## Samples", "",
           f"{len(shown):,} held-out riddles, both models with the same seeded decoding. The second turn feeds "
           "each model its own first reply, then the reference follow-up question. "
           f"**no `<|im_end|>`** marks a reply that did not end its turn within {MAX_NEW_TOKENS:,} new tokens.", ""]
for i, conv in enumerate(shown):
    m = conv["messages"]
    b, t = samples["base"][i], samples["tuned"][i]

    report += [f"### {i + 1}. {conv['id']}", "", f"**Riddle:** {cell(m[0]['content'])}", "",
               "| turn | reference | base | fine-tuned |", "|---|---|---|---|",
               f"| reply | {cell(m[1]['content'])} | {show(b['reply'], b['ended'])} | {show(t['reply'], t['ended'])} |",
               f"| follow-up: {cell(m[2]['content'])} | {cell(m[3]['content'])} | {show(b['reply2'], b['ended2'])} | "
               f"{show(t['reply2'], t['ended2'])} |", ""]

results = {
    "settings": {k: globals()[k] for k in ("ADAPTER", "MERGED", "STUDENT", "TASKS", "LIMIT", "APPLY_CHAT_TEMPLATE",
                                           "BATCH_SIZE", "N_CHOICES", "SAMPLES", "MAX_NEW_TOKENS", "TEMPERATURE",
                                           "TOP_P", "SEED")} | {"base_model": base_name, "device": device,
                                                                 "lm_eval": lm_eval.__version__},
    "riddle_docs": {"replies": len(replies), "choices": len(choices)},
    "scores": scores, "comparison": rows, "unavailable": unavailable,
    "loss": {"train": train_log, "eval": eval_log, "best": best},
    "samples": [{"id": c["id"], "messages": c["messages"], "base": samples["base"][i], "tuned": samples["tuned"][i]}
                for i, c in enumerate(shown)],
    "seconds": seconds | {"total": round(time.time() - started, 1)},
}
plot_loss(train_log, eval_log, out_dir / "loss.png")
write_json_atomic(out_dir / "results.json", results)
write_text_atomic(out_dir / "report.md", "\n".join(report) + "\n")

print(f"wrote {out_dir / 'report.md'}: riddle {riddle_summary}; benchmarks: {bench_summary}; "
      f"{time.time() - started:,.0f} s")
