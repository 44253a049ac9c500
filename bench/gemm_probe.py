"""Mistral-7B's weight matmuls one matrix at a time (a layer's q|k|v, o, gate|up and down, and lm_head),
at each row count given, under cuBLASLt and cuBLAS, and as engine.Fp8 weights (float8; the input rounded
to float8 once, before the timed calls, as the norm and SiLU kernels hand most of a step's rows): where a
decode step's matmul time jumps with the rows. One GPU, random bf16 weights.

  python bench/gemm_probe.py [ROWS,ROWS,...] [LIB,LIB,...]   # default 176..528 every 16; cublaslt,cublas (fp8 too)

Prints a line per library and row count (step_ms: 32 layers' matmuls + lm_head); JSON to
$OUT/gemm_probe.json (OUT defaults to the current folder).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.engine import Fp8, matmul  # noqa: E402
from pipeline.kernels import float8_rows  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (32000, 4096)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}


def cuda_ms(weight, rows):
    """Milliseconds of engine.matmul(x, weight) for random x of `rows` rows on its GPU (mean of 10, after 3)."""
    x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
    if isinstance(weight, Fp8):
        x = float8_rows(x)
    for _ in range(3):
        matmul(x, weight)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        matmul(x, weight)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 10


weights = {k: torch.randn(n, m, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, m) in SHAPES.items()}
counts = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else list(range(176, 529, 16))
libs = sys.argv[2].split(",") if len(sys.argv) > 2 else ["cublaslt", "cublas"]
fp8 = {k: Fp8(w) for k, w in weights.items()}
rows = []
for lib in libs:
    torch.backends.cuda.preferred_blas_library("cublaslt" if lib == "fp8" else lib)
    for m in counts:
        row = {"lib": lib, "rows": m}
        for k, w in (fp8 if lib == "fp8" else weights).items():
            row[k] = round(cuda_ms(w, m), 4)
        row["step_ms"] = round(sum(row[k] * PER_STEP[k] for k in SHAPES), 3)
        rows.append(row)
        print(lib, m, row["step_ms"], {k: row[k] for k in SHAPES}, flush=True)
torch.backends.cuda.preferred_blas_library("cublaslt")
with open(os.path.join(os.environ.get("OUT", "."), "gemm_probe.json"), "w") as f:
    json.dump({"times": rows}, f, indent=1)
