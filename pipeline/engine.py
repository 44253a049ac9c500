"""Generation on the GPU: token ids and tensors in, token ids and tensors out.

- sampling: per-row seeded temperature + top-p draws (pick_tokens, RowSampler), so a row's
  text does not depend on which rows share its batch; force_lengths ends replies at set lengths;
- the slot engine (slot_generate): a KV cache of slots (SlotCache) refilled as rows end, prompts
  prefilled packed (prefill), decode steps (decode_step) replayed as CUDA graphs (cuda_graphed) whose
  attention reads each slot's real length and that shrink to fewer slots as the last rows end;
  prefill and decode through fused layers (slot_weights, matmul, optionally float8: Fp8) and
  kernels.py's Triton kernels for Llama-layout models. EngineOptions holds the switches that only
  comparisons change.
Nothing here imports the pipeline's own modules; the training fast paths live in training.py.
tests/test_engine.py checks each path against HF generate, and bench/bench.py measures them.
"""

import copy
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from pipeline.kernels import (add_rms_norm, decode_attention, decode_attention_fits, decode_attention_torch,
                              float8_rows, float8_rows_torch, from_float8, rotary_to_cache, silu_mul, uniform_noise)

# transformers is imported where it is used: importing it imports huggingface_hub, which reads
# HF_HUB_OFFLINE once, and stage 07 sets that only after its network probe.

# -----------------------------------------------------------------------------
# Sampling: each row draws from its own seeded stream


class RowSampler:
    """Temperature + top-p sampling where each row draws from its own seeded stream.

    Noise is a hash of (row seed, step, token), so a row's text does not depend on
    which other rows share its batch: resumed and uninterrupted runs agree.
    Used as a logits processor with greedy search: it leaves one token allowed.
    """

    def __init__(self, seeds, *, temperature, top_p):
        self.seeds, self.temperature, self.top_p, self.start = seeds, temperature, top_p, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        steps = [input_ids.shape[1] - self.start] * len(self.seeds)
        choice = pick_tokens(scores, self.seeds, steps, temperature=max(self.temperature, 1e-5), top_p=self.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


def pick_tokens(scores, seeds, steps, *, temperature, top_p):
    """One token per row of scores: RowSampler's draw for each row's seed at its own step.

    steps counts the tokens the row has generated so far; temperature 0 takes the argmax.
    """
    if temperature <= 0:
        return scores.argmax(-1)
    logits = scores.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the top token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=logits.device)
    steps = torch.as_tensor(steps, dtype=torch.int64, device=logits.device)
    uniform = uniform_noise(seeds, steps, logits.shape[-1])
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)  # Gumbel-max = one sample


def force_lengths(scores, targets, steps, eos):
    """Each row's reply ends at its target length: no eos before, only eos at it (random weights
    rarely end a reply; the benchmark and the rehearsal draw realistic lengths). Tensor ops only,
    no host sync, so slot_generate can capture it in its CUDA graph."""
    is_eos = torch.arange(scores.shape[-1], device=scores.device) == eos
    end = (steps >= targets - 1)[:, None]
    return torch.where(end, torch.where(is_eos, 0.0, float("-inf")), scores.masked_fill(is_eos, float("-inf")))


# -----------------------------------------------------------------------------
# Fast generation on a GPU: a KV cache of slots, refilled as rows end

# Decoders that _forward_slots can run layer by layer (embed, rotary, layers, norm, lm_head).
SLOT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SLOT_ATTENTION = "slots"  # the attn_implementation slot_attention registers


def _flash(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, scale, used=None):
    """torch's flash varlen kernel on [tokens, heads, dim]; used[i]: keys of sequence i it reads."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                   scale=scale, seqused_k=used)[0]


def slot_attention():
    """Register the slot cache's attention (prefill and decode through HF's layers) and return its name,
    an attn_implementation; slot_generate sets it on the model while it runs."""
    from transformers import AttentionInterface

    AttentionInterface.register(SLOT_ATTENTION, _slot_attention_forward)
    return SLOT_ATTENTION


def _slot_attention_forward(module, query, key, value, attention_mask, scaling=None, slot_cache=None, **kwargs):
    """Attention that writes to and reads from the slot cache (prefill or one decode step) where
    _fused_layers does not run (slots.fused is None: other decoders, or EngineOptions(fused=False)).

    Prefill: the prompts come packed in one row (_prefill_attention). Decode: one token per slot at
    its own position (_decode_attention).
    Returns [rows, q_len, heads, dim].
    """
    c = slot_cache
    cache_k, cache_v = c.k[module.layer_idx], c.v[module.layer_idx]  # [slots, length, kv_heads, dim]
    rows, heads, q_len, dim = query.shape
    groups = key.shape[1]
    rep = heads // groups
    if c.prefill is not None:
        dest, plan = c.prefill
        for cache, t in ((cache_k, key), (cache_v, value)):
            cache.view(-1, groups, dim).index_copy_(0, dest, t[0].transpose(0, 1))
        q = query[0].transpose(0, 1).contiguous()  # [tokens, heads, dim]
        return _prefill_attention(q, c, module.layer_idx, scaling, plan).view(1, q_len, heads, dim), None
    cache_k[c.ids, c.pos] = key[:, :, 0]
    cache_v[c.ids, c.pos] = value[:, :, 0]
    q = query.reshape(rows, groups, rep, dim).transpose(1, 2)
    return _decode_attention(q, c, module.layer_idx, scaling).view(rows, 1, heads, dim), None


def _decode_attention(q, c, layer, scale):
    """One decode step's attention of layer `layer`: q [rows, rep, kv_heads, dim] (query head
    g * rep + r at [r, g]) against each slot's first c.used positions; returns [rows, heads * dim].

    The query heads of a kv head are query rows of one sequence, so K and V are read once (no
    repeat_kv). c.decode picks the kernel: kernels.decode_attention (split-KV in Triton), torch's
    flash varlen with seqused_k, or sdpa over the whole slot under a mask (CPUs, fp32, pre-Ampere).
    """
    rows, rep, groups, dim = q.shape
    cache_k, cache_v = c.k[layer], c.v[layer]
    if c.decode == "kernel":
        return decode_attention(q, cache_k, cache_v, c.used, scale, c.scales(layer))
    if c.decode == "flash":
        out = _flash(q.reshape(rows * rep, groups, dim), cache_k.view(-1, groups, dim), cache_v.view(-1, groups, dim),
                     c.cu_q, c.cu_k, rep, cache_k.shape[1], causal=False, scale=scale, used=c.used)
        return out.view(rows, rep, groups, dim).transpose(1, 2).reshape(rows, -1)
    return decode_attention_torch(q, cache_k, cache_v, c.used, scale, c.scales(layer))


def slot_bytes(model, length, kv_fp8=False):
    """KV cache bytes of one slot of `length` positions (float8: a byte an element, 4 a head's scale)."""
    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    head = dim + 4 if kv_fp8 else dim * model.dtype.itemsize
    return 2 * cfg.num_hidden_layers * length * cfg.num_key_value_heads * head


class SlotCache:
    """The KV cache of slot_generate: per layer K and V of [slots, length, kv_heads, dim], and the decode
    inputs (token, pos: static for CUDA graphs).

    decode: the decode attention (_decode_attention): "kernel", "flash", "sdpa", or "auto", the
    first that runs here. kv_fp8: K and V as float8 heads (kernels.rotary_to_cache's), each with a
    scale in ks and vs [slots, kv_heads, length]; only the fused layers and the kernel or sdpa
    decode attention read them."""

    def __init__(self, model, count, length, decode="auto", kv_fp8=False):
        cfg, dev = model.config, model.device
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape, layers = (count, length, cfg.num_key_value_heads, dim), range(cfg.num_hidden_layers)
        kv = torch.float8_e4m3fn if kv_fp8 else model.dtype
        self.k = [torch.zeros(shape, device=dev, dtype=kv) for _ in layers]
        self.v = [torch.zeros(shape, device=dev, dtype=kv) for _ in layers]
        scale = (count, cfg.num_key_value_heads, length)
        self.ks = [torch.zeros(scale, device=dev) for _ in layers] if kv_fp8 else []
        self.vs = [torch.zeros(scale, device=dev) for _ in layers] if kv_fp8 else []
        self.ids = torch.arange(count, device=dev)
        self.token = torch.zeros(count, dtype=torch.long, device=dev)
        self.pos = torch.zeros(count, dtype=torch.long, device=dev)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        self.cu_q = torch.arange(count + 1, dtype=torch.int32, device=dev) * rep
        self.cu_k = torch.arange(count + 1, dtype=torch.int32, device=dev) * length
        # torch's flash kernel: 16-bit on Ampere or newer; elsewhere sdpa (CPUs, fp32, a T4 or V100)
        self.flash = (dev.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
                      and torch.cuda.get_device_capability(dev)[0] >= 8)
        if decode == "auto":
            decode = "kernel" if self.flash and decode_attention_fits(dev, model.dtype, dim) else (
                "flash" if self.flash and not kv_fp8 else "sdpa")
        if kv_fp8 and decode == "flash":
            raise ValueError("a float8 KV cache is read by decode='kernel' or 'sdpa', not torch's flash kernel")
        self.decode, self.used, self.prefill = decode, None, None
        self.fused = None  # slot_weights' weights, when _fused_layers runs prefill and decode steps

    def first(self, rows):
        """The same cache and inputs cut to the first `rows` slots: a decode step over fewer rows."""
        part = copy.copy(self)
        part.k, part.v = [t[:rows] for t in self.k], [t[:rows] for t in self.v]
        part.ks, part.vs = [t[:rows] for t in self.ks], [t[:rows] for t in self.vs]
        part.ids, part.token, part.pos = self.ids[:rows], self.token[:rows], self.pos[:rows]
        part.cu_q, part.cu_k = self.cu_q[:rows + 1], self.cu_k[:rows + 1]
        return part

    def scales(self, layer):
        """Layer `layer`'s (key scales, value scales) of a float8 cache, else None."""
        return (self.ks[layer], self.vs[layer]) if self.ks else None

    def caches(self):
        """Every cache tensor, [slot, position, ...] first: K and V (float8 seen as bytes: torch's indexing
        of float8 differs by version and device), then the scales moved to [slot, position, kv_heads]."""
        return ([t.view(torch.uint8) if t.element_size() == 1 else t for t in self.k + self.v]
                + [t.transpose(1, 2) for t in self.ks + self.vs])


def _forward_slots(model, ids, positions, slots):
    inner = model.model
    h = inner.embed_tokens(ids)
    rope = inner.rotary_emb(h, positions)
    for layer in inner.layers:
        h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope, slot_cache=slots)
        h = h[0] if isinstance(h, tuple) else h
    return inner.norm(h)


def decode_step(model, slots):
    """One decode step over every slot of `slots` (a SlotCache): the logits of each slot's next token
    after slots.token at slots.pos, [slots, vocab] in fp32, its K and V written to the cache."""
    slots.used = (slots.pos + 1).int()
    if slots.fused is not None:
        return _decode_forward(model, slots)
    h = _forward_slots(model, slots.token[:, None], slots.pos[:, None], slots)
    return model.lm_head(h[:, 0]).float()


def _fusable(model):
    """Decoders whose layers _decode_forward computes: Llama's layout (no q/k norms, a SiLU-gated MLP)
    with plain nn.Linear projections (a quantized model keeps HF's layers)."""
    cfg, layer = model.config, model.model.layers[0]
    return (cfg.model_type in ("llama", "mistral", "qwen2") and getattr(cfg, "hidden_act", None) == "silu"
            and not hasattr(layer.self_attn, "q_norm") and hasattr(layer.mlp, "gate_proj")
            and all(type(m) is torch.nn.Linear for m in (layer.self_attn.q_proj, layer.self_attn.o_proj,
                                                           layer.mlp.gate_proj, layer.mlp.down_proj, model.lm_head)))


def _fuse_projections(model):
    """Each layer's q|k|v and gate|up weights as one matrix each, [(qkv, qkv bias), (gate_up, its bias)]
    a layer: two fewer matmuls a step, and larger ones. The layers' own weights become views
    of these (nothing is stored twice, the model computes as before); done once per model."""
    layers = model.model.layers
    fused = getattr(model, "_slot_fused", None)
    if fused and fused[0][0][0].data_ptr() == layers[0].self_attn.q_proj.weight.data_ptr():
        return fused

    def join(linears):
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m in linears:
            end = start + m.weight.shape[0]
            m.weight.data = weight[start:end]
            if bias is not None:
                m.bias.data = bias[start:end]
            start = end
        return weight, bias

    with torch.no_grad():
        model._slot_fused = [(join([a.q_proj, a.k_proj, a.v_proj]), join([m.gate_proj, m.up_proj]))
                             for a, m in ((layer.self_attn, layer.mlp) for layer in layers)]
    return model._slot_fused


def fp8_runs(model):
    """Whether slot_generate(fp8=True) runs on `model` here: a decoder of _fusable's layout on a GPU with
    float8 matmuls (compute capability 8.9 or newer: L4, L40, H100, H200, B200; run on an H100 only)."""
    return (_fusable(model) and model.device.type == "cuda"
            and torch.cuda.get_device_capability(model.device) >= (8, 9))


def slot_weights(model, fp8=False):
    """Each layer's [q|k|v, o, gate|up, down] as (weight, bias) pairs (_fuse_projections' joined ones), the
    weights as Fp8 copies when fp8: made once per model and kept beside its own (half their bytes)."""
    fused = _fuse_projections(model)
    layers = [[qkv, (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias), gate_up,
               (layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)]
              for (qkv, gate_up), layer in zip(fused, model.model.layers)]
    if not fp8:
        return layers
    if getattr(model, "_slot_fp8", (None,))[0] is not fused:
        with torch.no_grad():
            model._slot_fp8 = (fused, [[(Fp8(w), b) for w, b in layer] for layer in layers])
    return model._slot_fp8[1]


class Fp8:
    """A weight [out, in] in float8 e4m3, one fp32 scale per output row (its largest magnitude / 448),
    for matmul: half the bytes of bf16, and twice the peak rate of an H100's tensor cores."""

    def __init__(self, weight):
        self.data, scale = float8_rows_torch(weight)
        self.scale = scale.t().contiguous()
        self.shape, self.dtype, self.device, self.is_cuda = weight.shape, weight.dtype, weight.device, weight.is_cuda


def matmul(x, weight, bias=None):
    """F.linear(x, weight, bias); for an Fp8 weight, x scaled and rounded to float8 row by row (each row's
    largest magnitude to 448; or x comes so, as kernels.float8_rows' (rows, scales)) and the product
    rescaled, in the weight's own dtype."""
    if not isinstance(weight, Fp8):
        return F.linear(x, weight, bias)
    rows, scale = x if isinstance(x, tuple) else float8_rows(x)
    out = torch._scaled_mm(rows, weight.data.t(), scale_a=scale, scale_b=weight.scale, out_dtype=weight.dtype)
    return out if bias is None else out + bias


def _fused_layers(model, slots, h, cos, sin, slot, pos, attend):
    """Each HF layer's maths through the fused weights and kernels.py's kernels, for tokens h [tokens,
    hidden] at (slot, pos) of the cache; attend(q, layer index, scale) is the attention (decode or
    prefill), q [tokens, rep, groups, dim] as rotary_to_cache returns it. Returns the final norm's output."""
    inner, cfg = model.model, model.config
    f8 = isinstance(slots.fused[0][0][0], Fp8)  # the norms and the SiLU product then write float8 rows
    residual = None
    for i, layer in enumerate(inner.layers):
        qkv, o, gate_up, down = slots.fused[i]
        x, residual = add_rms_norm(h, residual, layer.input_layernorm, f8)
        q = rotary_to_cache(matmul(x, *qkv), cos, sin, slots.k[i], slots.v[i], slot, pos,
                            cfg.num_attention_heads, cfg.num_key_value_heads, slots.scales(i))
        h = matmul(attend(q, i, layer.self_attn.scaling), *o)
        x, residual = add_rms_norm(h, residual, layer.post_attention_layernorm, f8)
        h = matmul(silu_mul(matmul(x, *gate_up), f8), *down)
    return add_rms_norm(h, residual, inner.norm)[0]


def _decode_forward(model, slots):
    """One decode step through the fused weights and kernels (kernels.py): what each HF layer
    computes, in 4 matmuls, the attention and 5 small kernels a layer instead of 7 and ~30.
    Returns the logits of each slot's next token, [slots, vocab] in fp32."""
    inner, c = model.model, slots
    h = inner.embed_tokens(c.token)
    cos, sin = inner.rotary_emb(h[:, None], c.pos[:, None])
    h = _fused_layers(model, c, h, cos[:, 0], sin[:, 0], c.ids, c.pos,
                      lambda q, i, scale: _decode_attention(q, c, i, scale))
    return matmul(h, model.lm_head.weight, model.lm_head.bias).float()


def _prefill_attention(q, c, layer, scale, plan):
    """The packed prompts' attention in layer `layer`: q [tokens, heads, dim], each prompt's queries
    against the keys and values at its slot's cache positions up to its own (those of a shared head
    included, written before). plan: (keys: their flat cache positions, prompt after prompt; the
    query and key bounds cu_q, cu_k; the longest of each). Float8 keys and values are scaled back to
    q's dtype. Returns [tokens, heads * dim]."""
    keys, cu_q, cu_k, max_q, max_k = plan
    tokens, heads, dim = q.shape
    length, groups = c.k[layer].shape[1:3]
    k, v = (cache.view(-1, groups, dim)[keys] for cache in (c.k[layer], c.v[layer]))
    if c.ks:
        slot, pos = keys // length, keys % length
        k, v = (from_float8(t, s[slot, :, pos], q.dtype) for t, s in ((k, c.ks[layer]), (v, c.vs[layer])))
    if c.flash:  # causal in torch's flash kernel aligns each prompt's last query with its last key
        return _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, scale=scale).view(tokens, -1)
    # Elsewhere (CPUs, fp32, pre-Ampere GPUs) sdpa one prompt at a time on [1, heads, len, dim]: given
    # 3-d inputs torch's CPU sdpa rounds bf16 differently.
    k, v = k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    parts = []
    for a, b, start, end in zip(qs, qs[1:], ks, ks[1:]):
        seen = end - start - (b - a)  # keys before the first query: the shared head
        mask = torch.ones(b - a, end - start, dtype=torch.bool, device=q.device).tril(seen) if seen else None
        parts.append(F.scaled_dot_product_attention(q[None, a:b].transpose(1, 2), k[None, start:end].transpose(1, 2),
                                                    v[None, start:end].transpose(1, 2), attn_mask=mask,
                                                    is_causal=not seen, scale=scale)[0])
    return torch.cat(parts, 1).transpose(0, 1).reshape(tokens, -1)


def _cache_positions(rows, lens, length, first=0):
    """Flat cache positions (slot * length + position) of positions first .. first + n - 1 of each
    slot in rows (n from lens), slot after slot; and their bounds, cu [len(rows) + 1]."""
    lens = torch.as_tensor(lens)
    cu = F.pad(lens.cumsum(0), (1, 0))
    positions = first + torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1], lens)
    return torch.repeat_interleave(torch.as_tensor(rows), lens) * length + positions, cu


def prefill(model, slots, rows, prompts, start=0):
    """Write the prompts' K/V into slots `rows` (one packed row, no padding) from position `start` on;
    the logits of each prompt's last token. The positions before `start` hold a shared head (written
    before, attended to as each prompt's beginning).

    Through _fused_layers when the decode steps run _decode_forward (HF's layers spend much of prefill
    in small kernels too), through HF's layers otherwise."""
    dev, length = model.device, slots.k[0].shape[1]
    lens = [len(p) for p in prompts]
    dest, cu = _cache_positions(rows, lens, length, start)
    keys, cu_k = _cache_positions(rows, [n + start for n in lens], length) if start else (dest, cu)
    cu_q, cu_k = cu.to(dev, torch.int32), cu_k.to(dev, torch.int32)
    plan = (keys.to(dev), cu_q, cu_k, max(lens), max(lens) + start)
    dest, ids = dest.to(dev), torch.tensor([t for p in prompts for t in p], device=dev)
    slot, positions = dest // length, dest % length
    if slots.fused is not None:
        def attend(q, layer, scale):  # q [tokens, rep, groups, dim] (rotary_to_cache): query head g * rep + r at [r, g]
            return _prefill_attention(q.transpose(1, 2).reshape(len(q), -1, q.shape[-1]), slots, layer, scale, plan)

        inner = model.model
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h[None], positions[None])
        h = _fused_layers(model, slots, h, cos[0], sin[0], slot, positions, attend)
    else:
        slots.prefill = (dest, plan)
        try:
            h = _forward_slots(model, ids[None], positions[None], slots)[0]
        finally:
            slots.prefill = None
    return model.lm_head(h[cu_q[1:] - 1]).float()


def _shared_head(prompts, least=16):
    """How many first tokens all prompts share (a system prompt, an instruction before each record),
    at most all but the shortest prompt's last; 0 when fewer than `least`, or for a single prompt."""
    first, n = prompts[0], min(map(len, prompts)) - 1
    for p in prompts[1:]:
        if n < least:
            break
        if p[:n] != first[:n]:  # lists compare fast; else find where they part
            n = next((j for j in range(n) if p[j] != first[j]), n)
    return n if n >= least and len(prompts) > 1 else 0


def cuda_graphed(fn, device, pool=None):
    """fn captured once as a CUDA graph: each replay costs one launch instead of hundreds. Graphs
    that never run at once can share a memory pool (torch.cuda.graph_pool_handle())."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """slot_generate's switches that only comparisons change (the bench, the tests); the defaults are what
    the pipeline runs. cuda_graph=False decodes eagerly; decode picks the decode attention ("kernel",
    "flash" or "sdpa": _decode_attention; "auto" the first that runs here); fused=False runs HF's own
    layers instead of the fused ones (_fused_layers); shrink=False runs every decode step over all the
    slots; share_head=False prefills each prompt whole, its shared head included."""

    cuda_graph: bool = True
    decode: str = "auto"
    fused: bool = True
    shrink: bool = True
    share_head: bool = True


def slot_generate(model, prompts, seeds, *, max_new_tokens, temperature, top_p, eos_ids, max_slots=512,
                  prefill_tokens=16384, kv_memory=0.6, fp8=False, kv_fp8=False, processor=None, stats=None,
                  on_row=None, options=EngineOptions()):
    """Reply token ids for each prompt (token id lists), up to max_slots rows decoding at once.

    A row that ends frees its slot and the next prompts are prefilled into free slots, so
    short replies stop costing work. Rows sample with pick_tokens (own seed, own step): the
    same draws as HFBackend's generate path. processor(logits, prompt_indices, steps) may
    edit the logits first, with tensor ops only (the benchmark forces reply lengths with it).
    Prompts are prefilled packed, up to prefill_tokens a call; the first tokens all prompts share
    (16 or more: an instruction before each record) once, their K/V then copied into each slot. On a
    GPU the slots take at most kv_memory of its free memory (the rest: prefill's activations, the
    sampler, the CUDA graphs). fp8=True runs the layers' matmuls on float8 copies of their weights (Fp8,
    made once, kept beside the model's own) and float8-rounded inputs: on an H100 the matmuls 1.5-1.75x
    faster, the bench's mix 1.13x, other logits (lm_head stays bf16). kv_fp8=True keeps the KV cache as
    float8 heads, each with its own scale (half the bytes: nearly twice the slots, half the decode
    attention's reads; other logits again); it needs the fused layers and, on a GPU, compute capability
    8.9 or newer. stats (a dict) gets
    prefill and decode seconds (decode_s includes capture_s: the CUDA graphs' capture) and counts
    (shared: the head's tokens; prefill_tokens: the tokens prefilled; decode_rows: the rows the
    decode steps ran, free ones included). on_row(i, ids) hears of each reply as it ends (prompt
    index, its token ids), while the others decode on. options: EngineOptions, the switches only
    comparisons change.
    """
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    length = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    count = min(len(prompts), max_slots)
    dev = model.device
    cuda_graph = options.cuda_graph  # turned off if a capture fails
    weights = slot_weights(model, fp8) if options.fused and _fusable(model) else None  # before free memory is read
    if kv_fp8 and (weights is None or dev.type == "cuda" and torch.cuda.get_device_capability(dev) < (8, 9)):
        raise ValueError("a float8 KV cache runs in the fused layers only (EngineOptions.fused, a Llama-layout "
                         "decoder), on a CPU or a GPU of compute capability 8.9 or newer (Triton's float8)")
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        count = max(1, min(count, int(kv_memory * free) // slot_bytes(model, length, kv_fp8)))
    outs = [[] for _ in prompts]
    owner, last, pos, steps = [-1] * count, [0] * count, [0] * count, [0] * count  # per slot
    drawn = 0  # prompts prefilled so far, in order
    stats = {} if stats is None else stats
    shared = _shared_head(prompts) if options.share_head else 0
    stats.update(slots=count, length=length, shared=shared, prefill_s=0.0, prefill_calls=0, prefill_tokens=0,
                 decode_s=0.0, decode_steps=0, decode_rows=0, capture_s=0.0)

    def pick(logits, rows, row_steps, row_seeds):
        if processor is not None:
            logits = processor(logits, rows, row_steps)
        return pick_tokens(logits, row_seeds, row_steps, temperature=temperature, top_p=top_p)

    def take(s, token):
        i = owner[s]
        if token not in eos:
            outs[i].append(token)
            steps[s] += 1
            last[s] = token
        if token in eos or len(outs[i]) >= max_new_tokens:
            owner[s] = -1
            if on_row is not None:
                on_row(i, outs[i])

    old = model.config._attn_implementation
    model.set_attn_implementation(slot_attention())
    try:
        with torch.inference_mode():
            slots = SlotCache(model, count, length, options.decode, kv_fp8)
            slots.fused = weights
            inputs = torch.zeros(3, count, dtype=torch.long, device=dev)  # token, position, step: one copy a step
            slots.token, slots.pos, step_of = inputs
            seed_of = torch.zeros(count, dtype=torch.long, device=dev)
            row_of = torch.zeros(count, dtype=torch.long, device=dev)
            # A decode step runs over the first `size` slots, the fewest of `sizes` that hold the rows still
            # decoding (compact moves them there), so the last rows of a call do not pay for all the slots.
            # Halving, five sizes at most: each is a graph to capture (~0.1 s at 7B), and below a few dozen
            # rows a 7B step costs about what reading its weights does, however few rows it runs.
            sizes = sorted({count >> k for k in range(5 if options.shrink else 1)} - {0})
            step_of_size, pool = {}, None

            def step(size):
                nonlocal cuda_graph, pool
                if size not in step_of_size:
                    part = slots.first(size)
                    # Sampling is part of the step, so a CUDA graph replays decode and sampling as one launch.
                    eager = lambda: pick(decode_step(model, part), row_of[:size], step_of[:size],  # noqa: E731
                                         seed_of[:size])
                    step_of_size[size] = eager
                    if cuda_graph and dev.type == "cuda":
                        pool, t = pool or torch.cuda.graph_pool_handle(), time.perf_counter()
                        try:
                            step_of_size[size] = cuda_graphed(eager, dev, pool)
                        except RuntimeError as e:  # still correct without the graph, only slower
                            print(f"slot_generate: no CUDA graph ({str(e)[:200]}); decoding eagerly", file=sys.stderr)
                            cuda_graph = False
                        stats["capture_s"] += time.perf_counter() - t
                return step_of_size[size]()

            def compact(size):
                """Move the rows decoding in slots from `size` on into free slots below it, with their cache."""
                movers = [s for s in range(size, count) if owner[s] >= 0]
                holes = [s for s in range(size) if owner[s] < 0][:len(movers)]
                src, dst = torch.tensor(movers, device=dev), torch.tensor(holes, device=dev)
                written = max(pos[s] for s in movers)  # positions in the cache; the last token is not yet
                for cache in slots.caches():
                    cache[dst, :written] = cache[src, :written]
                row_of[dst], seed_of[dst] = row_of[src], seed_of[src]
                for a, b in zip(holes, movers):
                    owner[a], last[a], pos[a], steps[a], owner[b] = owner[b], last[b], pos[b], steps[b], -1

            head = []  # the shared head's K and V (prefilled once, into slot 0, free until the first refill)
            if shared:
                t = time.perf_counter()
                prefill(model, slots, [0], [prompts[0][:shared]])
                head = [cache[0, :shared].clone() for cache in slots.caches()]
                stats["prefill_tokens"] += shared
                stats["prefill_s"] += time.perf_counter() - t

            def refill(free):
                """Prefill the next prompts into the free slots, packed up to prefill_tokens a call (the shared
                head counted in each prompt: its keys are read again for each); each row's first token comes
                with it."""
                nonlocal drawn
                t = time.perf_counter()
                while free:
                    chunk, rows, packed = [], [], 0  # packed: whole prompts, the keys the call's attention reads
                    while free and (not rows or packed + len(prompts[drawn]) <= prefill_tokens):
                        chunk.append(free.pop(0))
                        rows.append(drawn)
                        packed += len(prompts[drawn])
                        drawn += 1
                    here = torch.tensor(chunk, device=dev)
                    for cache, part in zip(slots.caches(), head):
                        cache[here, :shared] = part
                    logits = prefill(model, slots, chunk, [prompts[i][shared:] for i in rows], start=shared)
                    row_of[here] = torch.tensor(rows, device=dev)
                    seed_of[here] = torch.tensor([seeds[i] for i in rows], dtype=torch.long, device=dev)
                    tokens = pick(logits, row_of[here], torch.zeros_like(here), seed_of[here]).tolist()
                    for s, i, token in zip(chunk, rows, tokens):
                        owner[s], pos[s], steps[s] = i, len(prompts[i]), 0
                        take(s, token)
                    stats["prefill_calls"] += 1
                    stats["prefill_tokens"] += packed - shared * len(rows)
                stats["prefill_s"] += time.perf_counter() - t

            while True:
                free = [s for s in range(count) if owner[s] < 0]
                waiting = len(prompts) - drawn
                if waiting and len(free) >= min(waiting, max(1, count // 8)):  # an eighth of the slots at once
                    refill(free[:waiting])
                    continue
                active = [s for s in range(count) if owner[s] >= 0]
                if not active:
                    break
                t = time.perf_counter()
                size = next(b for b in sizes if b >= len(active))
                if active[-1] >= size:
                    compact(size)
                    active = [s for s in range(size) if owner[s] >= 0]
                inputs.copy_(torch.tensor([last, [pos[s] if owner[s] >= 0 else 0 for s in range(count)], steps]))
                tokens = step(size).tolist()
                stats["decode_steps"] += 1
                stats["decode_rows"] += size
                for s in active:
                    pos[s] += 1
                    take(s, tokens[s])
                stats["decode_s"] += time.perf_counter() - t
    finally:
        model.set_attn_implementation(old)
    return outs
