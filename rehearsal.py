"""Rehearsal: stages 01 -> 07 at the recipe's real shapes, random weights, on this machine.

Before hours of real generation and training, run every stage on random-weight models of the
generator's and the student's real configs and tokenizers (no 20 GB download: with hub access the
models' small config and tokenizer files, offline the copies in pipeline/shapes.py), with reply lengths
forced to a realistic mix. Per stage it prints wall time, tokens/s, peak GPU memory and the
projected time of the full recipe at the stages' defaults; at the end, whether the recipe fits
this card. Random text would fail the cleaning rules, so stages 02-05 read inputs the rehearsal
writes from the seed riddles, with a real run's counts and lengths: what is timed is each stage.

Reads:  data/seed_riddles.jsonl (texts for the inputs)
Writes: out/rehearsal/  models/ (random-weight folders, made once), inputs/, each stage's outputs,
                        rehearsal.json  {"stages": [{"stage", "seconds", "tokens", "tokens_per_s",
                        "peak_gib", "projected_s", "note"}], "device", "fits", ...}

    python rehearsal.py                     # one GPU, the recipe's shapes (~7 min on an H200, measured)
    python rehearsal.py --gpus=2 --stages=02,05   # stages 02 and 05 under accelerate launch on 2 GPUs
    python rehearsal.py --scale=0.02 --prompts=4 --riddles=6 --steps=2   # tiny shapes (the CPU test)

Each stage runs in its own process (a fresh GPU, its own peak). No resume: a rerun reuses the
model folders and redoes the stages.
"""

import json
import os
import random
import runpy
import subprocess
import sys
import time

import torch

import common
from pipeline import shapes
from pipeline.engine import force_lengths
from pipeline.knobs import InputError, configure
from pipeline.records import path, read_jsonl, write_json_atomic, write_jsonl_atomic

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # stages 01-04's model (its config and tokenizer only)
STUDENT = "microsoft/phi-2"  # stages 05-07's model (its config and tokenizer only)
SCALE = 1.0  # shrink layers and width of both models (1: the real shapes; the CPU test uses 0.02)
STAGES = ["01", "02", "03", "04", "05", "06", "07"]  # stages to rehearse, comma list
GPUS = 1  # processes for each stage but 06 and 07 (accelerate launch; one per GPU)
BACKEND = "hf"  # 01-04's backend: hf, or hf-fp8 (float8 matmuls and KV cache; compute capability 8.9 or newer)
PROMPTS = 300  # 01: prompts rehearsed (the recipe's NUM_PROMPTS)
RIDDLES = 512  # 02-04: records rehearsed
RECIPE_RIDDLES = 1700  # riddles a real run keeps after 01 (the reference kept 1,682): 02-05 project to it
STEPS = 40  # 05: optimizer steps rehearsed, projected to the recipe's epochs
EPOCHS = 20  # 05: the recipe's epochs
LENGTHS_01 = [150, 450]  # forced reply lengths, tokens, drawn uniformly per reply: 01 (ten riddles)
LENGTHS_02 = [80, 400]  # 02: a step-by-step answer
LENGTHS_03 = [8, 40]  # 03: a child's short question
LENGTHS_04 = [60, 300]  # 04: the follow-up answer
CONVERSATION_TOKENS = [480, 180, 120, 1024]  # 05 data: mean, std, min, max tokens (the reference's mix)
EVAL_LIMIT = 0  # 07: docs per riddle task (0: all); the hub benchmarks are left out
OUT = "out/rehearsal"  # everything the rehearsal writes
CHILD = ""  # internal: run this one stage in this process (set by the rehearsal itself)
CHILD_ARGS = ""  # internal: the stage's arguments, as a JSON list
# -----------------------------------------------------------------------------
configure(globals())
out = path(OUT)
STAGE_SCRIPTS = {"01": "01_generate_riddles.py", "02": "02_answer_riddles.py", "03": "03_followup_questions.py",
                 "04": "04_followup_answers.py", "05": "05_finetune_phi2.py", "06": "06_merge_and_chat.py",
                 "07": "07_evaluate.py"}
LENGTHS = {"01": LENGTHS_01, "02": LENGTHS_02, "03": LENGTHS_03, "04": LENGTHS_04}

# -----------------------------------------------------------------------------
# Child mode: one stage, in this process, with reply lengths forced and its peak memory measured

if CHILD:
    counted = {"tokens": 0, "replies": 0}
    if CHILD in LENGTHS:
        lo, hi = map(int, LENGTHS[CHILD])
        generate_ids = common.generate_ids

        def forced(model, prompts, seeds, *, max_new_tokens, eos_ids, **kwargs):
            """generate_ids with each reply's length drawn from its seed (random weights rarely stop)."""
            eos = eos_ids if isinstance(eos_ids, int) else list(eos_ids)[0]
            targets = torch.tensor([min(random.Random(s).randint(lo, hi), max_new_tokens) for s in seeds],
                                   device=model.device)
            rows = generate_ids(model, prompts, seeds, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                processor=lambda logits, r, steps: force_lengths(logits, targets[r], steps, eos),
                                **kwargs)
            counted["tokens"] += sum(map(len, rows))
            counted["replies"] += len(rows)
            return rows

        common.generate_ids = forced  # HFBackend looks it up at each call
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sys.argv = [STAGE_SCRIPTS[CHILD], *json.loads(CHILD_ARGS)]
    started = time.time()
    try:
        runpy.run_path(str(path(STAGE_SCRIPTS[CHILD])), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    # Every process reports (write_json_atomic writes only from the first one).
    measured = {"seconds": time.time() - started, "peak_gib": peak, **counted}
    (out / f"child-{CHILD}-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(measured))
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# The two models: random weights of the real configs and tokenizers, folders made once

started = time.time()
unknown = sorted(set(STAGES) - set(STAGE_SCRIPTS))
if unknown:
    raise InputError(f"--stages: unknown stage {unknown[0]!r}; use 01..07")
if BACKEND not in ("hf", "hf-fp8"):
    raise InputError(f"--backend: {BACKEND!r}; the rehearsal runs the local backends, hf or hf-fp8")
OFFLINE = {"mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b-instruct-v0.2", "microsoft/phi-2": "phi-2"}


def model_folder(name):
    """A folder with random weights of `name`'s config and its tokenizer (hub files, else pipeline/shapes.py)."""
    folder = out / "models" / f"{name.replace('/', '--')}-x{SCALE:g}"
    if (folder / "config.json").exists():
        return folder
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(name).to_dict()
        tokenizer = AutoTokenizer.from_pretrained(name)
        source = "the hub's config and tokenizer"
    except (OSError, ValueError):  # offline, or no such model
        if name not in OFFLINE:
            raise InputError(f"{name}: no config and tokenizer reachable (offline?); rehearse one of "
                             f"{', '.join(OFFLINE)}") from None
        config, make_tokenizer = shapes.MODELS[OFFLINE[name]]
        try:
            tokenizer = make_tokenizer()
        except FileNotFoundError as e:
            raise InputError(str(e)) from None
        source = "pipeline/shapes.py (offline)"
    t0 = time.time()
    shapes.random_model_folder(config, tokenizer, folder, scale=SCALE)
    print(f"{name}: random weights of {source}, scale {SCALE:g} -> {folder} in {time.time() - t0:.0f} s")
    return folder


generator = model_folder(GENERATOR) if set(STAGES) & {"01", "02", "03", "04"} else None
student = model_folder(STUDENT) if set(STAGES) & {"05", "06", "07"} else None

# -----------------------------------------------------------------------------
# Inputs: what 01-04 would have made, from the seed riddles, at a real run's counts and lengths

seeds = read_jsonl(path("data/seed_riddles.jsonl"), need=("instruction", "answer", "output"))
inputs = out / "inputs"
QUESTIONS = ["Why is that?", "How does that work?", "Is there another answer?", "What else has that?"]


def conversation(i, turns):
    s = seeds[i % len(seeds)]
    messages = [{"role": "user", "content": f"{s['instruction']} (riddle {i})"},
                {"role": "assistant", "content": f"{s['output']} So the answer is: {s['answer']}."},
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                {"role": "assistant", "content": s["output"]}]
    return {"id": f"r{i:05d}", "messages": messages[:turns]}


for stage, turns in (("01_riddles", 1), ("02_answers", 2), ("03_followups", 3)):
    write_jsonl_atomic(inputs / f"{stage}.jsonl", [conversation(i, turns) for i in range(RIDDLES)])

if "05" in STAGES:  # conversations whose token counts follow CONVERSATION_TOKENS, as 05 tokenizes them
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    common.setup_chat_tokenizer(tokenizer)  # the ChatML tokens count one each, as in training
    mean, std, low, high = map(float, CONVERSATION_TOKENS)
    rng, records = random.Random(0), []
    for i in range(RECIPE_RIDDLES):
        rec = conversation(i, 4)
        want = int(min(max(rng.gauss(mean, std), low), high))
        have = len(tokenizer(common.render_chatml(rec["messages"])[0])["input_ids"])
        filler = " ".join(seeds[(i + k) % len(seeds)]["output"] for k in range(1, 40))
        extra = tokenizer(filler, add_special_tokens=False)["input_ids"][:max(0, want - have)]
        rec["messages"][3]["content"] += " " + tokenizer.decode(extra) if extra else ""
        records.append(rec)
    write_jsonl_atomic(inputs / "04_conversations.jsonl", records)

# -----------------------------------------------------------------------------
# The stages, each in its own process


def run_stage(stage, args, processes=1):
    """Run one stage as a child; return its measurements (seconds, peak GiB, generated tokens)."""
    for old in out.glob(f"child-{stage}-*.json"):
        old.unlink()
    child = [f"--child={stage}", f"--child-args={json.dumps([str(a) for a in args])}", f"--out={OUT}"]
    if stage in LENGTHS:
        child.append(f"--lengths-{stage}={','.join(map(str, LENGTHS[stage]))}")
    command = [sys.executable, str(path("rehearsal.py")), *child]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={processes}",
                   str(path("rehearsal.py")), *child]
    print(f"\n=== {stage}: {' '.join([STAGE_SCRIPTS[stage], *map(str, args)])}", flush=True)
    t0 = time.time()
    done = subprocess.run(command, cwd=path("."))
    if done.returncode != 0:
        raise SystemExit(f"rehearsal: stage {stage} failed (exit {done.returncode}); see its output above")
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob(f"child-{stage}-*.json"))]
    return {"seconds": time.time() - t0, "peak_gib": max(r["peak_gib"] for r in ranks),
            "tokens": sum(r["tokens"] for r in ranks), "replies": sum(r["replies"] for r in ranks)}


d = out / "data"
G = [f"--generator={generator}", f"--backend={BACKEND}", "--overwrite"]
results = []


def record(stage, m, projected, tokens=None, rate=None, note=""):
    """One row of the table; rate defaults to tokens over the stage's whole wall time (loading included)."""
    tokens = m["tokens"] if tokens is None else tokens
    rate = rate or (tokens / m["seconds"] if tokens else None)
    results.append({"stage": stage, "seconds": round(m["seconds"], 1), "tokens": tokens,
                    "tokens_per_s": round(rate) if rate else None,
                    "peak_gib": round(m["peak_gib"], 2), "projected_s": round(projected), "note": note})
    print(f"--- {stage}: {m['seconds']:,.0f} s, {tokens or 0:,} tokens, peak {m['peak_gib']:.1f} GiB; "
          f"the recipe: ~{projected / 60:,.1f} min{'; ' + note if note else ''}", flush=True)


if "01" in STAGES:
    m = run_stage("01", [*G, f"--num-prompts={PROMPTS}", f"--raw-file={d / '01_raw.jsonl'}",
                         f"--out-file={d / '01_riddles.jsonl'}", f"--rejected-file={d / '01_rejected.jsonl'}"], GPUS)
    record("01", m, m["seconds"] * 300 / PROMPTS, note=f"{PROMPTS} prompts on {GPUS} GPU(s), projected to 300")
for stage, source in (("02", "01_riddles"), ("03", "02_answers"), ("04", "03_followups")):
    if stage in STAGES:
        # 03's dedup would drop every input riddle: they are copies of the seeds.
        m = run_stage(stage, [*G, f"--in-file={inputs / (source + '.jsonl')}", f"--out-file={d / (stage + '.jsonl')}",
                              f"--rejected-file={d / (stage + '_rejected.jsonl')}",
                              *(["--dedup=false"] if stage == "03" else [])], GPUS)
        record(stage, m, m["seconds"] * RECIPE_RIDDLES / RIDDLES,
               note=f"{RIDDLES:,} records on {GPUS} GPU(s), projected to {RECIPE_RIDDLES:,}")
if "05" in STAGES:
    m = run_stage("05", [f"--student={student}", f"--data={inputs / '04_conversations.jsonl'}",
                         f"--adapter={out / '05_adapter'}", f"--max-steps={STEPS}", "--overwrite"], GPUS)
    run = json.loads((out / "05_adapter" / "run.json").read_text())
    trained = run["tokens_per_second"] * run["seconds"]
    recipe = run["train_tokens"] * EPOCHS / run["tokens_per_second"]
    record("05", m, recipe + m["seconds"] - run["seconds"], round(trained), run["tokens_per_second"],
           note=f"{STEPS} steps on {GPUS} GPU(s) at {run['tokens_per_second']:,} tok/s, projected to {EPOCHS} "
                f"epochs of {run['train_tokens']:,} tokens")
if "06" in STAGES:
    m = run_stage("06", [f"--adapter={out / '05_adapter'}", f"--merged={out / '06_merged'}", "--chat=false",
                         "--overwrite"])
    merge = json.loads((out / "06_merged" / "merge.json").read_text())
    record("06", m, m["seconds"], 0, note=f"merge check {merge['max_logit_diff_rel']:.1e} (tolerance "
                                          f"{merge['tolerance']:.0e}), saved as {merge['dtype']}")
if "07" in STAGES:
    m = run_stage("07", [f"--adapter={out / '05_adapter'}", f"--merged={out / '06_merged'}", f"--student={student}",
                         f"--eval-dir={out / '07_eval'}", "--tasks=", f"--limit={EVAL_LIMIT}",
                         "--win-rate=false"])  # its judge is a 7B from the hub
    record("07", m, m["seconds"], 0, note="riddle tasks and samples; the hub benchmarks not included")

# -----------------------------------------------------------------------------
# Summary: the table, the total, and whether the recipe fits this card

if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    device, card_gib = f"{torch.cuda.device_count()} x {props.name}", props.total_memory / 2**30
else:
    device, card_gib = "cpu", None
peak = max((r["peak_gib"] for r in results), default=0.0)
fits = None if card_gib is None else peak <= 0.95 * card_gib
total = sum(r["projected_s"] for r in results)
write_json_atomic(out / "rehearsal.json", {
    "device": device, "card_gib": card_gib, "fits": fits, "scale": SCALE, "gpus_for_05": GPUS,
    "generator": GENERATOR, "student": STUDENT, "torch": torch.__version__, "stages": results,
    "projected_total_s": total, "seconds": round(time.time() - started, 1),
    "date": time.strftime("%Y-%m-%d")})
print("\n| stage | seconds | tokens/s | peak GiB | the recipe | note |\n|---|---:|---:|---:|---:|---|")
for r in results:
    rate = f"{r['tokens_per_s']:,}" if r["tokens_per_s"] else ""
    print(f"| {r['stage']} | {r['seconds']:,.0f} | {rate} | {r['peak_gib']:.1f} | {r['projected_s'] / 60:,.1f} min | "
          f"{r['note']} |")
verdict = ("no GPU: memory not judged" if fits is None else
           f"fits this card: peak {peak:.1f} of {card_gib:.1f} GiB" if fits else
           f"does NOT fit this card: peak {peak:.1f} of {card_gib:.1f} GiB")
if any(r["stage"] in LENGTHS for r in results):
    verdict += " (01-04's peak is mostly KV cache: the slot engine fills ~60% of free memory, fewer slots on a smaller card)"

print(f"rehearsal: {len(results)} stages green on {device} in {time.time() - started:,.0f} s; the recipe's "
      f"stages {', '.join(r['stage'] for r in results)} would take ~{total / 60:,.0f} min; {verdict}; "
      f"{out / 'rehearsal.json'}")
