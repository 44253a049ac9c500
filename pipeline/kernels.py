"""The slot engine's fused GPU kernels (Triton), each beside the plain torch function it stands for.

A decode step of a 7B model at 256 rows spends as long in ~1,000 small kernels (the RMSNorm's
eight elementwise passes, the rotary's slices and cats, the KV writes) and in hashing the
sampler's noise over the whole vocabulary as in reading the weights (bench/LOG.md). Here:
- uniform_noise: the sampler's per-(seed, step, token) uniforms in one pass, bit for bit the
  torch version's;
- add_rms_norm: the residual add and HF's RMSNorm in one kernel, with the same roundings;
- rotary_to_cache: rotary on the query and key heads of a fused q|k|v row, the query written
  in the layout the decode attention reads, key and value written into the slot cache;
- decode_attention: split-KV flash decoding over each slot's real length, the query heads of a
  kv head together, so each key and value is read once;
- float8_rows: a matmul input's rows scaled and rounded to float8 (engine.Fp8's matmuls), in one
  kernel instead of seven; add_rms_norm and silu_mul (the SiLU-gated product, one kernel instead
  of two) write their output so too, on request.
Each takes the Triton kernel on an Ampere-or-newer GPU when Triton is installed (it comes with
torch's CUDA builds) and the torch version elsewhere (CPUs, tests). tests/test_kernels.py runs the
kernels in Triton's interpreter against the torch versions; bench/bench.py checks them on the GPU.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch come without Triton: the torch versions below run
    triton = None

_M1, _M2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64  # splitmix64, as signed int64


def _mix64(x):
    """splitmix64 finaliser on int64 tensors (shifts masked to act unsigned)."""
    x = x ^ ((x >> 30) & (2**34 - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & (2**37 - 1))
    x = x * _M2
    return x ^ ((x >> 31) & (2**33 - 1))


def _use_triton(device):
    """Triton on Ampere or newer GPUs (bf16 everywhere); under TRITON_INTERPRET=1 (tests) on CPU
    tensors too, in its interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return os.environ.get("TRITON_INTERPRET") == "1"


def uniform_noise_torch(seeds, steps, vocab):
    """[rows, vocab] float32 uniforms in (0, 1): a hash of (seed, step, token), so a row's draws do
    not depend on which other rows share its batch. float32 rounds the top value to 1.0, whose
    Gumbel noise -log(-log(u)) = inf would let a token of -inf logit win: it is clamped below 1."""
    counter = steps[:, None] * vocab + torch.arange(vocab, device=seeds.device)
    bits = _mix64(seeds[:, None] ^ _mix64(counter))
    return ((((bits >> 40) & (2**24 - 1)).float() + 0.5) / 2**24).clamp_(max=1 - 2**-24)


def uniform_noise(seeds, steps, vocab):
    """uniform_noise_torch's values (int64 seeds and steps, one per row), one kernel on a GPU."""
    if not _use_triton(seeds.device):
        return uniform_noise_torch(seeds, steps, vocab)
    out = torch.empty(len(seeds), vocab, dtype=torch.float32, device=seeds.device)
    _uniform_kernel[(len(seeds), triton.cdiv(vocab, 1024))](seeds.contiguous(), steps.contiguous(), out, vocab,
                                                            BLOCK=1024)
    return out


def add_rms_norm_torch(h, residual, norm, float8=False):
    """HF's decoder-layer order: residual + h (h alone when residual is None), then the RMSNorm
    module `norm`. Returns (normed, the sum), the sum being the next residual; with float8, normed
    [rows, width] comes as float8_rows_torch's (rows, scales)."""
    if residual is not None:
        h = residual + h
    return (float8_rows_torch(norm(h)) if float8 else norm(h)), h


def add_rms_norm(h, residual, norm, float8=False):
    """add_rms_norm_torch in one kernel on a GPU: fp32 sum of squares, the normed row rounded to
    the input dtype, then times the weight, as HF's LlamaRMSNorm (and Mistral's, Qwen2's) round."""
    if not _use_triton(h.device) or norm.weight.dtype != h.dtype or (float8 and h.dim() != 2):
        return add_rms_norm_torch(h, residual, norm, float8)
    x = h.reshape(-1, h.shape[-1])
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if float8 else x.dtype, device=x.device)
    scale = torch.empty(len(x), 1, dtype=torch.float32, device=x.device) if float8 else out
    total = x if residual is None else torch.empty_like(x)  # without a residual the sum is h itself
    width = x.shape[1]
    _rms_kernel[(x.shape[0],)](x, x if residual is None else residual, norm.weight, out, scale, total, width,
                               norm.variance_epsilon, HAS_RESIDUAL=residual is not None, FLOAT8=float8,
                               BLOCK=triton.next_power_of_2(width), num_warps=8)
    return ((out, scale) if float8 else out.view(h.shape)), total.view(h.shape)


def silu_mul_torch(gate_up, float8=False):
    """HF's SiLU-gated product act_fn(gate) * up of a fused gate|up row [rows, 2 * width], each op
    rounded to the input dtype; with float8, as float8_rows_torch's (rows, scales)."""
    gate, up = gate_up.chunk(2, -1)
    out = torch.nn.functional.silu(gate) * up
    return float8_rows_torch(out) if float8 else out


def silu_mul(gate_up, float8=False):
    """silu_mul_torch in one kernel on a GPU (the exponential: libdevice's expf, as torch's CUDA SiLU)."""
    if not _use_triton(gate_up.device) or gate_up.dim() != 2:
        return silu_mul_torch(gate_up, float8)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=torch.float8_e4m3fn if float8 else gate_up.dtype, device=gate_up.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device) if float8 else out
    _silu_mul_kernel[(rows,)](gate_up.contiguous(), out, scale, width, FLOAT8=float8, GPU=gate_up.is_cuda,
                              BLOCK=triton.next_power_of_2(width), num_warps=16 if width > 4096 else 8)
    return (out, scale) if float8 else out


def _rotate_half(x):
    """HF's rotate_half (transformers is not imported here: engine.py imports this module early)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_to_cache_torch(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups, scales=None):
    """qkv: [rows, (heads + 2 groups) * dim], one token a row; cos, sin: [rows, dim].
    Rotary (HF's apply_rotary_pos_emb) on the query and key heads; key and value written to
    cache_k/cache_v [slots, length, groups, dim] at (slot[row], pos[row]). Returns the query as
    [rows, heads // groups, groups, dim]: the query heads of a kv head side by side, as the decode
    attention reads them (query head h = g * rep + r sits at [r, g]).
    scales: for float8 caches, (key scales, value scales), each [slots, groups, length] fp32: each
    head of each token is stored as float8_rows_torch rounds a row, its scale at [slot, g, pos]."""
    rows, dim = qkv.shape[0], cos.shape[-1]
    q, k, v = qkv.view(rows, heads + 2 * groups, dim).split([heads, groups, groups], 1)
    cos, sin = cos[:, None], sin[:, None]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if scales is None:
        cache_k[slot, pos], cache_v[slot, pos] = k, v
    else:
        for cache, scales_of, t in ((cache_k, scales[0], k), (cache_v, scales[1], v)):
            t, scale = float8_rows_torch(t)
            # as bytes: torch's indexing of float8 tensors differs by version and device (pytorch#133605)
            cache.view(torch.uint8)[slot, pos] = t.view(torch.uint8)
            scales_of[slot, :, pos] = scale[..., 0]
    return q.view(rows, groups, heads // groups, dim).transpose(1, 2)


def rotary_to_cache(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups, scales=None):
    """rotary_to_cache_torch in one kernel on a GPU (its query comes back contiguous)."""
    half = cos.shape[-1] // 2
    if not _use_triton(qkv.device) or cos.dtype != qkv.dtype or half & (half - 1):  # Triton's ranges: powers of 2
        return rotary_to_cache_torch(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups, scales)
    rows, dim = qkv.shape[0], cos.shape[-1]
    q = torch.empty(rows, heads // groups, groups, dim, dtype=qkv.dtype, device=qkv.device)
    k_scale, v_scale = scales or (q, q)
    _rotary_kernel[(rows, heads + groups)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, cache_k, cache_v,
                                           k_scale, v_scale, slot, pos, cache_k.shape[1], HEADS=heads, GROUPS=groups,
                                           HALF=half, FLOAT8=scales is not None)
    return q


def float8_rows_torch(x):
    """x [rows, width] as float8 e4m3 rows, each scaled so that its largest magnitude is 448, and the
    scales [rows, 1] (fp32): x ~= rows * scales. The scale is a product, not a quotient: torch on a GPU
    divides by a number as a product with its inverse, on a CPU not."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) * (1 / 448)
    return (x / scale).to(torch.float8_e4m3fn), scale


def float8_rows(x):
    """float8_rows_torch's values in one kernel on a GPU."""
    if not _use_triton(x.device) or x.dim() != 2:
        return float8_rows_torch(x)
    x = x.contiguous()
    rows = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(len(x), 1, dtype=torch.float32, device=x.device)
    width = x.shape[1]
    _float8_kernel[(len(x),)](x, rows, scale, width, BLOCK=triton.next_power_of_2(width),
                              num_warps=16 if width > 4096 else 8)
    return rows, scale


def from_float8(t, scale, dtype):
    """Float8 heads t [..., dim] times their scales [...] (fp32), in `dtype`."""
    return (t.float() * scale[..., None]).to(dtype)


def decode_attention_torch(q, cache_k, cache_v, used, scale, scales=None):
    """One decode step's attention: q [rows, rep, groups, dim] (query head g * rep + r at [r, g]),
    row i reading the first used[i] positions of slot i of cache_k/cache_v [slots, length, groups,
    dim]; float8 caches with their scales (rotary_to_cache_torch's) are first scaled back to q's
    dtype. Returns [rows, heads * dim], heads in order."""
    rows, rep, groups, dim = q.shape
    k, v = cache_k[:rows], cache_v[:rows]
    if scales is not None:
        k, v = (from_float8(t, s[:rows].transpose(1, 2), q.dtype) for t, s in ((k, scales[0]), (v, scales[1])))
    mask = (torch.arange(cache_k.shape[1], device=q.device)[None, :] < used[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(rows, -1)


def decode_attention_fits(device, dtype, dim):
    """Whether decode_attention runs its kernels on such queries (else the torch version)."""
    return _use_triton(device) and dtype in (torch.float16, torch.bfloat16) and dim >= 16 and not dim & (dim - 1)


# Positions a program (split), positions a loop step (BLOCK_N), warps and pipeline stages of the split
# kernel, by cache dtype: the fastest bench/attn_probe.py timed on an H100 (2026-12-06) for float8; for
# 16-bit caches the fastest was 3% faster, within the spread, and these stay.
DECODE_META = {"16-bit": dict(split=256, BLOCK_N=64, num_warps=4, num_stages=3),
               "float8": dict(split=512, BLOCK_N=64, num_warps=4, num_stages=3)}


def decode_attention(q, cache_k, cache_v, used, scale, scales=None, meta=None):
    """decode_attention_torch as split-KV flash decoding in two kernels on a GPU: each (row, kv
    head, `split` positions) program reads its keys and values once for the query heads of that
    kv head, keeping a running softmax in fp32; a second kernel merges the splits and writes the
    heads in order (no transpose after). Float8 keys and values are read as such (half the bytes);
    their scales multiply the scores and the probabilities, not each element. meta: as DECODE_META's."""
    if not decode_attention_fits(q.device, q.dtype, q.shape[-1]):
        return decode_attention_torch(q, cache_k, cache_v, used, scale, scales)
    rows, rep, groups, dim = q.shape
    meta = dict(meta or DECODE_META["16-bit" if scales is None else "float8"])
    split = meta.pop("split")
    splits = triton.cdiv(cache_k.shape[1], split)
    part = torch.empty(rows, groups, splits, rep, dim + 2, dtype=torch.float32, device=q.device)  # acc | max | sum
    q = q.contiguous()
    k_scale, v_scale = scales or (part, part)
    _decode_split_kernel[(rows, groups, splits)](q, cache_k, cache_v, k_scale, v_scale, used, part, scale,
                                                 cache_k.shape[1], REP=rep, GROUPS=groups, DIM=dim,
                                                 M=max(16, triton.next_power_of_2(rep)), SPLIT=split, SPLITS=splits,
                                                 FLOAT8=scales is not None, **meta)
    out = torch.empty(rows, rep * groups * dim, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(rows, groups)](part, used, out, REP=rep, R=triton.next_power_of_2(rep), GROUPS=groups,
                                         DIM=dim, SPLIT=split, SPLITS=splits)
    return out


if triton is not None:
    @triton.jit
    def _mix64_tl(x):
        x = x ^ ((x >> 30) & (2**34 - 1))
        x = x * -4658895280553007687  # _M1
        x = x ^ ((x >> 27) & (2**37 - 1))
        x = x * -7723592293110705685  # _M2
        return x ^ ((x >> 31) & (2**33 - 1))

    @triton.jit
    def _uniform_kernel(seed_ptr, step_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        seed = tl.load(seed_ptr + row)
        counter = tl.load(step_ptr + row) * vocab + cols.to(tl.int64)
        bits = _mix64_tl(seed ^ _mix64_tl(counter))
        # (n + 0.5) rounds as torch's float add; times 2**-24 is exact, as torch's division by 2**24
        u = (((bits >> 40) & (2**24 - 1)).to(tl.float32) + 0.5) * 5.9604644775390625e-08
        u = tl.minimum(u, 0.99999994039535522)  # 1 - 2**-24
        tl.store(out_ptr + row.to(tl.int64) * vocab + cols, u, mask=mask)

    @triton.jit
    def _rms_kernel(x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, sum_ptr, width, eps, HAS_RESIDUAL: tl.constexpr,
                    FLOAT8: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        dt = x.dtype
        if HAS_RESIDUAL:  # rounded to the input dtype, as torch's 16-bit add
            x = (x.to(tl.float32) + tl.load(res_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)).to(dt)
            tl.store(sum_ptr + row + cols, x, mask=mask)
        x = x.to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)).to(dt)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(dt)
        if FLOAT8:
            _store_float8(y.to(tl.float32), out_ptr + row + cols, scale_ptr + tl.program_id(0), mask)
        else:
            tl.store(out_ptr + row + cols, y, mask=mask)

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, scale_ptr, width, FLOAT8: tl.constexpr, GPU: tl.constexpr,
                         BLOCK: tl.constexpr):
        """One row: silu(gate) rounded to the input dtype, times up, rounded again (torch's two ops). The
        interpreter (GPU false) has no libdevice: numpy's exp there."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=mask, other=0.0)
        up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=mask, other=0.0)
        dt = gate.dtype
        g = gate.to(tl.float32)
        act = tl.math.div_rn(g, 1.0 + (libdevice.exp(-g) if GPU else tl.exp(-g))).to(dt)
        y = (act.to(tl.float32) * up.to(tl.float32)).to(dt)
        if FLOAT8:
            _store_float8(y.to(tl.float32), out_ptr + row * width + cols, scale_ptr + row, mask)
        else:
            tl.store(out_ptr + row * width + cols, y, mask=mask)

    @triton.jit
    def _round_e4m3(v):
        """v (fp32, |v| <= 448) rounded half to even to float8 e4m3's values, in fp32: 3 bits of mantissa,
        multiples of 2**-9 below 2**-6. Converting the result to float8 is then exact, also in Triton's
        interpreter, whose own conversion truncates."""
        bits = v.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = (v + 24576.0) - 24576.0  # 1.5 * 2**14: float32 steps of 2**-9 there, the add rounds to them
        return tl.where(tl.abs(v) < 0.015625, small, normal)

    @triton.jit
    def _float8_kernel(x_ptr, rows_ptr, scale_ptr, width, BLOCK: tl.constexpr):
        """One row, whole in one block: its largest magnitude, then each value divided by its scale (an
        IEEE division, as torch's) and rounded to float8."""
        row = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row + cols, mask=cols < width, other=0.0).to(tl.float32)
        _store_float8(x, rows_ptr + row + cols, scale_ptr + tl.program_id(0), cols < width)

    @triton.jit
    def _store_float8(x, dst, scale_dst, mask):
        """A row x (fp32, 0 where masked) stored as float8_rows_torch stores it: its scale, its values."""
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) * 0.002232142857142857  # 1 / 448, rounded to fp32
        tl.store(scale_dst, scale)
        tl.store(dst, _round_e4m3(tl.math.div_rn(x, scale)).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, slot_ptr, pos_ptr,
                       length, HEADS: tl.constexpr, GROUPS: tl.constexpr, HALF: tl.constexpr, FLOAT8: tl.constexpr):
        """One (row, head): a query head (head < HEADS) or a kv head. Each product and the sum round
        to the 16-bit dtype, as HF's q * cos + rotate_half(q) * sin does in that dtype. FLOAT8: the kv
        head's key and value stored as _store_float8 stores a row, their scales at [slot, g, pos]."""
        row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        dim: tl.constexpr = 2 * HALF
        rep: tl.constexpr = HEADS // GROUPS
        lo = tl.arange(0, HALF)
        dt = q_ptr.dtype.element_ty
        c1 = tl.load(cos_ptr + row * dim + lo).to(tl.float32)
        c2 = tl.load(cos_ptr + row * dim + HALF + lo).to(tl.float32)
        s1 = tl.load(sin_ptr + row * dim + lo).to(tl.float32)
        s2 = tl.load(sin_ptr + row * dim + HALF + lo).to(tl.float32)
        src = qkv_ptr + row * (HEADS + 2 * GROUPS) * dim + head * dim
        x1 = tl.load(src + lo).to(tl.float32)
        x2 = tl.load(src + HALF + lo).to(tl.float32)
        y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        if head < HEADS:
            dst = q_ptr + row * HEADS * dim + ((head % rep) * GROUPS + head // rep) * dim
            tl.store(dst + lo, y1)
            tl.store(dst + HALF + lo, y2)
        else:
            g = head - HEADS
            slot, pos = tl.load(slot_ptr + row), tl.load(pos_ptr + row)
            at = (slot * length + pos) * GROUPS * dim + g * dim
            v1, v2 = tl.load(src + GROUPS * dim + lo), tl.load(src + GROUPS * dim + HALF + lo)
            if FLOAT8:
                at_scale = (slot * GROUPS + g) * length + pos
                _store_head_float8(y1.to(tl.float32), y2.to(tl.float32), k_ptr + at, k_scale_ptr + at_scale, HALF)
                _store_head_float8(v1.to(tl.float32), v2.to(tl.float32), v_ptr + at, v_scale_ptr + at_scale, HALF)
            else:
                tl.store(k_ptr + at + lo, y1)
                tl.store(k_ptr + at + HALF + lo, y2)
                tl.store(v_ptr + at + lo, v1)
                tl.store(v_ptr + at + HALF + lo, v2)

    @triton.jit
    def _store_head_float8(x1, x2, dst, scale_dst, HALF: tl.constexpr):
        """A head's two halves (fp32) stored as float8_rows_torch stores a row: its scale, its values."""
        scale = tl.maximum(tl.maximum(tl.max(tl.abs(x1), 0), tl.max(tl.abs(x2), 0)), 1e-12) * 0.002232142857142857
        tl.store(scale_dst, scale)
        lo = tl.arange(0, HALF)
        tl.store(dst + lo, _round_e4m3(tl.math.div_rn(x1, scale)).to(dst.dtype.element_ty))
        tl.store(dst + HALF + lo, _round_e4m3(tl.math.div_rn(x2, scale)).to(dst.dtype.element_ty))

    @triton.jit
    def _decode_split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, used_ptr, part_ptr, scale, length,
                             REP: tl.constexpr, GROUPS: tl.constexpr, DIM: tl.constexpr, M: tl.constexpr,
                             SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, FLOAT8: tl.constexpr):
        """Program (row, g, split): the REP query heads of kv head g (padded to M rows for tl.dot)
        against positions [split * SPLIT, its end) of the row's slot; writes the unnormalised sum,
        the running max and the running denominator of each query head. FLOAT8: keys and values
        are float8 heads, their scales [slots, groups, length]."""
        row, g, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        used = tl.load(used_ptr + row)
        start = split * SPLIT
        if start < used:
            r, d = tl.arange(0, M), tl.arange(0, DIM)
            q = tl.load(q_ptr + ((row * REP + r[:, None]) * GROUPS + g) * DIM + d[None, :], mask=r[:, None] < REP,
                        other=0.0)
            top = tl.full([M], float("-inf"), tl.float32)
            total = tl.zeros([M], tl.float32)
            acc = tl.zeros([M, DIM], tl.float32)
            end = tl.minimum(start + SPLIT, used)
            base = row * length * GROUPS * DIM + g * DIM
            scale_base = (row * GROUPS + g) * length
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                keep = n < end
                at = base + n[:, None].to(tl.int64) * GROUPS * DIM + d[None, :]
                k = tl.load(k_ptr + at, mask=keep[:, None], other=0.0)
                if FLOAT8:  # float8 to 16 bits: exact, and faster through float16 (an H100: 8% a layer)
                    k = k.to(tl.float16).to(q.dtype)
                s = tl.dot(q, tl.trans(k)) * scale
                if FLOAT8:
                    s = s * tl.load(k_scale_ptr + scale_base + n, mask=keep, other=0.0)[None, :]
                s = tl.where(keep[None, :], s, float("-inf"))
                new_top = tl.maximum(top, tl.max(s, 1))
                p = tl.exp(s - new_top[:, None])
                shrink = tl.exp(top - new_top)
                total = total * shrink + tl.sum(p, 1)
                v = tl.load(v_ptr + at, mask=keep[:, None], other=0.0)
                if FLOAT8:
                    v = v.to(tl.float16).to(q.dtype)
                    p = p * tl.load(v_scale_ptr + scale_base + n, mask=keep, other=0.0)[None, :]
                acc = acc * shrink[:, None] + tl.dot(p.to(q.dtype), v)
                top = new_top
            dst = part_ptr + (((row * GROUPS + g) * SPLITS + split) * REP + r) * (DIM + 2)
            tl.store(dst[:, None] + d[None, :], acc, mask=r[:, None] < REP)
            tl.store(dst + DIM, top, mask=r < REP)
            tl.store(dst + DIM + 1, total, mask=r < REP)

    @triton.jit
    def _decode_merge_kernel(part_ptr, used_ptr, out_ptr, REP: tl.constexpr, R: tl.constexpr, GROUPS: tl.constexpr,
                             DIM: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr):
        """Program (row, g): the splits of _decode_split_kernel merged; head g * REP + r written in order."""
        row, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        r, d = tl.arange(0, R), tl.arange(0, DIM)
        top = tl.full([R], float("-inf"), tl.float32)
        total = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, DIM], tl.float32)
        for split in range(0, tl.cdiv(tl.load(used_ptr + row), SPLIT)):
            src = part_ptr + (((row * GROUPS + g) * SPLITS + split) * REP + r) * (DIM + 2)
            part_top = tl.load(src + DIM, mask=r < REP, other=0.0)
            new_top = tl.maximum(top, part_top)
            mine, theirs = tl.exp(top - new_top), tl.exp(part_top - new_top)
            theirs_acc = tl.load(src[:, None] + d[None, :], mask=r[:, None] < REP, other=0.0)
            acc = acc * mine[:, None] + theirs_acc * theirs[:, None]
            total = total * mine + tl.load(src + DIM + 1, mask=r < REP, other=0.0) * theirs
            top = new_top
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        dst = out_ptr + ((row * GROUPS + g) * REP + r[:, None]) * DIM + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=r[:, None] < REP)


def self_check(device="cuda", dtype=torch.bfloat16):
    """Each kernel against its torch version on random inputs: {name: share of output elements that
    differ}, 0.0 being bit for bit; for decode_attention (another order of sums) the largest
    difference over the largest value. bench/bench.py runs it on the GPU, tests/test_kernels.py in
    Triton's interpreter."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    differ = lambda a, b: (a != b).float().mean().item()  # noqa: E731
    rows, vocab, width, heads, groups, dim, count, length = 6, 5000, 96, 8, 2, 16, 9, 12
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=g).to(device)
    steps = torch.randint(0, 600, (rows,), generator=g).to(device)
    out = {"uniform_noise": differ(uniform_noise(seeds, steps, vocab), uniform_noise_torch(seeds, steps, vocab))}
    norm = LlamaRMSNorm(width, eps=1e-5).to(device, dtype)
    norm.weight.data = rand(width)
    h, residual = rand(rows, width), rand(rows, width)
    for name, r in (("rms_norm", None), ("add_rms_norm", residual)):
        a, b = add_rms_norm(h, r, norm), add_rms_norm_torch(h, r, norm)
        out[name] = max(differ(a[0], b[0]), differ(a[1], b[1]))
    (a, a_scale), _ = add_rms_norm(h, residual, norm, float8=True)
    (b, b_scale), _ = add_rms_norm_torch(h, residual, norm, float8=True)
    out["add_rms_norm_float8"] = max(differ(a.float(), b.float()), differ(a_scale, b_scale))
    gate_up = rand(rows, 2 * 1500) * 3
    out["silu_mul"] = differ(silu_mul(gate_up), silu_mul_torch(gate_up))
    (a, a_scale), (b, b_scale) = silu_mul(gate_up, float8=True), silu_mul_torch(gate_up, float8=True)
    out["silu_mul_float8"] = max(differ(a.float(), b.float()), differ(a_scale, b_scale))
    qkv, cos, sin = rand(rows, (heads + 2 * groups) * dim), rand(rows, dim), rand(rows, dim)
    slot = torch.randperm(count, generator=g)[:rows].to(device)
    pos = torch.randint(0, length, (rows,), generator=g).to(device)
    caches = [torch.zeros(count, length, groups, dim, dtype=dtype, device=device) for _ in range(4)]
    qa = rotary_to_cache(qkv, cos, sin, caches[0], caches[1], slot, pos, heads, groups)
    qb = rotary_to_cache_torch(qkv, cos, sin, caches[2], caches[3], slot, pos, heads, groups)
    out["rotary_to_cache"] = max(differ(qa, qb), differ(caches[0], caches[2]), differ(caches[1], caches[3]))
    caches = [torch.zeros(count, length, groups, dim, dtype=torch.float8_e4m3fn, device=device) for _ in range(4)]
    scales = [torch.zeros(count, groups, length, device=device) for _ in range(4)]
    qkv[-1, (heads + 1) * dim:] *= 1e-4  # a key and a value of float8's subnormals
    qa = rotary_to_cache(qkv, cos, sin, caches[0], caches[1], slot, pos, heads, groups, scales[:2])
    qb = rotary_to_cache_torch(qkv, cos, sin, caches[2], caches[3], slot, pos, heads, groups, scales[2:])
    out["rotary_to_cache_float8"] = max(differ(qa, qb), *(differ(a.float(), b.float()) for a, b in
                                                          zip(caches[:2] + scales[:2], caches[2:] + scales[2:])))
    x = rand(rows, 2500) * torch.tensor([1e-3, 1, 30, 1e3, 0, 1], dtype=dtype).to(device)[:, None]
    x[-1] *= torch.logspace(-6, 0, 2500).to(device, dtype)  # float8's subnormals, below 2**-6 of 448
    a, b = float8_rows(x), float8_rows_torch(x)
    out["float8_rows"] = max(differ(a[0].float(), b[0].float()), differ(a[1], b[1]))
    length = 600  # three splits of 256 positions
    cache_k, cache_v = rand(rows, length, groups, dim), rand(rows, length, groups, dim)
    used = torch.tensor([1, 255, 256, 257, 599, 600], dtype=torch.int32).to(device)
    a = decode_attention(qa, cache_k, cache_v, used, dim ** -0.5)
    b = decode_attention_torch(qa, cache_k, cache_v, used, dim ** -0.5)
    out["decode_attention"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    (cache_k, k_scale), (cache_v, v_scale) = (float8_rows_torch(t) for t in (cache_k, cache_v * 30))
    scales = [t[..., 0].transpose(1, 2).contiguous() for t in (k_scale, v_scale)]
    a = decode_attention(qa, cache_k, cache_v, used, dim ** -0.5, scales)
    b = decode_attention_torch(qa, cache_k, cache_v, used, dim ** -0.5, scales)
    out["decode_attention_float8"] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    return out
