"""kernels.py: each Triton kernel gives its torch version's values; the rotary's torch version is HF's.

The kernels run in Triton's interpreter on CPU where Triton is installed (CPU builds of torch
come without it: then that test is skipped; bench/bench.py runs the same check on the GPU in
bf16). The interpreter truncates float32 to bfloat16 where a GPU rounds, so it checks float16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels import rotary_to_cache_torch, uniform_noise_torch


def test_triton_kernels_equal_their_torch_versions():
    pytest.importorskip("triton")
    code = "import json, torch, kernels; print(json.dumps(kernels.self_check('cpu', torch.float16)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    attention = got.pop("decode_attention")  # split-KV sums in another order: float16 rounding, ~5e-4
    assert got == {"uniform_noise": 0.0, "rms_norm": 0.0, "add_rms_norm": 0.0, "rotary_to_cache": 0.0}
    assert attention < 2e-3


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
