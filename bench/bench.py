"""GPU benchmark: the reference recipe and ours side by side, same run, same card.

Random weights of the real shapes (throughput does not depend on weight values), random
token ids instead of text. Five parts, each writing JSON under --out:
  gen    Mistral-7B shape, bf16: the reference loop (HF generate, one prompt at a time) on
         the first requests vs ours on all requests (slot_generate, as HFBackend runs on a
         GPU), HF generate in static batches, and transformers' continuous batching.
         Each request's reply length is drawn from 60-500 and forced (eos at that length).
         Checks: fp32 greedy = HF generate; in bf16, the decode logits of the flash and split-KV
         attention and the fused layers vs whole-slot sdpa through HF's layers, and of prompts whose
         shared head is prefilled once vs with each prompt; kernels.self_check.
  profile where a decode step's time goes (graph replay with and without sampling, CUDA time
         per kind of kernel) at 256 and 384 slots of realistic context; a packed prefill call and
         its kernels; the weight matmuls of one decode step at 64 to 16k rows (gen.gemm_sweep).
         bench/gemm_probe.py times them one matrix at a time, every 8 rows.
  train  Phi-2 shape, 4-bit NF4 QLoRA r=32: the reference (bs 1, GA 16, grad checkpointing,
         full fp32 lm_head/embed copies) vs packed token-budget micro-batches with varlen
         attention, trainable token rows, per-token-mean loss, at several budgets,
         checkpointing levels and flags (fused GELU, bf16 adapters); --train-profile
         breaks one configuration's micro-batch down by kind of kernel.
  ddp    the best train configuration under --ddp-max-gib, under `accelerate launch`
         (run it with --num_processes 1 and 2; each writes its row to ddp.json).
  report merge the JSON files, print the table, write --results (markdown).
The parts live in gen.py (gen, profile) and train.py (train, ddp); this file holds the knobs, the helpers they
share, the report and the dispatch. To compare with an earlier engine, run this file in a git worktree of that
commit (git worktree add ../old COMMIT) on the same card, alternating with this tree's runs.

Reads: nothing (a random Phi-2 is saved once to --model-dir for load_student).
Writes: {out}/gen.json, profile.json, train.json, ddp.json: {"card", "versions", "rows": [{"part",
  "config", "tokens", "seconds", "tok_s", "peak_gib", "reserved_gib", "ratio", "bound_frac"}]}

  python bench/bench.py --part=gen --out=/tmp/bench          # one GPU
  python bench/bench.py --part=profile --out=/tmp/bench
  python bench/bench.py --part=train --out=/tmp/bench --train-configs=varlen:16384:1:chunked:fused
  accelerate launch --num_processes 2 bench/bench.py --part=ddp --out=/tmp/bench
  python bench/bench.py --part=report --out=/tmp/bench       # table -> bench/RESULTS.md
  python bench/bench.py --part=gen --tiny                    # CPU smoke test of the script, tiny shapes
Runtime on an H100: gen 6.5 min; train, then DDP with 1 and 2 processes, 4 min together (a 2x H100 host).
On an H200 (2026-11-28): profile 1.5 min; gen without the static batch and continuous batching 2.5 min.
Needs bitsandbytes for train/ddp; no tokenizer or weights (random), no network.
"""

import gc
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gen  # noqa: E402
import train  # noqa: E402

from pipeline.knobs import configure  # noqa: E402
from pipeline.records import path  # noqa: E402

# -----------------------------------------------------------------------------
PART = "gen"  # gen, profile, train, ddp or report
OUT = "out/bench"  # folder for the JSON files
RESULTS = "bench/RESULTS.md"  # report: markdown table written here
NOTE = ""  # report: a line printed under the header (how the runs were made)
MODEL_DIR = "/tmp/bench_phi2"  # train/ddp: the random Phi-2 saved for load_student
SEED = 0  # draws of lengths and token ids
GEN_REQUESTS = 512  # requests of the generation benchmark
PROMPT_MIN = 150  # prompt tokens, uniform between min and max
PROMPT_MAX = 450
REPLY_MIN = 60  # reply tokens (forced), uniform between min and max
REPLY_MAX = 500
TEMPERATURE = 0.7  # sampling as the stages do (per-row seeded)
TOP_P = 0.95
REF_SECONDS = 60.0  # time box of the one-prompt-at-a-time reference loop
SLOTS = ["256:flat", "256", "384", "512"]  # slot_generate: max rows decoding at once[:kernel|flash|sdpa = that
# decode attention, else the best][:hf = HF's decoder layers in decode, not the fused ones][:flat = every decode
# step over all slots, not the fewest that hold the rows decoding] (those three: EngineOptions)[:kv0.8 = the KV
# cache in 80% of free memory, not 60%][:fp8 = the layers' matmuls on float8 weights (slot_generate fp8=True)]
# [:fp8kv = the KV cache in float8 (kv_fp8=True)]
STATIC_REQUESTS = 256  # HF generate in one left-padded batch of this many requests (0: skip)
CB_SECONDS = 60.0  # time box of continuous batching (0: skip)
TRAIN_SEQS = 400  # training sequences drawn (lengths ~N(480, 180) clipped)
LEN_MEAN = 480
LEN_STD = 180
LEN_MIN = 120
LEN_MAX = 1024
REF_STEPS = 3  # reference optimizer steps timed (GA 16 each), after one warm-up step
TRAIN_TOKENS = 48000  # tokens timed per configuration of ours, after two warm-up micro-batches
TRAIN_CONFIGS = ["varlen:8192:0.125:sum:fused:bf16lora", "varlen:8192:0.25:full:fused:peftbf16",
                 "varlen:8192:1:chunked:fused", "varlen:16384:1:chunked:fused", "varlen:4096:0:sum:fused",
                 "sdpa:4096:1:sum"]  # attention:budget:ckpt fraction:loss[:flag...] (parse); the first is 05's
# defaults, the second 05's of 2026-11-28
PROFILE_PATHS = ["sdpa:hf", "flash:hf", "flash:fused", "auto:fused"]  # profile: decode attention:layers (hf, fused, or
# fp8 = fused with float8 weights, fp8kv = and a float8 KV cache); prefill runs for each named, the matmul sweep for
# fused and fp8
TRAIN_PROFILE = ""  # train: profile 2 micro-batches of this configuration (one of TRAIN_CONFIGS)
DDP_MAX_GIB = 24.0  # ddp: best train configuration whose reserved peak fits this
DDP_CONFIG = ""  # ddp: a configuration string to use instead of the best one
TINY = False  # tiny shapes on CPU: a smoke test of this script
# -----------------------------------------------------------------------------
configure(globals())
knobs = {k: v for k, v in globals().items() if k.isupper()}  # the knobs above, overrides applied

import torch  # noqa: E402

out_dir = path(OUT)
out_dir.mkdir(parents=True, exist_ok=True)
device = "cuda" if torch.cuda.is_available() and not TINY else "cpu"
GIB = 2**30


def versions():
    import accelerate
    import peft
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "accelerate": accelerate.__version__}
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        v["bitsandbytes"] = None
    return v


def card():
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"


def save(name, rows, **extra):
    data = {"card": card(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows, **extra}
    (out_dir / name).write_text(json.dumps(data, indent=1))


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory():
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory():
    if device != "cuda":
        return None, None
    return round(torch.cuda.max_memory_allocated() / GIB, 2), round(torch.cuda.max_memory_reserved() / GIB, 2)


def copy_bandwidth():
    """Device memory bandwidth from a large copy (bytes read + written), GB/s."""
    x = torch.empty(2 * GIB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * 10 * x.numel() / (time.perf_counter() - t) / 1e9


# What the parts in gen.py and train.py read: the knobs, where to run and write, and the helpers above.
bench = SimpleNamespace(**knobs, device=device, out_dir=out_dir, save=save, sync=sync, reset_memory=reset_memory,
                        memory=memory, copy_bandwidth=copy_bandwidth, card=card, versions=versions)


# =============================================================================
# Report


def run_report():
    parts = {}
    for name in ("gen", "train", "ddp"):
        file = out_dir / f"{name}.json"
        if file.exists():
            parts[name] = json.loads(file.read_text())
    if not parts:
        print(f"no JSON under {out_dir}")
        return
    first = next(iter(parts.values()))
    v = first["versions"]
    bnb = next((p["versions"]["bitsandbytes"] for p in parts.values() if p["versions"].get("bitsandbytes")), None)
    lines = [f"Measured {first['date']} on {first['card']} (torch {v['torch']}, transformers {v['transformers']}, "
             f"peft {v['peft']}, bitsandbytes {bnb}, accelerate {v['accelerate']}); "
             "random weights of the real shapes." + (f" {NOTE}" if NOTE else ""), ""]
    heads = {"gen": "Generation, Mistral-7B shape, bf16 unless named: output tok/s (ratio to the batch-1 reference)",
             "train": "QLoRA, Phi-2 shape, 4-bit NF4, r=32: non-padding tok/s (ratio to the reference)",
             "ddp": "QLoRA under accelerate launch (ratio to one process)"}
    for name, data in parts.items():
        lines += [f"**{heads[name]}** ({data['card']}, {data['date']})", "",
                  "| configuration | tok/s | ratio | peak GiB (reserved) | of bound | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in data["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | - | - | - | - | {r['error']} |")
                continue
            mem = f"{r['peak_gib']} ({r['reserved_gib']})" if r.get("peak_gib") is not None else "-"
            frac = f"{100 * r['bound_frac']:.0f}%" if r.get("bound_frac") is not None else "-"
            lines.append(f"| {r['config']} | {r['tok_s']:,.0f} | {r.get('ratio')}x | {mem} | {frac} | "
                         f"{r.get('note', '')} |")
        if name == "gen":
            lines.append(f"\nBound: copy bandwidth {data.get('bandwidth_gbs')} GB/s over (weights / rows + mean "
                         f"context {data.get('mean_context')} tokens x KV bytes per token) per output token.")
        if name == "train":
            s = data.get("same_loss", {})
            if s:
                lines.append(f"\nSame loss on 8 sequences (bf16): packed varlen vs padded sdpa relative difference "
                             f"{s['rel_packed_padded']:.1e}; chunked vs full-logits {s['rel_chunked']:.1e}. Bound: "
                             "92k tok/s without checkpointing, 61k with (H100 bf16 peak).")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if RESULTS:
        path(RESULTS).write_text("# Benchmark results\n\n" + text)


if PART == "report":
    run_report()
else:
    {"gen": gen.run_gen, "profile": gen.run_profile, "train": train.run_train, "ddp": train.run_ddp}[PART](bench)
