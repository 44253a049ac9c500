"""The decode attention alone (kernels.decode_attention) at a decode step's shape of Mistral-7B (8 kv
heads of 128, 4 query heads each), bf16 and float8 caches, for each split size and split-kernel setting
(positions a loop step, warps, stages): ms per layer and the rate the cache is read at. One GPU, random
values; the rows' lengths uniform in 150..750 (the bench's mix: ~450 on average).

  python bench/attn_probe.py [ROWS]   # default 256

Prints a line per setting, the best per cache dtype last; JSON to $OUT/attn_probe.json.
"""

import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.kernels import DECODE_META, decode_attention, float8_rows  # noqa: E402

rows, length, groups, rep, dim = int(sys.argv[1]) if len(sys.argv) > 1 else 256, 1024, 8, 4, 128
g = torch.Generator(device="cuda").manual_seed(0)
used = torch.randint(150, 751, (rows,), device="cuda", generator=g, dtype=torch.int32)
q = torch.randn(rows, rep, groups, dim, device="cuda", dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(rows, length, groups, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
caches = {"16-bit": (k, v, None)}
(k8, ks), (v8, vs) = (float8_rows(t.view(-1, dim)) for t in (k, v))
caches["float8"] = (k8.view(k.shape), v8.view(v.shape),
                    tuple(s.view(rows, length, groups).transpose(1, 2).contiguous() for s in (ks, vs)))
positions = used.sum().item() * groups


def ms(fn, n=50):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


results = []
for kind, (ck, cv, scales) in caches.items():
    nbytes = positions * dim * 2 * ck.element_size() + (positions * 8 if scales else 0)
    want = decode_attention(q, ck, cv, used, dim ** -0.5, scales)
    for split, block, warps, stages in itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (2, 3, 4)):
        if block > split:
            continue
        meta = dict(BLOCK_N=block, num_warps=warps, num_stages=stages)
        settings = dict(split=split, **meta)
        try:
            fn = lambda: decode_attention(q, ck, cv, used, dim ** -0.5, scales, meta=settings)  # noqa: E731
            off = ((fn().float() - want.float()).abs().max() / want.float().abs().max()).item()
            t = ms(fn)
        except Exception as e:  # e.g. out of shared memory
            print(kind, split, meta, "failed:", str(e)[:100], flush=True)
            continue
        results.append({"cache": kind, "split": split, **meta, "ms": round(t, 4), "gb_s": round(nbytes / t / 1e6),
                        "max_diff": off})
        print(kind, split, meta, f"{t:.4f} ms", f"{nbytes / t / 1e6:,.0f} GB/s", f"diff {off:.1e}", flush=True)
for kind in caches:
    best = min((r for r in results if r["cache"] == kind), key=lambda r: r["ms"])
    ours = DECODE_META[kind]
    now = next(r for r in results if r["cache"] == kind and all(r[key] == ours[key] for key in ours))
    print(f"best {kind}: {best}; DECODE_META's: {now['ms']} ms", flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "attn_probe.json"), "w") as f:
    json.dump({"card": torch.cuda.get_device_name(), "rows": rows, "mean_used": used.float().mean().item(),
               "results": results}, f, indent=1)
