"""Stage 07: did fine-tuning teach riddles without losing knowledge? Base vs fine-tuned.

Five views, written to one report that reads on its own:
- loss curves from stage 05's log (train and eval loss against step and epoch, best eval marked);
- an offline riddle task over the held-out conversations, run by lm-evaluation-harness as a
  custom task from local files: riddle_replies (NLL per token and bits per byte of each
  reference assistant reply given the conversation so far) and riddle_choice (pick the true
  first reply among replies of other held-out riddles: acc, acc_norm). Both models see the
  prompts in the fine-tuned model's ChatML, even a base model that never learned it;
- zero-shot benchmarks (arc_challenge, arc_easy, hellaswag, piqa, winogrande) without a chat
  template by default; a task whose data cannot be downloaded is skipped with a one-line note;
- sample conversations: held-out riddles and the reference follow-up question (where the conversation
  has one), both models decoding with the same seeded settings; replies without <|im_end|> are flagged;
- a judged win rate: both models answer WIN_RATE_N held-out riddles (their first user turn) with the
  same seeded settings, and a judge (JUDGE, the generator by default) compares each pair twice, the
  replies' positions swapped; a pair is a win or a loss only when both orders agree, else a tie.
  Reported: wins/ties/losses, (wins + ties/2) / judged pairs with a 95% Wilson interval, the judge's
  reasons on five pairs, how often it picked position A, and each judgement it gave in no readable form.

Reads:  out/05_adapter/eval.jsonl  {"id", "messages": [user, assistant] or [user, assistant, user, assistant]}
        out/05_adapter/log.jsonl   {"step", "epoch", "loss"} or {"step", "epoch", "eval_loss"}
        out/05_adapter/run.json    {"student": base model name, "data": conversations file, ...}
        data/report.md             stage 04's data card beside that file, linked when it exists
        out/06_merged/             the fine-tuned model (a merged one: 06's output, not 05's adapter folder)
Writes: out/07_eval/report.md, results.json (all numbers), loss.png,
        tasks/ (the riddle tasks' lm-eval YAML and JSONL, rewritten each run),
        winrate_replies.jsonl  {"key", "model": base|tuned, "id", "reply", "ended"}: each model's reply per riddle
        judged.jsonl           {"key", "id", "judge", "riddle", "base", "base_ended", "tuned", "tuned_ended",
                               "base_first", "tuned_first", "outcome"}:
                               a judged pair, the judge's reply {"text", "ended", "verdict", "winner", "reason"}
                               in each order (base_first: the base's reply is A)

    python 07_evaluate.py
    python 07_evaluate.py --limit=20 --samples=2 --tasks=arc_easy,piqa,my_task.yaml
    python 07_evaluate.py --judge-backend=openai --judge-base-url=http://localhost:8000/v1 --win-rate-n=300

Offline (the hub unreachable), each benchmark without cached data is one line in the report, and so is
the win rate when its judge is a hub id not in the local cache (or cannot be loaded at all).
Resume: the win rate's replies and judged pairs are appended as they finish; a rerun with the same models,
settings and judge reuses them and judges only the missing pairs (a failed judge request is retried; an
unreadable judgement is kept as it is: --overwrite judges all again). Records of another setup stay in the
files and are ignored. The rest reruns from the start and replaces the outputs only once all is done.
Runtime: ~1.7 min on one H200 for the riddle tasks and samples (the benchmarks and the win rate not measured);
the CPU demo ~0.7 min on 2 cores.
"""

import gc
import os
import random
import re
import socket
import time
from urllib.parse import urlparse

from common import ALIASES, chat_replies, load_backend, load_model, load_tokenizer
from pipeline.evaluation import (ORDERS, KeyedCache, best_eval, compare_scores, judge_prompt, lm_eval_scores,
                                 model_fingerprint, pair_outcome, parse_verdict, plot_loss, read_train_log, riddle_docs,
                                 sample_turns, setup_key, summarize_win_rate, win_rate_riddles, winner,
                                 write_riddle_tasks)
from pipeline.knobs import InputError, check_template, configure
from pipeline.records import (as_reply, check_output, check_paths, path, read_conversations, read_json, require_stage,
                              seed_of, write_json_atomic, write_text_atomic)

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
SAMPLES = 5  # held-out conversations shown base vs fine-tuned; 0 = none
MAX_NEW_TOKENS = 256  # tokens per reply (samples and win rate)
TEMPERATURE = 0.7  # reply decoding (samples and win rate); 0 = greedy
TOP_P = 0.9  # nucleus of reply decoding
SEED = 0  # distractors, choice of samples and win-rate riddles, decoding
WIN_RATE = True  # judged win rate of the fine-tuned model over the base; false = skip
WIN_RATE_N = 100  # held-out riddles (first user turns) both models answer and the judge compares; 0 = skip
JUDGE = "mistralai/Mistral-7B-Instruct-v0.2"  # the judge, by default the generator: hub id, local folder, or smollm2
JUDGE_BACKEND = "hf"  # hf (local transformers), hf-fp8 (float8 on an H100) or openai (an OpenAI-compatible server)
JUDGE_BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
JUDGE_API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
JUDGE_PROMPT = "A curious 10-year-old asked an assistant a riddle. Two assistants replied. Judge which reply is better: is the answer right, and explained simply enough for a child? The order of the replies and their length do not matter.\n\nRiddle: {riddle}\n\n[Reply A]\n{reply_a}\n[End of reply A]\n\n[Reply B]\n{reply_b}\n[End of reply B]\n\nReply with exactly these two lines and nothing else:\nwinner: A, B or tie\nreason: one short sentence"  # {riddle} {reply_a} {reply_b}
JUDGE_MAX_NEW_TOKENS = 96  # tokens per judgement: the winner and a one-sentence reason (greedy decoding)
JUDGE_BATCH_SIZE = 64  # pairs per judge call (two prompts each), appended to judged.jsonl as each call ends
OVERWRITE = False  # answer and judge the win rate's riddles again instead of reusing winrate_replies/judged.jsonl
# -----------------------------------------------------------------------------
configure(globals())
started = time.time()
adapter, out_dir = path(ADAPTER), path(EVAL_DIR)
check_paths({"adapter": adapter, "merged": path(MERGED)}, {"eval-dir": out_dir})
judging = WIN_RATE and WIN_RATE_N > 0
if judging:
    check_template("judge-prompt", JUDGE_PROMPT, "riddle", "reply_a", "reply_b")
    if JUDGE_BACKEND not in ("hf", "hf-fp8", "openai"):
        raise InputError(f"--judge-backend wants hf, hf-fp8 or openai, got {JUDGE_BACKEND!r}")
    if JUDGE_BACKEND == "openai" and not JUDGE_BASE_URL.strip(","):
        raise InputError("--judge-backend=openai needs --judge-base-url (e.g. http://localhost:8000/v1)")

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
if (path(MERGED) / "adapter_config.json").exists():
    raise InputError(f"{MERGED} is a LoRA adapter (stage 05's output), not a merged model: run "
                     f"06_merge_and_chat.py --adapter={MERGED} and pass its output folder (--merged=out/06_merged)")

# %% The win rate's riddles, and what is cached of it: records count only under the setup that made them
models = {"base": base_name, "tuned": MERGED}
sampling = dict(max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P)
pool = win_rate_riddles(held_out, len(held_out), SEED) if judging else []  # all, in the seed's order
riddles = pool[:WIN_RATE_N]
reply_setup = {key: setup_key(model_fingerprint(name), sampling, SEED) for key, name in models.items()}
judge_setup = setup_key(reply_setup, model_fingerprint(JUDGE), JUDGE_BACKEND, JUDGE_PROMPT, JUDGE_MAX_NEW_TOKENS)


def reply_key(key, riddle):
    return f"{reply_setup[key]}/{key}/{riddle['id']}"


def pair_key(riddle):
    return f"{judge_setup}/{riddle['id']}"


replies_cache = KeyedCache(out_dir / "winrate_replies.jsonl", OVERWRITE) if riddles else None
judged_cache = KeyedCache(out_dir / "judged.jsonl", OVERWRITE) if riddles else None
to_judge = [r for r in riddles if pair_key(r) not in judged_cache.records] if riddles else []
hub_judge = bool(to_judge) and JUDGE_BACKEND != "openai" and JUDGE not in ALIASES and not path(JUDGE).exists()
if riddles:
    print(f"win rate: {len(riddles):,} riddles, {len(riddles) - len(to_judge):,} judged already")


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


# %% The benchmarks (and a judge given as a hub id) download from the hub; offline, fail at once instead of
# retrying for minutes. Before anything imports huggingface_hub: it reads HF_HUB_OFFLINE once, on import.
if (TASKS or hub_judge) and not hub_offline():
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"{host} unreachable: benchmarks use the local dataset cache only, the judge the local model cache")
win_note = ("--win-rate=false" if not WIN_RATE else "--win-rate-n=0" if not WIN_RATE_N
            else "no held-out conversation has a user turn with a reply" if not riddles else "")
if hub_judge and hub_offline():  # a judge that cannot load: no replies are made for it
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(JUDGE, "config.json"), str)
    except Exception:  # not even a valid hub id
        cached = False
    if not cached:
        win_note, to_judge = f"the hub is unreachable and the judge {JUDGE} is not in the local model cache", []

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
answerable = sorted(((c, t) for c in held_out if (t := sample_turns(c["messages"]))), key=lambda ct: ct[0]["id"])
shown = random.Random(SEED).sample(answerable, min(SAMPLES, len(answerable)))  # (conversation, its turns)
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
    # chat_replies is never handed an empty list (a tokenizer fails on an empty batch): nothing to ask, no call.
    first = chat_replies(model, tok, [t["prompt"] for _, t in shown], [seed_of(c["id"], SEED) for c, _ in shown],
                         **sampling) if shown else []
    # The follow-up turn, where the conversation has one: the model's own first reply, then the reference question.
    follow = [i for i, (_, t) in enumerate(shown) if t["follow_up"] is not None]
    prompts = [[*shown[i][1]["prompt"], {"role": "assistant", "content": first[i][0]},
                {"role": "user", "content": shown[i][1]["follow_up"]}] for i in follow]
    second = dict(zip(follow, chat_replies(model, tok, prompts, [seed_of(shown[i][0]["id"], SEED, 2) for i in follow],
                                           **sampling) if follow else []))
    samples[key] = [{"reply": r1, "ended": e1, "reply2": second.get(i, (None, None))[0],
                     "ended2": second.get(i, (None, None))[1]} for i, (r1, e1) in enumerate(first)]
    t2 = time.time()
    missing = [r for r in to_judge if reply_key(key, r) not in replies_cache.records]
    if missing:  # the replies of the pairs to judge: the first user turn, seeded as the samples' first reply
        got = chat_replies(model, tok, [r["prompt"] for r in missing], [seed_of(r["id"], SEED) for r in missing],
                           **sampling)
        replies_cache.add([{"key": reply_key(key, r), "model": key, "id": r["id"], "reply": text, "ended": ended}
                           for r, (text, ended) in zip(missing, got)])
    seconds[key] = round(time.time() - t0, 1)
    print(f"{key}: {name} evaluated in {seconds[key]:,.1f} s (samples {t2 - t1:,.1f} s, "
          f"{len(missing):,} win-rate replies {time.time() - t2:,.1f} s)")
    del lm, model
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

rows = compare_scores(scores["base"], scores["tuned"])


# %% The win rate: the judge compares each pair not yet judged in both orders, appending each call's pairs
def judge_missing():
    """Judge the pairs of to_judge; returns a line saying why judging did not run or stopped, else ""."""
    t0 = time.time()
    try:
        backend = load_backend(JUDGE_BACKEND, JUDGE, JUDGE_BASE_URL, JUDGE_API_KEY)
    except InputError as e:
        return f"the judge could not be loaded ({e})"
    print(f"judging {len(to_judge):,} pairs with {JUDGE} ({JUDGE_BACKEND}), two orders each")
    tok, failed = getattr(backend, "tokenizer", None), 0
    try:
        for a in range(0, len(to_judge), JUDGE_BATCH_SIZE):
            chunk = to_judge[a:a + JUDGE_BATCH_SIZE]
            pairs = [(r, replies_cache.records[reply_key("base", r)], replies_cache.records[reply_key("tuned", r)])
                     for r in chunk]
            prompts = [judge_prompt(JUDGE_PROMPT, r["riddle"], *((b, t) if order == "base_first" else (t, b)), tok)
                       for r, b, t in ((r, b["reply"], t["reply"]) for r, b, t in pairs) for order in ORDERS]
            seeds = [seed_of(r["id"], SEED, order) for r, _, _ in pairs for order in ORDERS]
            got = [as_reply(x) for x in backend.generate(prompts, seeds, max_new_tokens=JUDGE_MAX_NEW_TOKENS,
                                                         temperature=0.0, top_p=1.0)]
            done = []
            for i, (r, b, t) in enumerate(pairs):
                judgements = dict(zip(ORDERS, got[2 * i:2 * i + 2]))
                if any(j is None for j in judgements.values()):  # a failed request: judged on a rerun
                    failed += 1
                    continue
                record = {"key": pair_key(r), "id": r["id"], "judge": JUDGE, "riddle": r["riddle"],
                          "base": b["reply"], "base_ended": b["ended"], "tuned": t["reply"], "tuned_ended": t["ended"]}
                for order, j in judgements.items():
                    verdict, reason = parse_verdict(j.text) or (None, None)
                    record[order] = {"text": j.text, "ended": j.ended, "verdict": verdict,
                                     "winner": winner(order, verdict), "reason": reason}
                record["outcome"] = pair_outcome(record["base_first"]["verdict"], record["tuned_first"]["verdict"])
                done.append(record)
            judged_cache.add(done)
            print(f"judged {min(a + len(chunk), len(to_judge)):,} of {len(to_judge):,} pairs "
                  f"({time.time() - t0:,.0f} s)")
    except InputError as e:  # the server went away: what was judged is kept
        return f"judging stopped ({e}); a rerun judges the rest"
    finally:
        del backend
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return (f"{failed:,} of {len(to_judge):,} pairs not judged: a judge request failed (a rerun judges them)"
            if failed else "")


if to_judge:
    win_note = judge_missing()
win = None
if riddles:
    pairs = [judged_cache.records[pair_key(r)] for r in riddles if pair_key(r) in judged_cache.records]
    win = summarize_win_rate(pairs)
    cut = {key: sum(p.get(f"{key}_ended") is False for p in pairs) for key in models}
    replies_cache.close()
    judged_cache.close()
    if win["judged"]:
        print(f"win rate {win['win_rate']:.3f} [{win['interval'][0]:.3f}, {win['interval'][1]:.3f}] over "
              f"{win['judged']:,} pairs: wins {win['wins']:,}, ties {win['ties']:,}, losses {win['losses']:,}; "
              f"unreadable judgements {win['unparsed_judgements']:,}")
if win_note:
    print(f"win rate: {win_note}")

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


def share(k, n):
    return f"{k:,} of {n:,} ({k / n:.0%})" if n else f"{k:,} of 0"


if win and win["judged"]:
    lo, hi = win["interval"]
    win_summary = (f"{win['win_rate']:.2f} (95% interval {lo:.2f}-{hi:.2f}) over {win['judged']:,} pairs judged by "
                   f"{JUDGE}: wins {win['wins']:,}, ties {win['ties']:,}, losses {win['losses']:,}")
elif win and win["pairs"]:
    win_summary = f"none: each of {win['pairs']:,} pairs has an unreadable judgement"
else:
    win_summary = f"not run ({win_note or 'no pair judged'})"


def win_rate_section():
    lines = ["## Win rate (judged)", ""]
    if not win or not win["pairs"]:
        return lines + [f"Not run: {win_note or 'no pair judged'}."]
    lines += [f"{len(riddles):,} of {len(pool):,} held-out riddles (the first user turn of each conversation in "
              f"{ADAPTER}/eval.jsonl, in an order set by the seed), each model answering once with the sample "
              f"decoding above. The judge, {JUDGE} ({JUDGE_BACKEND}, greedy, up to {JUDGE_MAX_NEW_TOKENS:,} "
              "tokens), compared each pair twice with the replies' positions swapped (A = base, then A = fine-tuned). "
              "A pair is a win or a loss only when both orders pick the same model, else a tie; a pair with an "
              "unreadable judgement counts in none of them.", "",
              "| judged pairs | wins | ties | losses | win rate = (wins + ties/2) / judged | 95% interval (Wilson) |",
              "|---:|---:|---:|---:|---:|---|"]
    interval = f"{win['interval'][0]:.3f} - {win['interval'][1]:.3f}" if win["judged"] else "n/a"
    rate = f"{win['win_rate']:.3f}" if win["judged"] else "n/a"
    lines += [f"| {win['judged']:,} of {len(riddles):,} | {win['wins']:,} | {win['ties']:,} | {win['losses']:,} | "
              f"{rate} | {interval} |", ""]
    if win_note:
        lines.append(f"- {win_note}")
    lines += [f"- unreadable judgements: {win['unparsed_judgements']:,}, in {win['unparsed_pairs']:,} of "
              f"{win['pairs']:,} pairs (listed below; not guessed)",
              f"- interval: {win['interval_method']} (conservative with ties: a tie spreads less than a coin flip)",
              f"- replies cut at {MAX_NEW_TOKENS:,} new tokens, judged as they are: base {cut['base']:,}, "
              f"fine-tuned {cut['tuned']:,} of {win['pairs']:,}", ""]
    pos = win["position"]
    picks = pos["picks"]
    sided = {o: picks[o]["A"] + picks[o]["B"] for o in ORDERS}
    picked_a = picks["base_first"]["A"] + picks["tuned_first"]["A"]
    lines += ["### Position bias", "",
              f"- the judge picked A in {share(picked_a, sum(sided.values()))} of its judgements that picked a side "
              "(an unbiased judge: about half); with the base in A "
              f"{share(picks['base_first']['A'], sided['base_first'])}, with the fine-tuned model in A "
              f"{share(picks['tuned_first']['A'], sided['tuned_first'])}",
              f"- ties given: {picks['base_first']['tie'] + picks['tuned_first']['tie']:,}; the two orders named the "
              f"same winner (a tie included) in {share(pos['agree'], win['judged'])} judged pairs", ""]
    if win["examples"]:
        lines += [f"### The judge's reasons ({len(win['examples'])} pairs)", ""]
    names = {"base": "base", "tuned": "fine-tuned"}
    for ex in win["examples"]:
        lines += [f"#### {ex['id']}: {ex['outcome']} for the fine-tuned model", "",
                  f"**Riddle:** {cell(ex['riddle'])}", "", "| base | fine-tuned |", "|---|---|",
                  f"| {cell(ex['base']) or '*(empty)*'} | {cell(ex['tuned']) or '*(empty)*'} |", ""]
        for order, label in (("base_first", "base in A"), ("tuned_first", "fine-tuned in A")):
            j = ex[order]
            picked = "a tie" if j["verdict"] == "tie" else f"{j['verdict']} ({names[j['winner']]})"
            lines.append(f"- {label}: picked {picked}: {cell(j['reason']) or '(no reason)'}")
        lines.append("")
    if win["unparsed"]:
        lines += ["### Unreadable judgements", "",
                  "Judgements that name no single winner in the form asked for; their pairs count in none of the "
                  "numbers above" + (f" (the first 10 of {len(win['unparsed']):,}; all are in judged.jsonl)."
                                     if len(win["unparsed"]) > 10 else "."), "",
                  "| pair | order | the judge's reply |", "|---|---|---|"]
        lines += [f"| {u['id']} | {'base' if u['order'] == 'base_first' else 'fine-tuned'} in A | "
                  f"{cell(u['text'][:400]) or '*(empty)*'} |" for u in win["unparsed"][:10]]
    return lines


scored = {r["metric"]: r for r in riddle_rows}
riddle_summary = ", ".join(f"{m} {scored[m]['base']:.3f} -> {scored[m]['tuned']:.3f}"
                           + (" (> 2 stderr)" if scored[m]["flagged"] else "")
                           for m in ("nll_per_token", "acc") if m in scored)
bench_summary = (f"{len(bench_rows):,} scores compared, {len(flagged):,} moved by more than 2 stderr"
                 + (f" ({'; '.join(flagged)})" if flagged else "")
                 + f"; {len(unavailable):,} of {len(TASKS):,} tasks not run (task or data could not be loaded)")
report = [
    f"# Evaluation: {base_name} (base) vs {MERGED} (fine-tuned)", "",
    f"Riddle task: {riddle_summary or 'no scores'}. Benchmarks: {bench_summary}. Win rate: {win_summary}.", "",
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
    *win_rate_section(), "",
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
report += ["", "## Samples", ""]
if shown:
    report += [f"{len(shown):,} held-out riddles, both models with the same seeded decoding. The second turn, where "
               "the conversation has one, feeds each model its own first reply, then the reference follow-up question. "
               f"**no `<|im_end|>`** marks a reply that did not end its turn within {MAX_NEW_TOKENS:,} new tokens.", ""]
else:
    report += ["No samples: " + ("--samples=0." if not SAMPLES else "no held-out conversation has a user turn with "
                                 "a reply."), ""]
for i, (conv, turns) in enumerate(shown):
    b, t = samples["base"][i], samples["tuned"][i]
    report += [f"### {i + 1}. {conv['id']}", "", f"**Riddle:** {cell(turns['prompt'][-1]['content'])}", "",
               "| turn | reference | base | fine-tuned |", "|---|---|---|---|",
               f"| reply | {cell(turns['reference'])} | {show(b['reply'], b['ended'])} | "
               f"{show(t['reply'], t['ended'])} |"]
    if turns["follow_up"] is not None:
        report.append(f"| follow-up: {cell(turns['follow_up'])} | {cell(turns['reference2'])} | "
                      f"{show(b['reply2'], b['ended2'])} | {show(t['reply2'], t['ended2'])} |")
    report.append("")

results = {
    "settings": {k: globals()[k] for k in ("ADAPTER", "MERGED", "STUDENT", "TASKS", "LIMIT", "APPLY_CHAT_TEMPLATE",
                                           "BATCH_SIZE", "N_CHOICES", "SAMPLES", "MAX_NEW_TOKENS", "TEMPERATURE",
                                           "TOP_P", "SEED", "WIN_RATE", "WIN_RATE_N", "JUDGE", "JUDGE_BACKEND",
                                           "JUDGE_BASE_URL", "JUDGE_PROMPT", "JUDGE_MAX_NEW_TOKENS",
                                           "JUDGE_BATCH_SIZE")}
                | {"base_model": base_name, "device": device,
                                                                 "lm_eval": lm_eval.__version__},
    "riddle_docs": {"replies": len(replies), "choices": len(choices)},
    "scores": scores, "comparison": rows, "unavailable": unavailable,
    "loss": {"train": train_log, "eval": eval_log, "best": best},
    "samples": [{"id": c["id"], "messages": c["messages"], "base": samples["base"][i], "tuned": samples["tuned"][i]}
                for i, (c, _) in enumerate(shown)],
    "win_rate": win, "win_rate_note": win_note,
    "seconds": seconds | {"total": round(time.time() - started, 1)},
}
plot_loss(train_log, eval_log, out_dir / "loss.png")
write_json_atomic(out_dir / "results.json", results)
write_text_atomic(out_dir / "report.md", "\n".join(report) + "\n")

print(f"wrote {out_dir / 'report.md'}: riddle {riddle_summary}; benchmarks: {bench_summary}; win rate: {win_summary}; "
      f"{time.time() - started:,.0f} s")
