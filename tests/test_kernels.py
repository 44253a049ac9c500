"""pipeline/kernels.py: each Triton kernel gives its torch version's values; the rotary's torch version is HF's.

The kernels run in Triton's interpreter on CPU where Triton is installed (CPU builds of torch
come without it; `make test` installs it, else those tests skip; bench/bench.py runs the same
check on the GPU in bf16), alone and inside slot_generate. The interpreter truncates float32 to
bfloat16 where a GPU rounds, so they check float16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.kernels import rotary_to_cache_torch, uniform_noise_torch


def test_triton_kernels_equal_their_torch_versions():
    pytest.importorskip("triton")
    code = ("import json, torch; from pipeline import kernels; "
            "print(json.dumps(kernels.self_check('cpu', torch.float16)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    attention = got.pop("decode_attention")  # split-KV sums in another order: float16 rounding, ~5e-4
    attention_float8 = got.pop("decode_attention_float8")  # seen: 7e-4 (the scales multiply the scores instead)
    silu = got.pop("silu_mul")  # the interpreter's exp is numpy's, not torch's: a float16 rounding flips here and there
    assert got == {"uniform_noise": 0.0, "rms_norm": 0.0, "add_rms_norm": 0.0, "add_rms_norm_float8": 0.0,
                   "silu_mul_float8": 0.0, "rotary_to_cache": 0.0, "rotary_to_cache_float8": 0.0, "float8_rows": 0.0}
    assert attention < 2e-3 and attention_float8 < 3e-3 and silu < 1e-3


# Run by test_slot_generate_through_the_kernels_gives_the_torch_versions_logits in Triton's interpreter.
SLOT_RUN = """
import json, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from pipeline import kernels
from pipeline.engine import EngineOptions, force_lengths, slot_generate

torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, max_position_embeddings=128)
model = AutoModelForCausalLM.from_config(config).half().eval()
head = torch.randint(1, 300, (20,)).tolist()  # a shared head: prefilled once, at other positions than the rest
prompts = [head + [first] + torch.randint(1, 300, (n,)).tolist() for first, n in zip(range(5), (3, 9, 0, 14, 6))]
targets = torch.tensor([2, 6, 3, 6, 4])  # reply lengths with the eos (0): rows end apart, the last on fewer slots
forced = torch.randint(1, 300, (5, 8))
forced[torch.arange(5), targets - 1] = 0
stats = {}


def run(triton, decode, force, fp8=False, kv_fp8=False):
    kernels._use_triton = (lambda device: True) if triton else (lambda device: False)
    seen = {}

    def keep(logits, r, steps):
        for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
            seen.setdefault(key, row)
        if force:
            return torch.full_like(logits, float("-inf")).scatter_(1, forced[r, steps][:, None], 0.0)
        return force_lengths(logits, targets[r], steps, 0)

    out = slot_generate(model, prompts, [11, 22, 33, 44, 55], max_new_tokens=6, temperature=0.8, top_p=0.9,
                        eos_ids=0, max_slots=3, processor=keep, stats=stats, fp8=fp8, kv_fp8=kv_fp8,
                        options=EngineOptions(decode=decode))
    return out, torch.stack([seen[key] for key in sorted(seen)])


tokens, logits = run(True, "sdpa", False)  # sampled: the noise, norm and rotary kernels in the real steps
steps = [stats["decode_steps"], stats["decode_rows"]]
want_tokens, want_logits = run(False, "sdpa", False)
_, kernel_logits = run(True, "kernel", True)  # teacher-forced: the split-KV attention too
_, forced_logits = run(False, "sdpa", True)
_, fp8_kernel_logits = run(True, "kernel", True, fp8=True)  # float8 rows written by the norm and SiLU kernels
_, fp8_logits = run(False, "sdpa", True, fp8=True)
_, kv_fp8_kernel_logits = run(True, "kernel", True, fp8=True, kv_fp8=True)  # the rotary and attention kernels too
_, kv_fp8_logits = run(False, "sdpa", True, fp8=True, kv_fp8=True)
rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
print(json.dumps({"tokens_equal": tokens == want_tokens, "rows": [len(t) for t in tokens], "steps": steps,
                  "rel_diff": rel(logits, want_logits),
                  "kernel_attention_rel_diff": rel(kernel_logits, forced_logits),
                  "fp8_rel_diff": rel(fp8_kernel_logits, fp8_logits), "fp8_vs_16_bit": rel(fp8_logits, forced_logits),
                  "kv_fp8_rel_diff": rel(kv_fp8_kernel_logits, kv_fp8_logits),
                  "kv_fp8_vs_fp8": rel(kv_fp8_logits, fp8_logits)}))
"""


def test_slot_generate_through_the_kernels_gives_the_torch_versions_logits():
    """slot_generate with every kernel in Triton's interpreter (float16, a shared head, slots refilled and
    shrinking): the torch versions' tokens, and their logits within float16 rounding (the norm's float32
    sums run in another order, which can flip an element's last bit), the split-KV attention too, and
    with float8 weights (the norm and the SiLU product writing float8 rows) likewise, and with a float8 KV
    cache too (the rotary writing float8 heads, the split-KV attention reading them)."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", SLOT_RUN], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["tokens_equal"] and got["rows"] == [1, 5, 2, 5, 3]
    decode_steps, decode_rows = got["steps"]
    assert decode_rows < 3 * decode_steps  # some steps ran on fewer than the 3 slots
    assert got["rel_diff"] < 2e-3 and got["kernel_attention_rel_diff"] < 5e-3  # seen: 5e-4 and 7e-4
    # seen: 0.012 and 0.052. A last-bit flip of a 16-bit value can move its float8 rounding a whole step (1/16).
    assert got["fp8_rel_diff"] < 0.03 < got["fp8_vs_16_bit"], got
    assert got["kv_fp8_rel_diff"] < 0.03 and got["kv_fp8_vs_fp8"] > 0.01, got  # seen: 0.014 and 0.042


def test_rotary_to_cache_is_hfs_rotary_and_cache_write():
    torch.manual_seed(0)
    rows, heads, groups, dim = 3, 8, 2, 16
    qkv, cos, sin = torch.randn(rows, (heads + 2 * groups) * dim), torch.randn(rows, dim), torch.randn(rows, dim)
    cache_k, cache_v = torch.zeros(5, 7, groups, dim), torch.zeros(5, 7, groups, dim)
    slot, pos = torch.tensor([4, 0, 2]), torch.tensor([6, 0, 3])
    q = rotary_to_cache_torch(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups)
    hq, hk, hv = qkv.view(rows, heads + 2 * groups, dim).split([heads, groups, groups], 1)
    want_q, want_k = apply_rotary_pos_emb(hq[:, :, None], hk[:, :, None], cos[:, None], sin[:, None], unsqueeze_dim=1)
    for r in range(rows):
        for h in range(heads):  # query head h of kv head h // 4 sits at [h % 4, h // 4]
            assert torch.equal(q[r, h % 4, h // 4], want_q[r, h, 0])
        assert torch.equal(cache_k[slot[r], pos[r]], want_k[r, :, 0])
        assert torch.equal(cache_v[slot[r], pos[r]], hv[r])
    assert int((cache_k != 0).any(-1).any(-1).sum()) == rows  # nothing else written


def test_uniform_noise_is_a_function_of_seed_step_and_token_only():
    seeds, steps = torch.tensor([5, 2**61, -7]), torch.tensor([0, 3, 499])
    u = uniform_noise_torch(seeds, steps, 1000)
    assert torch.equal(uniform_noise_torch(seeds[1:2], steps[1:2], 1000), u[1:2])  # alone or in a batch
    assert u.min() > 0 and u.max() < 1 and u.dtype == torch.float32
    assert abs(u.mean().item() - 0.5) < 0.02
