"""Stage 06: merge the LoRA adapter into the unquantized student, save the model, and chat with it.

The base is loaded unquantized in fp32 (merging into the 4-bit weights would lose quality), the adapter
applied and merged, and the merged model saved in DTYPE (bf16 on a GPU). Two checks before saving: the
adapted weights differ from the base's, and the merged model's logits on a probe conversation match the
unmerged adapter model's within MERGE_TOLERANCE x the largest logit, both in fp32: there a correct merge
differs by rounding (~1e-6) and a wrong one by far more, whatever the model's size. What saving in DTYPE
then changes is measured and reported, not judged: it is the dtype's own rounding.

Reads:  out/05_adapter/  adapter, tokenizer + chat template, run.json (names the student), eval.jsonl (probe);
                         the student as 05 was given it: a hub id, the alias smollm2, or a folder relative to
                         the project, so a moved adapter finds its base (--student=... names another)
Writes: out/06_merged/   merged model, tokenizer + chat template, generation config (eos <|im_end|>, pad),
                         merge.json (adapter fingerprint, checks and their numbers), README.md (model card:
                         base, adapter, data, recipe, the merge checks)

    python 06_merge_and_chat.py                                  # merge once, then chat (/reset, /exit)
    python 06_merge_and_chat.py --prompt="What has hands but cannot clap?" --temperature=0   # one reply
    transformers chat out/06_merged                              # other tools read the folder as well
    python 06_merge_and_chat.py --chat=false --push-to-hub=user/riddle-student   # merge (if needed) and upload

--push-to-hub uploads the folder (model, tokenizer, chat template, model card; not merge.json, which names local
paths) in one push; a failed push is one line and changes no local file.

Resume: the merge is skipped when out/06_merged was made from the current adapter (--overwrite redoes it). The
new folder's files are fsynced before it is renamed into place: past a power loss too, out/06_merged is whole.
Runtime: ~0.6 min on one H100 for Phi-2, then the chat; the bundled model on CPU ~20 s.
"""

import hashlib
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TextStreamer

from common import best_device, chat_replies, default_dtype, load_model, load_tokenizer, setup_chat_tokenizer
from pipeline.knobs import InputError, configure
from pipeline.records import (check_own_folder, check_paths, control_string, fsync_path, fsync_tree, path,
                              read_conversations, read_json, require_stage, seed_of, write_json_atomic,
                              write_text_atomic)
from pipeline.training import card_header, describe_base, push_files, recipe_section, training_section

# -----------------------------------------------------------------------------
ADAPTER = "out/05_adapter"   # stage 05's output folder
MERGED = "out/06_merged"     # this stage's output: the merged model
STUDENT = ""                 # base model; empty: the student named in the adapter's run.json
DTYPE = "auto"               # saved model: auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32; merging is fp32
MERGE_TOLERANCE = 1e-4       # max |merged - unmerged logit| / max |logit|, both in fp32
PROMPT = ""                  # reply to this one message and exit (no interactive chat)
CHAT = True                  # chat after merging; false: merge only
MAX_NEW_TOKENS = 256         # reply length cap, tokens
TEMPERATURE = 0.7            # sampling temperature; 0: greedy
TOP_P = 0.9                  # nucleus sampling
SEED = 1234                  # sampling seed (each turn draws from its own)
PUSH_TO_HUB = ""             # hub repo (user/name) to upload the merged model and its card to; needs a token
PRIVATE = False              # make the pushed repository private
OVERWRITE = False            # merge again even if out/06_merged is current
# -----------------------------------------------------------------------------
configure(globals())

adapter, out = path(ADAPTER), path(MERGED)
check_paths({"adapter": adapter}, {"merged": out})
require_stage(adapter / "adapter_config.json", "05_finetune_phi2.py")
require_stage(adapter / "adapter_model.safetensors", "05_finetune_phi2.py")
run = read_json(adapter / "run.json") if (adapter / "run.json").exists() else {}  # none: an adapter from elsewhere
if "steps_done" in run and "finished" not in run:  # 05 writes `finished` once its final save is whole
    raise InputError(f"{adapter}: stage 05 has not finished saving this adapter (stopped or still running): "
                     f"rerun 05_finetune_phi2.py to finish it")
adapter_config = read_json(adapter / "adapter_config.json")
student = STUDENT or run.get("student") or adapter_config.get("base_model_name_or_path")
if not student:
    raise InputError(f"{adapter}: no student named in run.json or adapter_config.json: pass --student")
fingerprint = hashlib.sha1(b"".join((adapter / f).read_bytes() for f in ("adapter_config.json",
                                                                        "adapter_model.safetensors"))).hexdigest()
check_own_folder(out, "merge.json", "adapter_sha1")  # a merge replaces the folder: never someone else's
if PUSH_TO_HUB:
    from pipeline.hub import check_repo_id

    check_repo_id(PUSH_TO_HUB)  # before minutes of merging
if control_string(PROMPT):  # before minutes of merging (the student's own special tokens are checked at chat)
    raise InputError(f"--prompt holds {control_string(PROMPT)!r}, a chat control token; text must stay text")
device = best_device()
dtypes = {"auto": default_dtype(device), "bfloat16": torch.bfloat16, "float32": torch.float32}
if DTYPE not in dtypes:
    raise InputError(f"--dtype wants auto, bfloat16 or float32, got {DTYPE!r}")
dtype = dtypes[DTYPE]

# -----------------------------------------------------------------------------
# The model card: what the merged model is, from merge.json and the adapter's run.json and log.jsonl

USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("WHERE")  # ChatML: a turn ends at <|im_end|>, the generation config's eos
model = AutoModelForCausalLM.from_pretrained("WHERE")
messages = [{"role": "user", "content": "What has keys but cannot open locks?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
reply = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

or chat with it: `transformers chat WHERE`.
"""


def merged_card(info, repo=None):
    """README.md of the merged folder: base, adapter, data and recipe (05's run.json), the merge checks (merge.json)."""
    header = card_header(info["student"], library_name="transformers", pipeline_tag="text-generation",
                         tags=["chatml", "riddles", "lora", "merged"])
    trained = (f"{training_section(run, adapter / 'log.jsonl')}\n## Recipe\n\n{recipe_section(run['recipe'])}"
               if "recipe" in run and "steps_per_epoch" in run else "- an adapter without stage 05's run.json\n")
    unchanged = info["unchanged_adapted"]
    return f"""{header}
# Riddle student: {info['student']} with its LoRA adapter merged

The LoRA adapter that stage 05 of the riddle pipeline trained on multi-turn riddle conversations, merged into the \
weights of its base model: a plain transformers model, no peft needed. It speaks ChatML; its tokenizer and chat \
template are the ones training used.

## Base, adapter and training

- base model: {describe_base(info['student'])}
- adapter: `{Path(info['adapter']).name}` (sha1 of its config and weights `{info['adapter_sha1'][:12]}`), rank \
{adapter_config.get('r', '?')}, alpha {adapter_config.get('lora_alpha', '?')}, on \
{', '.join(sorted(adapter_config.get('target_modules') or [])) or '?'}
{trained}
## Merge check

Merged in float32, saved in {info['dtype'].removeprefix('torch.')}:

- {info['adapted_tensors'] - len(unchanged):,} of {info['adapted_tensors']:,} adapted weight tensors changed \
({info['changed_tensors']:,} watched tensors in all: adapted weights, embedding rows of added tokens)\
{f'; unchanged: {", ".join(unchanged)}' if unchanged else ''}
- logits of the merged model against the unmerged adapter model on a held-out conversation of \
{info['probe_tokens']:,} tokens, both float32: max |difference| = {info['max_logit_diff_rel']:.2e} x max |logit| \
(tolerance {info['tolerance']:.0e})
- saving in {info['dtype'].removeprefix('torch.')} moves them {info['saved_dtype_logit_diff_rel']:.2e} \
(that dtype's rounding)

## Use

{USAGE.replace('WHERE', repo or str(out))}"""


# -----------------------------------------------------------------------------
# Merge: base + adapter -> one plain model, checked

merge_file = out / "merge.json"
current = merge_file.exists() and read_json(merge_file).get("adapter_sha1") == fingerprint
if current and not OVERWRITE:
    print(f"{out} is current (merged from this adapter): skipping the merge (--overwrite to redo)")
else:
    t0 = time.time()
    tokenizer = load_tokenizer(str(adapter))  # as trained: ChatML tokens, eos, pad, chat template
    base = load_model(student, device, torch.float32)
    setup_chat_tokenizer(tokenizer, base)  # the same rows, eos and pad as in training
    # What a merge may change: the adapted weights, and the embedding rows of new tokens.
    targets = adapter_config.get("target_modules") or []
    embeddings = {base.get_input_embeddings(), base.get_output_embeddings()}
    watched = {f"{name}.weight" for name, m in base.named_modules()
               if name.rsplit(".", 1)[-1] in targets or m in embeddings}
    before = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items() if k in watched}
    adapted = [k for k in before if k.split(".")[-2] in targets]
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    print(f"loaded {student} (float32, {device}) + adapter {adapter} in {time.time() - t0:.0f} s")

    # The probe: a held-out conversation, as the model will see it.
    probe_file = adapter / "eval.jsonl"
    probe = read_conversations(probe_file)[0]["messages"] if probe_file.exists() else [
        {"role": "user", "content": "What has keys but cannot open locks?"},
        {"role": "assistant", "content": "A piano."}]
    ids = tokenizer.apply_chat_template(probe, return_tensors="pt", return_dict=True)["input_ids"].to(device)

    def rel_diff(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits.float()
        after = merged_model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k].detach().cpu())]
        merged_model.to(dtype)
        rounding = rel_diff(merged_model(input_ids=ids).logits.float(), merged)
    diff = rel_diff(merged, unmerged)
    unchanged = sorted(set(adapted) - set(changed))
    print(f"merge check: {len(changed):,} of {len(before):,} watched tensors changed "
          f"({len(adapted) - len(unchanged):,} of {len(adapted):,} adapted ones); logits on a {ids.shape[1]}-token "
          f"probe in fp32: max |merged - unmerged| = {diff:.2e} x max |logit| (tolerance {MERGE_TOLERANCE:.0e}); "
          f"saving in {dtype} moves them {rounding:.2e}")
    if not changed:
        raise SystemExit("error: the merged weights equal the base's: the adapter learned nothing (or was empty)")
    if unchanged:
        print(f"warning: {len(unchanged)} adapted tensors did not change, e.g. {unchanged[0]}")
    if not diff <= MERGE_TOLERANCE:
        raise SystemExit(f"error: merged logits differ from the adapter model's by {diff:.2e} "
                         f"(> {MERGE_TOLERANCE:.0e}): the merge is wrong; nothing was saved")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_model.save_pretrained(tmp)  # config + generation_config, eos <|im_end|> and pad set above
    tokenizer.save_pretrained(tmp)     # with chat_template.jinja
    info = {"adapter": str(adapter), "adapter_sha1": fingerprint, "student": student, "dtype": str(dtype),
            "changed_tensors": len(changed), "adapted_tensors": len(adapted), "unchanged_adapted": unchanged,
            "probe_tokens": ids.shape[1], "max_logit_diff_rel": diff, "tolerance": MERGE_TOLERANCE,
            "saved_dtype_logit_diff_rel": rounding}
    write_json_atomic(tmp / "merge.json", info)
    write_text_atomic(tmp / "README.md", merged_card(info))
    fsync_tree(tmp)  # whole on disk before its name says it is the merged model
    # Swapped in by renames: a kill at any moment leaves the old folder, the new one, or none (a rerun merges).
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    print(f"06: merged {adapter} into {student} -> {out} in {time.time() - t0:.0f} s")
    del model, merged_model, base, before, after

if PUSH_TO_HUB:
    # The folder as saved, its card naming the repository; merge.json stays here (it names local paths).
    info = read_json(merge_file)
    try:
        card = merged_card(info, PUSH_TO_HUB)
    except KeyError as e:
        raise InputError(f"{merge_file} has no {e} (an older 06 made it): rerun with --overwrite to merge "
                         f"again") from None
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and p.name not in ("merge.json", "README.md"))
    url = push_files(PUSH_TO_HUB, out, names, card, private=PRIVATE, message=f"Upload {info['student']} + LoRA, merged")
    print(f"pushed {out} (model, tokenizer, README.md) to {url}")

# -----------------------------------------------------------------------------
# Chat: streamed replies that end at <|im_end|>

if not (CHAT or PROMPT):
    raise SystemExit(0)
tokenizer = load_tokenizer(str(out))
model = load_model(str(out), device, dtype)
# No clean-up of spaces: on byte-level BPE it deletes real spaces before punctuation.
streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def reply(messages):
    """Stream the assistant's next turn to stdout; return its text."""
    (text, ended), = chat_replies(model, tokenizer, [messages], [seed_of(SEED, len(messages))],
                                  max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                                  streamer=streamer)
    if not ended:
        print(f"[cut at {MAX_NEW_TOKENS} tokens: no {tokenizer.eos_token} yet]")
    return text


if PROMPT:
    reply([{"role": "user", "content": PROMPT}])  # a control token in it: one line, exit 2
    raise SystemExit(0)

print(f"chatting with {out} ({device}); /reset starts over, /exit (or Ctrl-D) quits")
messages = []
while True:
    try:
        text = input("\nyou> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if text in ("/exit", "/quit"):
        break
    if text == "/reset":
        messages = []
        print("(new conversation)")
        continue
    if not text:
        continue
    found = control_string(text, tokenizer)
    if found:  # it would end the turn or open another: not sent, the chat goes on
        print(f"(not sent: {found!r} is a control token; text must stay text)")
        continue
    messages.append({"role": "user", "content": text})
    print("bot> ", end="", flush=True)
    messages.append({"role": "assistant", "content": reply(messages)})
