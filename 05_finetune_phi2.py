"""Stage 05: QLoRA fine-tune of the student on the conversations, in ChatML, loss on the assistant's turns.

The student (microsoft/phi-2) is loaded in 4-bit NF4 and trained through LoRA adapters on its attention
projections; the ChatML tokens it lacks get trainable embedding rows (PEFT trainable tokens). Conversations
are packed into padding-free rows of TOKENS_PER_BATCH tokens (position_ids restart per conversation); the
loss of an optimizer step is the mean over its supervised tokens: each assistant turn and its <|im_end|>.

Reads:  data/04_conversations.jsonl  {"id", "messages": [{"role": "user"|"assistant", "content"}, ...]}
        (--data=FILE: any file of that shape, or of the riddles_evolved shape: messages as plain strings)
Writes: out/05_adapter/              final adapter + tokenizer with the ChatML chat template, README.md (model card)
          train.jsonl, eval.jsonl    the 90/10 split, records as read
          log.jsonl                  {"step", "epoch", "loss"} per step, {"step", "epoch", "eval_loss"} per eval
          loss.png, run.json         loss curves; student, knobs, counts, timings
          checkpoints/step-NNNNNN/   adapter + optimizer and scheduler state (the last few)
          runs/, wandb/              with --report-to=tensorboard, wandb: the curves (wandb: its local files)

    python 05_finetune_phi2.py                                     # the recipe, on a GPU
    python 05_finetune_phi2.py --student=smollm2 --max-steps=4 --lr=2e-4   # a few steps on CPU
    accelerate launch --num_processes=4 05_finetune_phi2.py        # DDP: one 4-bit replica per GPU
    python 05_finetune_phi2.py --report-to=tensorboard             # then: tensorboard --logdir out/05_adapter/runs

--report-to sends loss, eval loss, learning rate, tok/s and memory per step to accelerate's trackers
(tensorboard, wandb, trackio, mlflow, ...; comma-separated); a resumed run goes on in the same run (tensorboard:
the same folder, the steps after the checkpoint replaced; wandb and trackio: the run id kept in run.json).
--push-to-hub=user/name uploads the finished adapter, tokenizer, loss.png and model card (not the checkpoints,
the data split or the logs) in one push; a failed push is one line, and rerunning the command pushes again.

With N processes each step takes GRAD_ACCUM micro-batches on each, so N processes with GRAD_ACCUM=k
train the same steps as one process with GRAD_ACCUM=N*k (a test checks this); a resumed run must keep
the number of processes.

Resume: rerun the same command after a kill; it continues from the last checkpoint (one per epoch, every
SAVE_EVERY_STEPS and at the last step) with the optimizer state, and dropout masks seeded per step, so
the result equals an uninterrupted run, log.jsonl too (each step once); killed during the final save, the rerun
saves again (run.json gets `finished` last, once the files are fsynced, and 06 refuses the folder until then).
Checkpoints are fsynced before they are renamed into place. A finished run is not retrained; --overwrite starts
afresh (only in a folder 05 made: one with its run.json); raising --epochs or --max-steps continues a finished
one. Changing the data or the recipe knobs is refused.
Runtime: ~11.6 min on one H100 for the recipe's 20 epochs (~21k tok/s with the evals and saves, 22 GiB); the CPU
demo ~0.5 min.
"""

import contextlib
import hashlib
import json
import math
import random
import re
import resource
import secrets
import shutil
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from common import tokenize_chat
from pipeline.evaluation import plot_loss, read_train_log
from pipeline.knobs import InputError, configure
from pipeline.records import (Appender, check_own_folder, check_paths, check_unique_ids, fsync_path, fsync_tree, path,
                              read_conversations, read_json, read_jsonl, seed_of, write_json_atomic,
                              write_jsonl_atomic, write_text_atomic)
from pipeline.training import (adapters_in_bf16, add_lora, card_header, describe_base, load_student, loss_sum,
                               micro_batches, push_files, recipe_section, supervised_tokens, trackers,
                               training_section)

# -----------------------------------------------------------------------------
STUDENT = "microsoft/phi-2"          # hub id, local folder, or the bundled alias smollm2
DATA = "data/04_conversations.jsonl" # conversations to learn
ADAPTER = "out/05_adapter"           # this stage's folder: adapter, split, logs, checkpoints
MAX_LENGTH = 1024                    # tokens per conversation; longer ones are cut
TRAIN_ON_HEADER = False              # also supervise the "<|im_start|>assistant\n" header
EVAL_FRACTION = 0.1                  # share of conversations held out for the eval loss
SEED = 1234                          # split, batch order, LoRA init, dropout
LOAD_IN_4BIT = True                  # NF4 base weights (QLoRA); false: LoRA on bf16/fp32 weights
DOUBLE_QUANT = True                  # quantize the 4-bit scales too (~0.4 bit/parameter less)
ATTN = "packed_varlen"               # packed_varlen (flash varlen on GPU: 3.4x sdpa), sdpa, eager, flash_attention_2
GRADIENT_CHECKPOINTING = 0.125       # share of layers recomputed in backward: 0.125 fastest within 24 GiB, 1 least memory (8 GiB)
LORA_R = 32                          # adapter rank
LORA_ALPHA = 32                      # adapter scale = alpha / r
LORA_DROPOUT = 0.1                   # dropout on the adapter input
BF16_ADAPTERS = True                 # adapter maths in 16 bits, a lean LoRA forward (weights stay fp32); false: peft's, fp32
LORA_TARGETS = []                    # module names, comma-separated; empty: q,k,v,dense (phi), q,k,v,o (llama)
FULL_COPIES = False                  # train full lm_head + embed_tokens copies (the reference) instead of token rows
PACKED = True                        # padding-free rows; false: right-padded batches
TOKENS_PER_BATCH = 8192              # tokens per micro-batch (per GPU), >= MAX_LENGTH; ~the reference's 16 x ~480
GRAD_ACCUM = 1                       # micro-batches per optimizer step (per GPU)
OPTIMIZER = "adamw"                  # adamw: torch's AdamW (fused on a GPU); paged_adamw_32bit: the reference's
                                     # (bitsandbytes; the same maths, but it waits for the GPU after each tensor)
LR = 2e-5                            # learning rate, constant after warmup
WARMUP_STEPS = 0                     # linear warmup, optimizer steps
WEIGHT_DECAY = 0.0                   # AdamW weight decay
GRAD_CLIP = 1.0                      # max gradient norm (0: off)
EPOCHS = 20                          # passes over the training split
MAX_STEPS = 0                        # stop after this many optimizer steps (0: all epochs); rerun to go on
EVALS_PER_EPOCH = 2                  # eval loss this often per epoch (also before the first step and at the end)
SAVE_EVERY_STEPS = 0                 # extra checkpoints between the per-epoch ones (0: none)
KEEP_CHECKPOINTS = 3                 # newest checkpoints kept
LOG_EVERY = 10                       # print a progress line every this many steps
REPORT_TO = "none"                   # trackers of the curves, comma-separated: tensorboard, wandb, trackio, mlflow...
PUSH_TO_HUB = ""                     # hub repo (user/name) to upload the finished adapter and its card to (a token)
PRIVATE = False                      # make the pushed repository private
OVERWRITE = False                    # delete out/05_adapter and start afresh
# -----------------------------------------------------------------------------
configure(globals())
KNOBS = {k: v for k, v in globals().items() if k.isupper()}  # all of them, as given: the trackers' config

# Knobs that define what is learned: a resumed run must not change them.
RECIPE = {k: globals()[k] for k in ("STUDENT", "MAX_LENGTH", "TRAIN_ON_HEADER", "EVAL_FRACTION", "SEED",
                                    "LOAD_IN_4BIT", "DOUBLE_QUANT", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT",
                                    "LORA_TARGETS", "FULL_COPIES", "PACKED", "TOKENS_PER_BATCH", "GRAD_ACCUM",
                                    "OPTIMIZER", "LR", "WARMUP_STEPS", "WEIGHT_DECAY", "GRAD_CLIP")}
if OPTIMIZER not in ("adamw", "paged_adamw_32bit"):
    raise InputError(f"--optimizer {OPTIMIZER!r}: use adamw or paged_adamw_32bit")
if TOKENS_PER_BATCH < MAX_LENGTH:
    raise InputError(f"--tokens-per-batch ({TOKENS_PER_BATCH}) must be at least --max-length ({MAX_LENGTH})")
report_to = trackers(REPORT_TO)  # a missing package is one line now, not after the model is loaded
if PUSH_TO_HUB:
    from pipeline.hub import check_repo_id

    check_repo_id(PUSH_TO_HUB)  # before hours of training

# -----------------------------------------------------------------------------
# The model card and the push: at the end of a run, and when a finished run is run again

# The tokenizer's files as transformers saves them, the chat template among them.
TOKENIZER_FILES = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|"
                             r"vocab\.json|merges\.txt")
USAGE = """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("WHERE")  # ChatML: a turn ends at <|im_end|>
base = AutoModelForCausalLM.from_pretrained("BASE")
if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:  # rows for the ChatML tokens it added
    base.resize_token_embeddings(len(tokenizer))
model = PeftModel.from_pretrained(base, "WHERE")
messages = [{"role": "user", "content": "What has keys but cannot open locks?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
reply = model.generate(**inputs, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def adapter_card(info, repo=None):
    """The adapter's README.md from its run.json: base, data, training, recipe, and how to load it."""
    recipe = info["recipe"]
    header = card_header(info["student"], library_name="peft", pipeline_tag="text-generation",
                         tags=["lora", "qlora" if recipe["LOAD_IN_4BIT"] else "peft", "chatml", "riddles"])
    usage = USAGE.replace("WHERE", repo or str(out)).replace("BASE", info["student"])
    config = read_json(out / "adapter_config.json")
    return f"""{header}
# Riddle student: a LoRA adapter for {info['student']}

A LoRA adapter trained by stage 05 of the riddle pipeline on multi-turn riddle conversations in ChatML, the loss on \
the assistant's turns. The tokenizer ships with it: the ChatML tokens the base lacked were added (their embedding \
rows trained), and the chat template is the one training used.

- base model: {describe_base(info['student'])}; training loaded it \
{'in 4-bit NF4 (QLoRA)' if recipe['LOAD_IN_4BIT'] else 'unquantized'}
- adapter: rank {config['r']}, alpha {config['lora_alpha']}, on {', '.join(sorted(config['target_modules']))}
{training_section(info, out / 'log.jsonl')}
![train and eval loss](loss.png)

## Recipe

{recipe_section(recipe)}
## Use

{usage}
Or merge it into the base with the pipeline's `06_merge_and_chat.py`.
"""


def push(info):
    """Upload the adapter, tokenizer and chat template, loss curves and card of a finished run: not the
    checkpoints, the data split (the conversations have a data card of their own), logs or run.json."""
    names = ["adapter_config.json", "adapter_model.safetensors", "loss.png"]
    names += sorted(p.name for p in out.iterdir() if p.is_file() and TOKENIZER_FILES.fullmatch(p.name))
    url = push_files(PUSH_TO_HUB, out, names, adapter_card(info, PUSH_TO_HUB), private=PRIVATE,
                     message=f"Upload adapter: {info['student']} + LoRA, step {info['steps_done']:,}")
    print(f"pushed {out} (adapter, tokenizer, loss.png, README.md) to {url}")


# -----------------------------------------------------------------------------
# The conversations, and what is already in out/05_adapter; all checked before anything starts or is written

data_file, out = path(DATA), path(ADAPTER)
check_paths({"data": data_file}, {"adapter": out})
conversations = read_conversations(data_file)
check_unique_ids(conversations, data_file)  # one id twice would train on both copies
data_sha1 = hashlib.sha1(data_file.read_bytes()).hexdigest()
if len(conversations) < 2:
    raise InputError(f"{data_file}: {len(conversations)} conversation; need at least 2 (train and eval)")
# run.json is written first and marks the folder as ours: --overwrite never deletes a folder 05 did not make.
check_own_folder(out, "run.json", "data_sha1")

# With --report-to, accelerate's trackers log from the main process only; tensorboard's events go to <adapter>/runs.
accelerator = Accelerator(log_with=report_to or None,
                          project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")))
say = accelerator.print  # only the main process prints
main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
RECIPE["PROCESSES"] = world  # steps and batches depend on it too
RECIPE = json.loads(json.dumps(RECIPE))  # as run.json stores it (tuples become lists)
ckpt_dir = out / "checkpoints"
say(f"read {len(conversations):,} conversations from {data_file}")

run_file = out / "run.json"
previous = None
if run_file.exists() and not OVERWRITE:
    previous = read_json(run_file)
    try:
        previous["recipe"].setdefault("OPTIMIZER", "paged_adamw_32bit")  # a run from before the knob
        changed = [k.lower() for k in RECIPE if previous["recipe"].get(k) != RECIPE[k]]
        changed += ["data"] if previous["data_sha1"] != data_sha1 else []
    except (KeyError, AttributeError, TypeError):
        raise InputError(f"{run_file} is unreadable: rerun with --overwrite to start afresh") from None
    if changed:
        raise InputError(f"{out} holds a run with other {', '.join(changed)}: rerun with --overwrite to start afresh")
    # `finished` is written last, once the adapter, tokenizer and loss.png of the folder are whole. Without
    # it (a kill during the final save) the run goes on from its last checkpoint, here the last step, and
    # saves them again.
    target = min(previous.get("steps_per_epoch", math.inf) * EPOCHS, MAX_STEPS or math.inf)
    if "finished" in previous and previous["steps_done"] >= target:
        say(f"{out} is already trained to step {previous['steps_done']:,}: nothing to do (--overwrite to retrain)")
        if PUSH_TO_HUB and main:  # pushed again: after a failed push, rerunning the command is the retry
            push(previous)
        raise SystemExit(0)

# The split is a function of the data and the seed, so a resumed run recomputes the same one.
order = sorted(conversations, key=lambda r: r["id"])
random.Random(SEED).shuffle(order)
n_eval = max(1, round(len(order) * EVAL_FRACTION)) if EVAL_FRACTION > 0 else 0
eval_set, train_set = order[:n_eval], order[n_eval:]
say(f"split: {len(train_set):,} train, {len(eval_set):,} eval (seed {SEED})")

# -----------------------------------------------------------------------------
# The student: 4-bit base, LoRA adapters, ChatML tokens

model, tokenizer = load_student(STUDENT, LOAD_IN_4BIT, DOUBLE_QUANT, ATTN, str(accelerator.device),
                                GRADIENT_CHECKPOINTING)
torch.manual_seed(SEED)  # LoRA init
model = add_lora(model, LORA_R, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS, tokenizer.new_token_ids, FULL_COPIES)
adapters_in_bf16(model, BF16_ADAPTERS)
# The base as given (hub id, alias, project-relative folder), not this machine's resolved path: the adapter moves.
model.peft_config["default"].base_model_name_or_path = STUDENT
trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
say(f"student {STUDENT}: {sum(p.numel() for p in model.parameters()):,} parameters, "
    f"{sum(p.numel() for _, p in trainable):,} trainable; new ChatML token ids {tokenizer.new_token_ids}; "
    f"{'4-bit NF4' if LOAD_IN_4BIT else 'unquantized'}, compute {model.get_input_embeddings().weight.dtype}")


def encode(records):
    """ChatML ids and labels, cut to MAX_LENGTH; drops conversations left with nothing to learn."""
    examples, cut = [], 0
    for r in records:
        try:
            e = tokenize_chat(tokenizer, r["messages"], train_on_header=TRAIN_ON_HEADER)
        except InputError as err:  # a special token of this student's own (read_conversations knows the usual ones)
            raise InputError(f"{data_file}: conversation {r['id']}: {err}") from None
        if len(e["input_ids"]) > MAX_LENGTH:
            cut += 1
            e = {k: v[:MAX_LENGTH] for k, v in e.items()}
        if any(label != -100 for label in e["labels"][1:]):
            examples.append(e)
    return examples, cut


train_ex, train_cut = encode(train_set)
eval_ex, eval_cut = encode(eval_set)
if not train_ex:
    raise InputError(f"{data_file}: no training conversation keeps an assistant token within {MAX_LENGTH} tokens")
n_tokens = sum(len(e["input_ids"]) for e in train_ex)
n_supervised = sum(sum(label != -100 for label in e["labels"]) for e in train_ex)
say(f"train: {n_tokens:,} tokens, {n_supervised:,} supervised ({n_supervised / n_tokens:.0%}); "
    f"{train_cut + eval_cut:,} conversations cut to {MAX_LENGTH} tokens, "
    f"{len(train_set) + len(eval_set) - len(train_ex) - len(eval_ex):,} dropped (no assistant token left)")

train_batches = micro_batches(train_ex, TOKENS_PER_BATCH, PACKED, tokenizer.pad_token_id, SEED)
eval_batches = micro_batches(eval_ex, TOKENS_PER_BATCH, PACKED, tokenizer.pad_token_id, SEED)
fill = n_tokens / sum(b["input_ids"].numel() for b in train_batches)  # 1.0 when packed
steps_per_epoch = math.ceil(math.ceil(len(train_batches) / world) / GRAD_ACCUM)
total_steps = steps_per_epoch * EPOCHS
last_step = min(total_steps, MAX_STEPS) if MAX_STEPS else total_steps
eval_at = {math.ceil(steps_per_epoch * k / EVALS_PER_EPOCH) for k in range(1, EVALS_PER_EPOCH + 1)}
say(f"{len(train_batches):,} micro-batches of <= {TOKENS_PER_BATCH:,} tokens ({fill:.0%} real tokens), "
    f"{world} process(es) x {GRAD_ACCUM} per step: {steps_per_epoch:,} steps/epoch, "
    f"{total_steps:,} in {EPOCHS} epochs, running to step {last_step:,}")

# Everything is checked (inputs, student, LoRA targets, tokenization): only now is the folder written, so a
# failed start leaves it as it was. run.json first: it marks the folder as 05's (check_own_folder).
if main:
    if OVERWRITE and out.exists():
        shutil.rmtree(out)  # ours: checked above
    if previous is None:
        write_json_atomic(run_file, {"student": STUDENT, "data": DATA, "data_sha1": data_sha1, "recipe": RECIPE,
                                     "steps_done": 0})
    write_jsonl_atomic(out / "train.jsonl", train_set)
    write_jsonl_atomic(out / "eval.jsonl", eval_set)
accelerator.wait_for_everyone()

# -----------------------------------------------------------------------------
# Optimizer, resume, the training loop

params = [p for _, p in trainable]
if OPTIMIZER == "adamw":
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=accelerator.device.type == "cuda")
else:
    # Only here, once the inputs are checked: on CPU its import prints a kernel warning, and a bad input
    # must stay one line.
    import bitsandbytes as bnb

    if accelerator.device.type == "cpu":
        say("note: on CPU bitsandbytes' paged AdamW runs as plain 32-bit AdamW (nothing to page out)")
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=WEIGHT_DECAY)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (WARMUP_STEPS + 1)))
model, optimizer = accelerator.prepare(model, optimizer)
unwrapped = accelerator.unwrap_model(model)

start = 0
checkpoints = sorted(ckpt_dir.glob("step-[0-9]*[0-9]"))  # zero-padded: name order is step order
if checkpoints:
    try:  # weights_only: a checkpoint is data, never code to run
        state = torch.load(checkpoints[-1] / "state.pt", map_location=accelerator.device, weights_only=True)
        missing = {n for n, _ in trainable} - set(state["trainable"])
    except Exception as e:  # truncated or damaged (a kill cannot do it: checkpoints are renamed into place whole)
        raise InputError(f"{checkpoints[-1]}/state.pt is unreadable ({type(e).__name__}): delete that folder to "
                         f"resume from the checkpoint before it, or rerun with --overwrite") from None
    if missing:
        raise InputError(f"{checkpoints[-1]}: checkpoint lacks {sorted(missing)[0]}: rerun with --overwrite")
    unwrapped.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    start = state["step"]
    say(f"resuming from {checkpoints[-1].name} (step {start:,}, epoch {start / steps_per_epoch:.2f})")

log_file = out / "log.jsonl"
if main:
    # Records past the checkpoint belong to steps that will run again (from scratch: all, step 0's eval
    # too); a torn last line (a kill mid-write) is dropped as the data stages drop theirs.
    log = Appender(log_file, key="step")
    old = read_jsonl(log_file) if log.done and start else []
    log.close()
    write_jsonl_atomic(log_file, [r for r in old if r["step"] <= start])
    log = Appender(log_file, key="step")
    run = {"student": STUDENT, "data": DATA, "data_sha1": data_sha1, "recipe": RECIPE, "steps_done": start,
           "steps_per_epoch": steps_per_epoch, "train": len(train_ex), "eval": len(eval_ex),
           "train_tokens": n_tokens, "processes": world, "device": str(accelerator.device),
           "tracker_run_id": (previous or {}).get("tracker_run_id") or
           f"{re.sub(r'[^A-Za-z0-9_.-]', '-', out.name)}-{secrets.token_hex(4)}"}
    write_json_atomic(run_file, run)
    if report_to:
        # One run across restarts: tensorboard's new event file drops the steps after the checkpoint (they run
        # again), as log.jsonl did above; wandb and trackio resume the run whose id run.json keeps.
        accelerator.init_trackers(
            "riddle-student", config={k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                                      for k, v in KNOBS.items()} | {"PROCESSES": world},
            init_kwargs={"tensorboard": {"purge_step": start + 1 if start else 0},
                         "wandb": {"id": run["tracker_run_id"], "resume": "allow", "name": out.name, "dir": str(out)},
                         "trackio": {"name": run["tracker_run_id"], "resume": "allow"}})


def write_log(record):
    if main:
        log.write([record])


def on_device(batch):
    return {k: v.to(accelerator.device) for k, v in batch.items()}


def real_tokens(batch):
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def peak_memory():
    """For the trackers: the peak memory so far in GiB, the GPU's allocation (on a CPU: the process's resident set)."""
    if accelerator.device.type == "cuda":
        return {"memory/gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def evaluate():
    """Mean loss per supervised token over the eval split (each process takes a share)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for b in eval_batches[rank::world]:
            # The bare model: DDP's forward syncs buffers across processes, whose shares differ in size.
            total += torch.tensor([loss_sum(unwrapped, on_device(b)).item(), supervised_tokens(b)],
                                  device=total.device, dtype=torch.float64)
    model.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item() if total[1] else float("nan")


def save_checkpoint(step):
    """Adapter (usable as is) + what resuming needs; written aside, then renamed into place."""
    if main:
        final, tmp = ckpt_dir / f"step-{step:06d}", ckpt_dir / f"step-{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp)
        torch.save({"step": step, "trainable": {n: p.detach() for n, p in trainable},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
        fsync_tree(tmp)  # whole on disk before its name says it is a checkpoint
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_path(ckpt_dir)
        for old_ckpt in sorted(ckpt_dir.glob("step-[0-9]*[0-9]"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old_ckpt)
        run.update(steps_done=step)
        write_json_atomic(run_file, run)
    accelerator.wait_for_everyone()


if start == 0 and eval_batches:
    eval_loss = evaluate()
    write_log({"step": 0, "epoch": 0.0, "eval_loss": eval_loss})
    accelerator.log({"eval/loss": eval_loss}, step=0)
    say(f"step 0: eval loss {eval_loss:.4f}")
model.train()
t0, seen, step = time.time(), 0, start
for epoch in range(start // steps_per_epoch, EPOCHS):
    # Every process gets the same number of micro-batches: the short ones repeat the first few.
    order = list(range(len(train_batches)))
    random.Random(seed_of(SEED, "epoch", epoch)).shuffle(order)
    order += order[:-len(order) % world]
    mine = order[rank::world]
    for i in range(steps_per_epoch):
        step = epoch * steps_per_epoch + i + 1
        if step <= start:
            continue
        if step > last_step:
            break
        t_step = time.time()
        group = [on_device(train_batches[j]) for j in mine[i * GRAD_ACCUM:(i + 1) * GRAD_ACCUM]]
        torch.manual_seed(seed_of(SEED, "step", step, rank))  # dropout masks: resume draws the same ones
        counts = torch.tensor([sum(supervised_tokens(b) for b in group), 0.0], device=accelerator.device)
        n_step = accelerator.reduce(counts, "sum")[0].item()  # supervised tokens of the step, all processes
        for k, b in enumerate(group):
            sync = contextlib.nullcontext() if k == len(group) - 1 else accelerator.no_sync(model)
            with sync:
                lsum = loss_sum(model, b)
                accelerator.backward(lsum * world / n_step)  # DDP averages over processes
            counts[1] += lsum.detach()
        if GRAD_CLIP:
            accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        lr = optimizer.param_groups[0]["lr"]  # this step's
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(counts, "sum")[1].item() / n_step
        step_tokens = accelerator.reduce(torch.tensor(sum(real_tokens(b) for b in group), device=accelerator.device),
                                         "sum").item()
        seen += step_tokens
        write_log({"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss})
        if report_to:
            accelerator.log({"train/loss": loss, "train/epoch": step / steps_per_epoch, "train/learning_rate": lr,
                             "train/tokens_per_second": step_tokens / (time.time() - t_step), **peak_memory()},
                            step=step)
        if step % LOG_EVERY == 0 or step == last_step:
            rate = seen / (time.time() - t0)
            memory = f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if torch.cuda.is_available() else ""
            say(f"step {step:,}/{last_step:,} epoch {step / steps_per_epoch:.2f}: loss {loss:.4f}, "
                f"{rate:,.0f} tok/s{memory}, {time.time() - t0:,.0f} s")
        if eval_batches and (i + 1 in eval_at or step == last_step):
            eval_loss = evaluate()
            write_log({"step": step, "epoch": round(step / steps_per_epoch, 4), "eval_loss": eval_loss})
            accelerator.log({"eval/loss": eval_loss}, step=step)
            say(f"step {step:,}: eval loss {eval_loss:.4f}")
        if i + 1 == steps_per_epoch or step == last_step or (SAVE_EVERY_STEPS and step % SAVE_EVERY_STEPS == 0):
            save_checkpoint(step)
    if step >= last_step:
        break

# -----------------------------------------------------------------------------
# The final adapter, the loss curves, the summary

seconds = time.time() - t0
first = last = float("nan")
final = max(start, last_step)  # the checkpoint's step when there was nothing left to train
if main:
    log.close()
    # run.json was rewritten without `finished` when this run started: 06 refuses the folder, and a rerun
    # saves again, until the line below marks these files whole.
    unwrapped.save_pretrained(out)
    saved = tokenizer.save_pretrained(out)  # with chat_template.jinja: the ChatML that training used
    train_log, eval_log = read_train_log(log_file)
    if eval_log:
        first, last = eval_log[0][2], eval_log[-1][2]
    plot_loss(train_log, eval_log, out / "loss.png")  # the picture 07 shows too
    run.update(steps_done=final, seconds=round(seconds, 1), tokens_per_second=round(seen / max(seconds, 1e-9)))
    write_text_atomic(out / "README.md", adapter_card(run))  # over peft's template
    # On disk before run.json says `finished`: past a power loss too, a finished folder holds whole files.
    fsync_tree(out, ["adapter_config.json", "adapter_model.safetensors", "loss.png", *(Path(f).name for f in saved)])
    run.update(finished=final >= total_steps)
    write_json_atomic(run_file, run)
accelerator.end_training()
if start >= last_step:
    say(f"05: nothing left to train; saved the adapter of step {final:,} in {out}")
else:
    say(f"05: trained steps {start + 1:,}-{last_step:,} of {total_steps:,} ({last_step / steps_per_epoch:.2f} epochs) "
        f"on {len(train_ex):,} conversations in {seconds:,.0f} s ({seen / max(seconds, 1e-9):,.0f} tok/s); "
        f"eval loss {first:.4f} -> {last:.4f}; adapter in {out}")
if PUSH_TO_HUB and main:
    push(run)
