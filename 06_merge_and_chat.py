"""Stage 06: merge the LoRA adapter into the unquantized student, save the model, and chat with it.

The base is loaded unquantized (bf16 on GPU, fp32 on CPU; merging into the 4-bit weights would lose
quality), the adapter applied and merged. Two checks before saving: the merged weights differ from the
base's, and the merged model's logits on a probe conversation match the unmerged adapter model's (same
precision) within MERGE_TOLERANCE x the largest logit.

Reads:  out/05_adapter/  adapter, tokenizer + chat template, run.json (names the student), eval.jsonl (probe)
Writes: out/06_merged/   merged model, tokenizer + chat template, generation config (eos <|im_end|>, pad),
                         merge.json (adapter fingerprint, checks and their numbers)

    python 06_merge_and_chat.py                                  # merge once, then chat (/reset, /exit)
    python 06_merge_and_chat.py --prompt="What has hands but cannot clap?" --temperature=0   # one reply
    transformers chat out/06_merged                              # other tools read the folder as well

Resume: the merge is skipped when out/06_merged was made from the current adapter (--overwrite redoes it).
Runtime: merging phi-2 ~1-2 min (GPU or CPU, mostly loading); the bundled model on CPU ~20 s.
"""

import hashlib
import json
import shutil
import time

from common import (InputError, best_device, configure, default_dtype, load_model, load_tokenizer, path,
                    read_conversations, require_stage, setup_chat_tokenizer)

# -----------------------------------------------------------------------------
ADAPTER = "out/05_adapter"   # stage 05's output folder
OUT = "out/06_merged"        # the merged model
STUDENT = ""                 # base model; empty: the student named in the adapter's run.json
DTYPE = "auto"               # auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32
MERGE_TOLERANCE = 0.0        # max |merged - unmerged logit| / max |logit|; 0: 1e-4 in fp32, 5e-2 in bf16
PROMPT = ""                  # reply to this one message and exit (no interactive chat)
CHAT = True                  # chat after merging; false: merge only
MAX_NEW_TOKENS = 256         # reply length cap, tokens
TEMPERATURE = 0.7            # sampling temperature; 0: greedy
TOP_P = 0.9                  # nucleus sampling
SEED = 1234                  # sampling seed
PUSH_TO_HUB = ""             # hub repo (user/name) to upload the merged model to; needs a token
OVERWRITE = False            # merge again even if out/06_merged is current
# -----------------------------------------------------------------------------
configure(globals())

import torch

adapter, out = path(ADAPTER), path(OUT)
require_stage(adapter / "adapter_config.json", "05_finetune_phi2.py")
run = json.loads((adapter / "run.json").read_text()) if (adapter / "run.json").exists() else {}
student = STUDENT or run.get("student") or json.loads((adapter / "adapter_config.json").read_text())[
    "base_model_name_or_path"]
fingerprint = hashlib.sha1(b"".join((adapter / f).read_bytes() for f in ("adapter_config.json",
                                                                        "adapter_model.safetensors"))).hexdigest()
device = best_device()
dtypes = {"auto": default_dtype(device), "bfloat16": torch.bfloat16, "float32": torch.float32}
if DTYPE not in dtypes:
    raise InputError(f"--dtype wants auto, bfloat16 or float32, got {DTYPE!r}")
dtype = dtypes[DTYPE]
tolerance = MERGE_TOLERANCE or (1e-4 if dtype == torch.float32 else 5e-2)

# -----------------------------------------------------------------------------
# Merge: base + adapter -> one plain model, checked

merge_file = out / "merge.json"
current = merge_file.exists() and json.loads(merge_file.read_text()).get("adapter_sha1") == fingerprint
if current and not OVERWRITE:
    print(f"{out} is current (merged from this adapter): skipping the merge (--overwrite to redo)")
else:
    from peft import PeftModel

    t0 = time.time()
    tokenizer = load_tokenizer(str(adapter))  # as trained: ChatML tokens, eos, pad, chat template
    base = load_model(student, device, dtype)
    setup_chat_tokenizer(tokenizer, base)  # the same rows, eos and pad as in training
    before = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    print(f"loaded {student} ({dtype}, {device}) + adapter {adapter} in {time.time() - t0:.0f} s")

    # The probe: a held-out conversation, as the model will see it.
    probe_file = adapter / "eval.jsonl"
    probe = read_conversations(probe_file)[0]["messages"] if probe_file.exists() else [
        {"role": "user", "content": "What has keys but cannot open locks?"},
        {"role": "assistant", "content": "A piano."}]
    ids = tokenizer.apply_chat_template(probe, return_tensors="pt", return_dict=True)["input_ids"].to(device)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits.float()
    diff = ((merged - unmerged).abs().max() / unmerged.abs().max()).item()
    after = merged_model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].detach().cpu())]
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    adapted = [k for k in before if k.endswith(".weight") and k.split(".")[-2] in targets]
    unchanged = sorted(set(adapted) - set(changed))
    print(f"merge check: {len(changed):,} of {len(before):,} tensors changed ({len(adapted) - len(unchanged):,} of "
          f"{len(adapted):,} adapted ones); logits on a {ids.shape[1]}-token probe: max |merged - unmerged| = "
          f"{diff:.2e} x max |logit| (tolerance {tolerance:.0e})")
    if not changed:
        raise SystemExit("error: the merged weights equal the base's: the adapter learned nothing (or was empty)")
    if unchanged:
        print(f"warning: {len(unchanged)} adapted tensors did not change, e.g. {unchanged[0]} (update below "
              f"{dtype} resolution?)")
    if not diff <= tolerance:
        raise SystemExit(f"error: merged logits differ from the adapter model's by {diff:.2e} (> {tolerance:.0e})")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_model.save_pretrained(tmp)  # config + generation_config, eos <|im_end|> and pad set above
    tokenizer.save_pretrained(tmp)     # with chat_template.jinja
    info = {"adapter": str(adapter), "adapter_sha1": fingerprint, "student": student, "dtype": str(dtype),
            "changed_tensors": len(changed), "adapted_tensors": len(adapted), "unchanged_adapted": unchanged,
            "probe_tokens": ids.shape[1], "max_logit_diff_rel": diff, "tolerance": tolerance}
    (tmp / "merge.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"06: merged {adapter} into {student} -> {out} in {time.time() - t0:.0f} s")
    del model, merged_model, base, before, after

if PUSH_TO_HUB:
    pushed = load_model(str(out), "cpu", dtype)
    pushed.push_to_hub(PUSH_TO_HUB)
    load_tokenizer(str(out)).push_to_hub(PUSH_TO_HUB)
    print(f"pushed {out} to https://huggingface.co/{PUSH_TO_HUB}")

# -----------------------------------------------------------------------------
# Chat: streamed replies that end at <|im_end|>

if not (CHAT or PROMPT):
    raise SystemExit(0)
from transformers import TextStreamer

tokenizer = load_tokenizer(str(out))
model = load_model(str(out), device, dtype)
# No clean-up of spaces: on byte-level BPE it deletes real spaces before punctuation.
streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False)
torch.manual_seed(SEED)


def reply(messages):
    """Stream the assistant's next turn to stdout; return its text."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    sampling = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P) if TEMPERATURE > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        new = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **sampling)[0, inputs["input_ids"].shape[1]:]
    if new[-1] != tokenizer.eos_token_id:
        print(f"[cut at {MAX_NEW_TOKENS} tokens: no {tokenizer.eos_token} yet]")
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


if PROMPT:
    reply([{"role": "user", "content": PROMPT}])
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
    messages.append({"role": "user", "content": text})
    print("bot> ", end="", flush=True)
    messages.append({"role": "assistant", "content": reply(messages)})
