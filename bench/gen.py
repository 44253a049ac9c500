"""The gen and profile parts of bench.py: Mistral-7B shape, bf16, the reference loop vs the slot engine.

run_gen times HF generate one prompt at a time, slot_generate, HF generate in a static batch and
transformers' continuous batching, and checks the decode paths against each other; run_profile breaks a
decode step down by kind of kernel (kernel_table, which train.py's --train-profile uses too).
Every function that reads a knob, the device or a helper takes `bench` first: bench.py's knobs by name,
with device, out_dir and its helpers (save, sync, memory, ...).
"""

import json
import time
import traceback

import torch

from pipeline import engine
from pipeline.engine import EngineOptions, RowSampler
from pipeline.engine import force_lengths as force
from pipeline.engine import slot_generate


class ForceLength:
    """Logits processor: no eos before a row's drawn length, eos at it (HF generate form)."""

    def __init__(self, targets, eos):
        self.targets, self.eos, self.start = targets, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        steps = torch.full((scores.shape[0],), input_ids.shape[1] - self.start, device=scores.device)
        return force(scores, self.targets.to(scores.device), steps, self.eos)


def mistral(bench):
    """Mistral-7B-Instruct-v0.2's shape with random bf16 weights (TINY: a small one), its request mix, eos."""
    from transformers import AutoModelForCausalLM, MistralConfig

    if bench.TINY:
        cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
        n_req, p_lo, p_hi, r_lo, r_hi = 24, 10, 40, 5, 30
    else:  # Mistral-7B-Instruct-v0.2
        cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
        n_req, p_lo, p_hi = bench.GEN_REQUESTS, bench.PROMPT_MIN, bench.PROMPT_MAX
        r_lo, r_hi = bench.REPLY_MIN, bench.REPLY_MAX
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    eos = 2
    torch.manual_seed(bench.SEED)
    t = time.perf_counter()
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if bench.device == "cuda" else torch.float32)
    model.eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {weight_bytes / 1e9:.1f} GB of weights, built in {time.perf_counter() - t:.0f} s")
    return model, weight_bytes, eos, (n_req, p_lo, p_hi, r_lo, r_hi)


def run_gen(bench):
    from transformers import AutoModelForCausalLM, MistralConfig

    model, weight_bytes, eos, (n_req, p_lo, p_hi, r_lo, r_hi) = mistral(bench)
    cfg = model.config
    g = torch.Generator().manual_seed(bench.SEED)
    plens = torch.randint(p_lo, p_hi + 1, (n_req,), generator=g).tolist()
    targets = torch.randint(r_lo, r_hi + 1, (n_req,), generator=g)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in plens]
    seeds = torch.randint(0, 2**62, (n_req,), generator=g).tolist()
    order = sorted(range(n_req), key=lambda i: -plens[i])  # generate_all's order: longest prompt first
    rows, check = [], {}
    sorted_targets = targets[order].to(bench.device)  # slot_generate sees the prompts in `order`
    kv_token = slot_bytes_per_token(model)
    ctx = sum(t * (p + t / 2) for p, t in zip(plens, targets.tolist())) / targets.sum().item()
    bw = bench.copy_bandwidth() if bench.device == "cuda" else 1.0  # CPU smoke test: any number

    def bound(batch):
        """Output tok/s if each decode step only moved the weights once and each row's real context."""
        return bw * 1e9 / (weight_bytes / batch + ctx * kv_token)

    print(f"copy bandwidth {bw:,.0f} GB/s; mean context {ctx:.0f} tokens; bound at 256 rows {bound(256):,.0f} tok/s")

    def record(config, tokens, seconds, batch=256, note=""):
        alloc, reserved = bench.memory()
        row = {"part": "gen", "config": config, "tokens": int(tokens), "seconds": round(seconds, 2),
               "tok_s": round(tokens / seconds, 1), "peak_gib": alloc, "reserved_gib": reserved,
               "bound_tok_s": round(bound(batch)), "bound_frac": round(tokens / seconds / bound(batch), 3),
               "note": note}
        rows.append(row)
        ref = rows[0]["tok_s"]
        row["ratio"] = round(row["tok_s"] / ref, 1)
        print(f"  {config:<40} {row['tok_s']:>9,.1f} tok/s  x{row['ratio']:<7} {note}")
        bench.save("gen.json", rows, bandwidth_gbs=round(bw), mean_context=round(ctx),
                   weight_gb=round(weight_bytes / 1e9, 2), check=check)

    # Reference: HF generate, one prompt at a time, within a time box.
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]], device=bench.device), max_new_tokens=4, do_sample=False)
    bench.reset_memory()
    done, tokens, t = 0, 0, time.perf_counter()
    while done < n_req and time.perf_counter() - t < bench.REF_SECONDS:
        i = done
        ids = torch.tensor([prompts[i]], device=bench.device)
        procs = [ForceLength(targets[i:i + 1], eos),
                 RowSampler([seeds[i]], temperature=bench.TEMPERATURE, top_p=bench.TOP_P)]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=r_hi, do_sample=False, logits_processor=procs,
                                 temperature=None, top_p=None, top_k=None)
        assert out.shape[1] - ids.shape[1] == targets[i], (out.shape, targets[i])
        tokens += int(targets[i])
        done += 1
    bench.sync()
    record("reference: HF generate, batch 1", tokens, time.perf_counter() - t, batch=1,
           note=f"first {done} requests")

    # Ours: slot_generate, what HFBackend.generate runs on a GPU.
    for spec in map(str, bench.SLOTS):
        slots, *flags = spec.split(":")
        decode = next((f for f in flags if f in ("kernel", "flash", "sdpa")), "auto")
        fused, shrink = "hf" not in flags, "flat" not in flags
        kv = next((float(f[2:]) for f in flags if f.startswith("kv")), 0.6)
        name = ("ours: slot_generate, {} slots, CUDA graph"
                + ("" if decode == "auto" else f", {decode} decode attention")
                + ("" if fused else ", HF's layers in decode")
                + ("" if shrink else ", every step over all slots")
                + ("" if kv == 0.6 else f", the KV cache in {kv:.0%} of free memory")
                + (", float8 weights" if "fp8" in flags else "")
                + (", float8 KV cache" if "fp8kv" in flags else ""))
        options = EngineOptions(decode=decode, fused=fused, shrink=shrink)
        bench.reset_memory()
        t = time.perf_counter()
        stats = {}
        try:
            outs = slot_generate(model, [prompts[i] for i in order], [seeds[i] for i in order], max_new_tokens=r_hi,
                                 temperature=bench.TEMPERATURE, top_p=bench.TOP_P, eos_ids=eos, max_slots=int(slots),
                                 kv_memory=kv, fp8="fp8" in flags, kv_fp8="fp8kv" in flags, stats=stats,
                                 options=options,
                                 processor=lambda logits, r, steps: force(logits, sorted_targets[r], steps, eos))
        except Exception as e:  # a failure here must not hide the other rows
            traceback.print_exc()
            rows.append({"part": "gen", "config": name.format(slots), "error": str(e)[:300]})
            continue
        bench.sync()
        seconds = time.perf_counter() - t
        got = [len(o) + 1 for o in outs]  # + the eos
        bad = [(k, g_, int(sorted_targets[k]), plens[order[k]]) for k, g_ in enumerate(got) if g_ != sorted_targets[k]]
        if bad:
            print(f"  {len(bad)} rows off their forced length (row, got, wanted, prompt): {bad[:8]}")
        decode_ms = 1000 * stats["decode_s"] / max(1, stats["decode_steps"])
        record(name.format(stats["slots"]), sum(got), seconds, batch=stats["slots"],
               note=f"{n_req} requests; prefill {stats['prefill_s']:.1f} s in {stats['prefill_calls']} calls, "
                    f"{stats['decode_steps']} decode steps of {decode_ms:.1f} ms"
                    f" over {stats['decode_rows'] / max(1, stats['decode_steps']):.0f} rows, "
                    f"{stats['capture_s']:.1f} s of it capturing graphs"
                    + (f"; {len(bad)} rows off their forced length" if bad else ""))

    # Correctness on this card, in fp32 (bf16 ties flip greedy picks): a 2-layer model with
    # Mistral's head layout, slot_generate (graph and eager) vs HF generate, greedy.
    few = order[:8]
    small = MistralConfig(vocab_size=cfg.vocab_size, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=128, sliding_window=None)
    with torch.device(bench.device):
        tiny = AutoModelForCausalLM.from_config(small, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = [tiny.generate(torch.tensor([prompts[i]], device=bench.device), max_new_tokens=24, do_sample=False,
                             logits_processor=[ForceLength(torch.tensor([25]), eos)])[0, plens[i]:].tolist()
               for i in few]
    for graph in (True, False):
        mine = slot_generate(tiny, [prompts[i] for i in few], [0] * 8, max_new_tokens=24, temperature=0.0, top_p=1.0,
                             eos_ids=eos, max_slots=4, options=EngineOptions(cuda_graph=graph),
                             processor=lambda logits, r, steps: force(logits, torch.full_like(steps, 25), steps, eos))
        same = sum(a == b for x, y in zip(ref, mine) for a, b in zip(x, y))
        print(f"  fp32 check: slot_generate (graph {graph}) vs HF generate, greedy: {same} of "
              f"{sum(map(len, ref))} tokens equal")
        check[f"fp32_greedy_equal_graph_{graph}"] = [same, sum(map(len, ref))]
    # The decode paths against the whole-slot sdpa through HF's layers in bf16, teacher-forced so all see the
    # same tokens: the logits of every step of 8 rows, on the 2-layer model and at the real shape
    # (32 random layers amplify bf16 rounding: there a difference says less).
    forced = torch.randint(3, cfg.vocab_size, (8, 33), generator=g).to(bench.device)
    head = torch.randint(3, cfg.vocab_size, (64,), generator=g).tolist()  # an instruction all prompts start with

    def logits_of(net, before=(), fp8=False, kv_fp8=False, stats=None, **switches):
        """The logits of every step, teacher-forced; before: tokens put before each prompt; switches: EngineOptions'."""
        seen = []

        def keep(logits, r, steps):
            seen.append(logits[r.argsort()].clone())
            return torch.full_like(logits, float("-inf")).scatter_(1, forced[r, steps][:, None], 0.0)

        slot_generate(net, [[*before, *prompts[i]] for i in few], [0] * 8, max_new_tokens=32, temperature=0.0,
                      top_p=1.0, eos_ids=eos, max_slots=8, fp8=fp8, kv_fp8=kv_fp8, stats=stats, processor=keep,
                      options=EngineOptions(cuda_graph=False, **switches))
        return torch.stack(seen)

    def compare(name, what, a, base):
        rel = ((a - base).abs().max() / base.abs().max()).item()
        same = [int((a.argmax(-1) == base.argmax(-1)).sum()), a.shape[0] * a.shape[1]]
        check[name] = {"max_abs_diff_over_max_abs": rel, "argmax_equal": same}
        print(f"  bf16 check, {what}: logits max |diff| / max |logit| {rel:.2g}; argmax equal {same[0]} of {same[1]}")

    for label, net in (("2 layers", tiny.to(model.dtype)), ("real shape", model)):
        base = logits_of(net, decode="sdpa", fused=False)  # whole-slot sdpa through HF's layers: the plain maths
        flash = "flash" if bench.device == "cuda" else "sdpa"  # the CPU smoke test has no flash kernel
        for what, variant in (("flash", dict(decode=flash, fused=False)), ("flash + fused layers", dict(decode=flash)),
                              ("split-KV kernel + fused layers", dict(decode="auto")),
                              ("float8 KV cache + split-KV kernel + fused layers", dict(decode="auto", kv_fp8=True)),
                              ("float8 weights + split-KV kernel + fused layers", dict(decode="auto", fp8=True)),
                              ("float8 weights and KV cache + split-KV kernel + fused layers",
                               dict(decode="auto", fp8=True, kv_fp8=True))):
            compare(f"bf16_{what}_vs_sdpa_hf_{label}", f"{label}: {what} vs whole-slot sdpa through HF's layers",
                    logits_of(net, **variant), base)
        # A 64-token head before each prompt, prefilled once (flash with fewer queries than keys) vs with each prompt
        stats = {}
        name = f"bf16_shared_head_vs_whole_prompts_{label}"
        compare(name, f"{label}: a shared head prefilled once vs with each prompt",
                logits_of(net, head, stats=stats), logits_of(net, head, share_head=False))
        check[name]["shared"] = stats["shared"]  # the head's tokens that slot_generate found (64 here)
    if bench.device == "cuda":
        from pipeline import kernels

        check["kernels_vs_torch_bf16"] = kernels.self_check("cuda")
        print(f"  kernels vs their torch versions (share of elements that differ): {check['kernels_vs_torch_bf16']}")
    del tiny
    bench.save("gen.json", rows, bandwidth_gbs=round(bw), mean_context=round(ctx),
               weight_gb=round(weight_bytes / 1e9, 2), check=check)

    if bench.STATIC_REQUESTS:
        static_batch(bench, model, prompts, plens, targets, seeds, eos, r_hi, n_req, record, rows)
    if bench.CB_SECONDS:
        continuous_batching(bench, model, prompts, targets, order, r_hi, n_req, record, rows)


def static_batch(bench, model, prompts, plens, targets, seeds, eos, r_hi, n_req, record, rows):
    """HF generate on a static left-padded batch (the HFBackend path before this work)."""
    bench.reset_memory()
    idx = sorted(range(min(bench.STATIC_REQUESTS, n_req)), key=lambda i: -plens[i])
    width = max(plens[i] for i in idx)
    ids = torch.zeros(len(idx), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(idx):
        ids[r, width - plens[i]:] = torch.tensor(prompts[i])
        mask[r, width - plens[i]:] = 1
    t = time.perf_counter()
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids.to(bench.device), attention_mask=mask.to(bench.device), max_new_tokens=r_hi,
                           do_sample=False, pad_token_id=0, temperature=None, top_p=None, top_k=None,
                           logits_processor=[ForceLength(targets[idx], eos),
                                             RowSampler([seeds[i] for i in idx], temperature=bench.TEMPERATURE,
                                                        top_p=bench.TOP_P)])
        bench.sync()
        record(f"HF generate, static batch of {len(idx)}", int(targets[idx].sum()), time.perf_counter() - t,
               batch=len(idx), note=f"first {len(idx)} requests, one batch")
    except Exception as e:
        traceback.print_exc()
        rows.append({"part": "gen", "config": f"HF generate, static batch of {len(idx)}", "error": str(e)[:300]})



def continuous_batching(bench, model, prompts, targets, order, r_hi, n_req, record, rows):
    """transformers' continuous batching, per-request lengths, within a time box."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    bench.reset_memory()
    gc_cfg = GenerationConfig(do_sample=True, temperature=bench.TEMPERATURE, top_p=bench.TOP_P, max_new_tokens=r_hi,
                              eos_token_id=-1, pad_token_id=0)
    cb_cfg = ContinuousBatchingConfig(block_size=64, num_blocks=64 if bench.TINY else 2048, max_batch_tokens=2048,
                                      max_requests_per_batch=128,
                                      use_cuda_graph=bench.device == "cuda", allow_block_sharing=False)
    done = tokens = 0
    note = f"{n_req} requests; 2048 blocks of 64, 2048 batch tokens, 128 requests/batch, CUDA graphs"
    try:
        t = time.perf_counter()
        with model.continuous_batching_context_manager(generation_config=gc_cfg, continuous_batching_config=cb_cfg,
                                                       block=True, timeout=10) as manager:
            for i in order:
                manager.add_request(prompts[i], request_id=f"r{i}", max_new_tokens=int(targets[i]), eos_token_id=-1)
            while done < n_req and time.perf_counter() - t < bench.CB_SECONDS:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    done += 1
                    tokens += len(result.generated_tokens)
            seconds = time.perf_counter() - t
        if done < n_req:
            note += f"; time box: {done} of {n_req} finished"
        record("transformers generate_batch (continuous)", tokens, seconds, batch=128, note=note)
    except Exception as e:  # a failure here must not hide the other rows
        print(f"continuous batching failed: {type(e).__name__}: {e}")
        rows.append({"part": "gen", "config": "transformers generate_batch (continuous)", "error": str(e)[:300]})
        bench.save("gen.json", rows)


GEMM = ("gemm", "cutlass", "sm90_", "sm80_", "cublas", "gemv", "nvjet")
ATTENTION = ("flash", "fmha", "sdpa", "attention")  # before GEMM: their names hold "cutlass" and "sm90_" too
KERNELS = [("fused norm, rotary", ("_rms_kernel", "_rotary_kernel")), ("attention", ATTENTION + ("_decode_",)),
           ("gemm", GEMM),
           ("sampling", ("sort", "scan", "radix", "cumsum", "softmax", "_uniform_kernel")), ("other", ("",))]
TRAIN_KERNELS = [("attention", ATTENTION), ("gemm", GEMM), ("dequantize", ("dequant",)), ("optimizer", ("adam", "optim")),
                 ("other", ("",))]


def kernel_table(prof, steps, kinds_of=KERNELS):
    """CUDA time per kind of kernel (ms per step) and the top kernels, from a torch.profiler run."""
    kinds, top = {}, []
    for e in prof.key_averages():
        ms = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1000 / steps
        if ms <= 0:
            continue
        kind = next(k for k, keys in kinds_of if any(x in e.key.lower() for x in keys))
        kinds[kind] = kinds.get(kind, 0.0) + ms
        top.append((round(ms, 3), e.count // steps, e.key[:90]))
    return {k: round(v, 3) for k, v in kinds.items()}, sorted(top, reverse=True)[:12]


def run_profile(bench):
    """Where the slot engine's time goes at the real shape: decode step (graph replay) with and
    without sampling, per kind of kernel, at 256 and 384 slots of realistic context, along each of
    PROFILE_PATHS (HF's layers with the whole-slot sdpa or the flash attention, the fused layers with
    the flash or the split-KV kernel, with bf16 or float8 weights, with or without a float8 KV cache); a
    packed prefill call of 16k tokens, and a sweep of one step's matmuls over the row count, for each
    of the fused layers' weights named."""
    from torch.profiler import ProfilerActivity, profile

    model, weight_bytes, eos, (n_req, p_lo, p_hi, r_lo, r_hi) = mistral(bench)
    model.set_attn_implementation(engine.slot_attention())
    length = -(-(p_hi + r_hi) // 64) * 64
    g = torch.Generator().manual_seed(bench.SEED)
    out = {"length": length, "rows": []}
    paths = [p.split(":") for p in bench.PROFILE_PATHS]
    weights = {kind: engine.slot_weights(model, fp8=kind != "fused") for kind in ("fused", "fp8", "fp8kv")
               if kind in {layers for _, layers in paths}}

    def timed(fn, n=20):
        fn()
        bench.sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        bench.sync()
        return 1000 * (time.perf_counter() - t) / n

    with torch.inference_mode():
        for count in (256, 384):
            plen = torch.randint(p_lo, p_hi + 1, (count,), generator=g)
            reply = torch.randint(r_lo, r_hi + 1, (count,), generator=g)
            ctx = plen + (torch.rand(count, generator=g) * reply).long()  # a row somewhere in its reply
            for decode, layers in paths:
                if decode == "flash" and bench.device != "cuda":  # --tiny on a CPU: no flash kernel
                    continue
                bench.reset_memory()
                slots = engine.SlotCache(model, count, length, decode, kv_fp8=layers == "fp8kv")
                slots.fused = weights.get(layers)
                slots.pos.copy_(ctx)
                slots.token.copy_(torch.randint(3, model.config.vocab_size, (count,), generator=g))
                seeds = torch.arange(count, device=bench.device)
                logits = lambda: engine.decode_step(model, slots)  # noqa: E731
                full = lambda: engine.pick_tokens(logits(), seeds, slots.pos,  # noqa: E731
                                                  temperature=bench.TEMPERATURE, top_p=bench.TOP_P)
                graphed = ((lambda fn: engine.cuda_graphed(fn, model.device)) if bench.device == "cuda"
                           else (lambda fn: fn))
                graph_full, graph_logits = graphed(full), graphed(logits)
                row = {"slots": count, "attention": slots.decode, "layers": layers,
                       "mean_context": round(ctx.float().mean().item()),
                       "step_ms": round(timed(graph_full), 2), "logits_only_ms": round(timed(graph_logits), 2),
                       "eager_step_ms": round(timed(full, 5), 2)}
                with profile(activities=[ProfilerActivity.CUDA if bench.device == "cuda"
                                         else ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        full()
                    bench.sync()
                row["kernels_ms"], row["top_kernels"] = kernel_table(prof, 3)
                out["rows"].append(row)
                print(f"  {count} slots, {row['attention']}, {layers} layers: step {row['step_ms']} ms (logits only "
                      f"{row['logits_only_ms']}, eager {row['eager_step_ms']}); eager kernels/step {row['kernels_ms']}")
                for k in row["top_kernels"][:6]:
                    print(f"      {k}")
                del slots, graph_full, graph_logits
        # A packed prefill call of ~16k tokens into 48 slots, through the fused layers as slot_generate runs it.
        prompts = [torch.randint(3, model.config.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(p_lo, p_hi + 1, (48,), generator=g)]
        while sum(map(len, prompts)) > 16384:
            prompts.pop()
        tokens = sum(map(len, prompts))
        for kind, fused in weights.items():
            slots = engine.SlotCache(model, 48, length, kv_fp8=kind == "fp8kv")
            slots.fused = fused
            prefill = lambda: engine.prefill(model, slots, list(range(len(prompts))), prompts)  # noqa: E731
            ms = timed(prefill, 5)
            flop = 2 * weight_bytes / 2 * tokens
            key = "prefill" if kind == "fused" else f"prefill_{kind}"
            out[key] = {"prompts": len(prompts), "tokens": tokens, "ms": round(ms, 1),
                        "tflops": round(flop / ms / 1e9, 1)}
            with profile(activities=[ProfilerActivity.CUDA if bench.device == "cuda"
                                     else ProfilerActivity.CPU]) as prof:
                prefill()
                bench.sync()
            out[key]["kernels_ms"], out[key]["top_kernels"] = kernel_table(prof, 1)
            print(f"  prefill, {kind} layers: {len(prompts)} prompts, {tokens} tokens packed in {ms:.0f} ms "
                  f"({out[key]['tflops']} TFLOP/s of weight matmuls); kernels {out[key]['kernels_ms']}")
            for k in out[key]["top_kernels"][:8]:
                print(f"      {k}")
            if kind != "fp8kv":  # fp8's matmuls
                out["gemm" if kind == "fused" else f"gemm_{kind}"] = gemm_sweep(bench, model, fused, timed)
    (bench.out_dir / "profile.json").write_text(json.dumps({"card": bench.card(), "versions": bench.versions(), **out},
                                                           indent=1))


def gemm_sweep(bench, model, fused, timed):
    """The weight matmuls of one step (each layer's q|k|v, o, gate|up and down, then lm_head) at M rows:
    ms, TFLOP/s and the rate the weights are read at. Where a decode step stops being bandwidth-bound, and
    what prefill tokens riding along would cost."""
    weights = [w for layer in fused for w, _ in layer] + [model.lm_head.weight]
    params = sum(w.shape[0] * w.shape[1] for w in weights)
    nbytes = sum(w.data.numel() * w.data.element_size() for w in weights)  # an Fp8's data: its float8 bytes
    rows = []
    for m in (64, 128, 192, 256, 320, 384, 448, 512, 768, 1024, 2048, 4096, 16384):
        xs = {w.shape[1]: torch.randn(m, w.shape[1], device=bench.device, dtype=model.dtype) for w in weights}
        ms = timed(lambda: [engine.matmul(xs[w.shape[1]], w) for w in weights], 5)
        rows.append({"rows": m, "ms": round(ms, 3), "tflops": round(2 * m * params / ms / 1e9, 1),
                     "gb_s": round(nbytes / ms / 1e6)})
        print(f"  weight matmuls of one step at {m} rows: {ms:.2f} ms, {rows[-1]['tflops']} TFLOP/s, "
              f"weights read at {rows[-1]['gb_s']} GB/s")
    return rows


def slot_bytes_per_token(model):
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
