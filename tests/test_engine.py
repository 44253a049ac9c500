"""The GPU fast paths, checked on CPU against the plain ones.

slot_generate (HFBackend's GPU path) gives the texts HF generate gives; the sampler never
picks a token its logits excluded; packed rows through the varlen attention give the padded
sdpa loss and the same short training curve; fused_gelu is Phi's gelu_new; the lean LoRA
forward is peft's under autocast; the chunked loss is the vocab-wide one.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import common
from common import HFBackend, collate_packed, collate_padded, tokenize_chat
from helpers import CONVS
from pipeline import engine, kernels, training
from pipeline.engine import PACKED_ATTENTION, RowSampler, force_lengths, fused_gelu, pick_tokens, slot_generate
from pipeline.kernels import rotary_to_cache
from pipeline.knobs import InputError
from pipeline.training import adapters_in_bf16, add_lora, load_student, loss_sum, supervised_tokens

PROMPTS = [[{"role": "user", "content": t}] for t in (
    "What has keys?", "I weigh 1.5 kg and I speak without a mouth. What am I?", "Footsteps!",
    "Why does the moon shine? Because", "a", "Can you tell me a riddle about time, water, fire and the wind?")]


def test_slot_generate_equals_hf_generate(tiny_llama):
    backend = HFBackend(tiny_llama, device="cpu")  # on CPU HFBackend runs HF generate
    tok, model = backend.tokenizer, backend.model
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in PROMPTS]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    seeds = [11, 22, 33, 44, 55, 66]
    for temperature in (0.0, 0.8):
        want = backend.generate(PROMPTS, seeds, max_new_tokens=12, temperature=temperature, top_p=0.9)
        for slots in (6, 2):  # with 2 slots, rows wait and take the slots of rows that ended
            out = slot_generate(model, ids, seeds, max_new_tokens=12, temperature=temperature, top_p=0.9,
                                eos_ids=model.generation_config.eos_token_id, max_slots=slots, prefill_tokens=64)
            assert [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)] == want
    assert min(map(len, out)) < 12  # a row ended at eos and freed its slot early


def test_hf_fp8_backend_refuses_off_a_float8_gpu_and_runs_the_float8_engine(tiny_llama, monkeypatch):
    """--backend=hf-fp8 where float8 matmuls do not run (a CPU here) is one line naming what it needs; where
    they do (faked here), each reply is slot_generate's with float8 weights and KV cache."""
    with pytest.raises(InputError, match=r"backend hf-fp8 needs a GPU with float8 matmuls .*here: no GPU, llama"):
        common.load_backend("hf-fp8", tiny_llama)
    monkeypatch.setattr(common, "fp8_runs", lambda model: True)
    monkeypatch.setattr(common, "slot_engine_runs", lambda model: True)
    backend = common.load_backend("hf-fp8", tiny_llama)
    tok, model, seeds = backend.tokenizer, backend.model, [11, 22, 33, 44, 55, 66]
    flags = []
    monkeypatch.setattr(common, "slot_generate", lambda *a, **k: flags.append((k["fp8"], k["kv_fp8"]))
                        or slot_generate(*a, **k))
    got = backend.generate(PROMPTS, seeds, max_new_tokens=12, temperature=0.8, top_p=0.9)
    ids = tok([tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in PROMPTS],
              add_special_tokens=False)["input_ids"]
    out = slot_generate(model, ids, seeds, max_new_tokens=12, temperature=0.8, top_p=0.9,
                        eos_ids=model.generation_config.eos_token_id, fp8=True, kv_fp8=True)
    assert flags == [(True, True)] and got == [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def test_slot_generate_reports_each_reply_as_it_ends(tiny_llama):
    """on_row hears of each reply once, with its ids, when it ends: a short reply before a long one that
    started with it, before the call returns. HFBackend.generate's on_reply, on CPU (HF generate), hears of
    every reply too, with the text it returns."""
    backend = HFBackend(tiny_llama, device="cpu")
    tok, model = backend.tokenizer, backend.model
    ids = tok([tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in PROMPTS],
              add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    targets = torch.tensor([12, 2, 3, 1, 2, 3])  # reply lengths, forced: row 0 outlasts the rest together
    heard = []
    out = slot_generate(model, ids, list(range(6)), max_new_tokens=12, temperature=0.8, top_p=0.9, eos_ids=eos,
                        max_slots=2, prefill_tokens=64, on_row=lambda i, row: heard.append((i, list(row))),
                        processor=lambda logits, r, steps: force_lengths(logits, targets[r], steps, eos))
    assert sorted(i for i, _ in heard) == list(range(6))
    assert all(row == out[i] for i, row in heard)
    assert [len(row) for row in out] == (targets - 1).tolist()
    assert heard[0][0] == 1 and heard[-1][0] == 0  # row 1 (2 tokens) ends first; row 0, started with it, last
    replies = {}
    texts = backend.generate(PROMPTS, list(range(6)), max_new_tokens=8, temperature=0.8, top_p=0.9,
                             on_reply=replies.__setitem__)
    assert replies == dict(enumerate(texts))


def test_slot_generate_runs_the_last_rows_on_fewer_slots(tiny_llama):
    """As rows end, decode steps run over the fewest slots (all, a half, a quarter, ...) that hold the rest:
    the long row of the last slot moves, with its cache, to a free slot below, and each row gets the logits
    and tokens it gets when every step runs all the slots."""
    backend = HFBackend(tiny_llama, device="cpu")
    tok, model = backend.tokenizer, backend.model
    ids = tok([tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in PROMPTS],
              add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    targets = torch.tensor([3, 5, 2, 4, 2, 12])  # reply lengths, forced: the last prompt's outlasts the rest
    got = {}

    def keep(logits, r, steps):  # each row's logits at each step (a free slot repeats its row's last), forced lengths
        for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
            seen.setdefault(key, row)
        return force_lengths(logits, targets[r], steps, eos)

    for shrink in (True, False):
        stats, seen = {}, {}
        got[shrink] = slot_generate(model, ids, list(range(6)), max_new_tokens=12, temperature=0.8, top_p=0.9,
                                    eos_ids=eos, max_slots=6, shrink=shrink, stats=stats, processor=keep)
        got[shrink, "rows"], got[shrink, "logits"] = (stats["decode_rows"], stats["decode_steps"]), seen
    assert got[True] == got[False]
    assert got[True, "logits"].keys() == got[False, "logits"].keys()
    for key, logits in got[True, "logits"].items():
        torch.testing.assert_close(logits, got[False, "logits"][key], rtol=1e-5, atol=1e-5)
    assert [len(row) for row in got[True]] == (targets - 1).tolist()
    # The first token comes with the prefill; a row of target t decodes t - 1 steps: 6 rows decode at
    # step 1, 4 at step 2, 3 at 3, 2 at 4, and the long row alone 7 more steps. Steps run over 6, 3 or 1 slots.
    assert got[False, "rows"] == (6 * 11, 11)
    assert got[True, "rows"] == (6 + 6 + 3 + 3 + 7 * 1, 11)


def random_decoder(arch):
    """A tiny decoder with random weights, biases too (Llama's attention_bias and mlp_bias, Qwen2's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=256)
    config = {"llama": LlamaConfig(attention_bias=True, mlp_bias=True, **shape), "qwen2": Qwen2Config(**shape),
              "qwen3": Qwen3Config(head_dim=8, **shape)}[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.normal_(1 if p.dim() == 1 and (p == 1).all() else 0, 0.1)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_decode_gives_hf_generates_tokens(arch):
    """_decode_forward (fused q|k|v and gate|up, pipeline/kernels.py's torch versions on CPU) picks HF generate's
    tokens, greedy and sampled, with biases (Llama's attention_bias and mlp_bias, Qwen2's); Qwen3's q/k
    norms keep HF's layers. The model still computes as before with its weights turned into views."""
    model = random_decoder(arch)
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 9, 30)]  # 0 pads HF generate's rows
    probe = torch.tensor([prompts[1]])
    with torch.no_grad():
        before = model(probe).logits
    for temperature in (0.0, 0.8):
        want = []
        for i, p in enumerate(prompts):
            procs = [RowSampler([i], temperature=temperature, top_p=0.9)] if temperature else []
            out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, logits_processor=procs,
                                 eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
        got = slot_generate(model, prompts, list(range(4)), max_new_tokens=10, temperature=temperature, top_p=0.9,
                            eos_ids=[], max_slots=3, prefill_tokens=40)
        assert got == want
    fused = getattr(model, "_slot_fused", None)
    assert (fused is not None) == (arch != "qwen3")
    if fused:
        assert model.model.layers[1].mlp.up_proj.weight.data_ptr() > fused[1][1][0].data_ptr()  # a view of it
    with torch.no_grad():
        assert torch.equal(model(probe).logits, before)


def test_decode_matmuls_padded_to_more_rows_give_the_same_logits(monkeypatch):
    """Where _matmul_rows (GPU only) picks more rows for a decode step's matmuls, they run on zero-padded
    inputs and the result is cut back: each row gets the logits and tokens of the unpadded steps."""
    model = random_decoder("llama")
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 9, 30, 3, 11)]
    eos, targets = 299, torch.tensor([3, 5, 2, 4, 2, 12])
    got = {}

    def keep(logits, r, steps):
        for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
            seen.setdefault(key, row)
        return force_lengths(logits, targets[r], steps, eos)

    for pad in (True, False):
        if pad:
            monkeypatch.setattr(engine, "_matmul_rows", lambda weights, rows: {w.shape: rows + 5 for w in weights})
        stats, seen = {}, {}
        got[pad] = slot_generate(model, prompts, list(range(6)), max_new_tokens=12, temperature=0.8, top_p=0.9,
                                 eos_ids=eos, max_slots=6, stats=stats, processor=keep)
        got[pad, "logits"], got[pad, "padded"] = seen, stats.get("padded")
        monkeypatch.undo()
    assert got[True] == got[False]
    assert got[True, "logits"].keys() == got[False, "logits"].keys()
    for key, logits in got[True, "logits"].items():
        torch.testing.assert_close(logits, got[False, "logits"][key], rtol=1e-5, atol=1e-5)
    assert got[False, "padded"] is None
    assert got[True, "padded"] == {size: {"96x64": size + 5, "64x64": size + 5, "192x64": size + 5,
                                          "64x96": size + 5, "300x64": size + 5} for size in (1, 3, 6)}
    assert not engine._timed_rows  # off a GPU nothing is timed


def test_matmul_rows_pads_only_where_a_few_more_rows_run_5_percent_faster(monkeypatch):
    """_matmul_rows tries the multiples of 8 up to an eighth above the step's rows, keeps the fastest where
    it beats the step's own count by 5% or more, and times each shape and count once."""
    monkeypatch.setattr(engine, "_timed_rows", {})
    slow_437, flat = torch.zeros(8, 4), torch.zeros(6, 4)
    calls = []

    def ms_of(w, m):  # slow_437: 448 slower still, 456 20% faster; flat: 464 only 4% faster
        calls.append((w.shape[0], m))
        return ({456: 0.8, 448: 1.5} if w.shape[0] == 8 else {464: 0.96}).get(m, 1.0)

    plan = engine._matmul_rows([slow_437, flat], 437, ms_of)
    assert plan == {slow_437.shape: 456}
    assert [m for n, m in calls if n == 8] == [437, 440, 448, 456, 464, 472, 480, 488]  # up to 437 + 437 // 8
    calls.clear()
    assert engine._matmul_rows([slow_437, flat], 437, ms_of) == plan and not calls
    assert engine._matmul_rows([slow_437], 64, ms_of) == {} and calls == [(8, 64), (8, 72)]
    assert engine._matmul_rows([slow_437], 437) == {}  # off a GPU the default timer is not asked: no plan


def float8_rounded(t):
    """t's rows rounded to float8 e4m3, each scaled so its largest magnitude is 448, and scaled back (fp32)."""
    scale = t.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (t.float() / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmul_multiplies_each_row_rounded_to_float8(dtype):
    """_matmul with an Fp8 weight: the input's rows and the weight's rows each rounded to float8 at their
    own scale, multiplied, the bias added, in the weight's dtype; rows of any magnitude (zero too) keep
    float8's ~3% error, not one row's scale for all."""
    torch.manual_seed(0)
    x = (torch.randn(6, 64) * torch.tensor([1e-3, 1, 1, 30, 1e4, 0])[:, None]).to(dtype)
    w, bias = (torch.randn(96, 64) * 0.3).to(dtype), torch.randn(96).to(dtype)
    got = engine._matmul(x, engine.Fp8(w), bias)
    assert got.dtype == dtype
    want = F.linear(float8_rounded(x), float8_rounded(w), bias.float())
    off = (got.float() - want).abs() / want.abs().amax(1, keepdim=True)  # each row against its own size
    assert off.max() < (1e-2 if dtype == torch.bfloat16 else 1e-6), off.max()
    got, exact = engine._matmul(x, engine.Fp8(w)).float(), F.linear(x.float(), w.float())
    assert not got[-1].any()  # the zero row
    error = (got - exact)[:-1].norm(dim=1) / exact[:-1].norm(dim=1)
    assert ((error > 0.005) & (error < 0.08)).all(), error  # rounded (not the exact product), each row alike


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_slot_generate_runs_each_layer_matmul_on_float8(arch, monkeypatch):
    """slot_generate(fp8=True), prefill and decode: the logits of each layer's matmuls run on float8-rounded
    inputs and weights (emulated here in fp32 through the fp8=False path), lm_head not; the float8 copies are made
    once and the model's own weights stay."""
    model = random_decoder(arch)
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 9, 30)]
    forced = torch.randint(1, 300, (4, 12))
    probe = torch.tensor([prompts[1]])
    with torch.no_grad():
        before = model(probe).logits

    def logits(fp8):
        seen = {}

        def keep(logits, r, steps):  # each row's logits at each step, the tokens forced
            for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
                seen.setdefault(key, row.clone())
            return torch.full_like(logits, float("-inf")).scatter_(1, forced[r, steps][:, None], 0.0)

        slot_generate(model, prompts, [0] * 4, max_new_tokens=12, temperature=0.0, top_p=1.0, eos_ids=[],
                      max_slots=3, prefill_tokens=40, fp8=fp8, processor=keep)
        return torch.stack([seen[k] for k in sorted(seen)])

    got = logits(True)
    copies = model._slot_fp8[1]
    assert logits(True).equal(got) and model._slot_fp8[1] is copies
    plain = engine._matmul
    monkeypatch.setattr(engine, "_matmul", lambda x, w, b=None: plain(x, w, b) if w is model.lm_head.weight
                        else F.linear(float8_rounded(x), float8_rounded(w), b))
    want = logits(False)
    assert got.shape == (48, 300)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    assert (got - logits(False)).abs().max() > 0.1  # float8 changes the logits
    with torch.no_grad():
        assert torch.equal(model(probe).logits, before)


def test_kv_fp8_slot_generate_keeps_each_key_and_value_head_in_float8(monkeypatch):
    """slot_generate(kv_fp8=True): the logits of a cache whose every key and value head is rounded to float8
    at its own scale (emulated here in fp32 through kv_fp8=False), with a shared head copied into each slot
    and the last row moved to a lower slot (its scales with it); float8 changes the logits. Only the fused
    layers and the kernel or sdpa decode attention run it: elsewhere a one-line refusal."""
    model = random_decoder("llama")
    head = torch.randint(1, 300, (20,)).tolist()
    prompts = [head + torch.randint(1, 300, (n,)).tolist() for n in (3, 9, 1, 14, 6)]
    targets = torch.tensor([2, 9, 3, 4, 12])  # prompt 4 lands in slot 2 and outlives the others: moved to slot 0
    forced = torch.randint(1, 300, (5, 12))
    forced[torch.arange(5), targets - 1] = 0

    def logits(kv_fp8):
        seen, stats = {}, {}

        def keep(logits, r, steps):
            for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
                seen.setdefault(key, row.clone())
            return torch.full_like(logits, float("-inf")).scatter_(1, forced[r, steps][:, None], 0.0)

        slot_generate(model, prompts, [0] * 5, max_new_tokens=12, temperature=0.0, top_p=1.0, eos_ids=[0],
                      max_slots=3, kv_fp8=kv_fp8, processor=keep, stats=stats)
        assert stats["shared"] == 20 and stats["decode_rows"] < 3 * stats["decode_steps"]
        return torch.stack([seen[k] for k in sorted(seen)])

    got = logits(True)
    plain = logits(False)
    moved = []

    def rounded(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups, scales=None):
        q = rotary_to_cache(qkv, cos, sin, cache_k, cache_v, slot, pos, heads, groups)
        for cache in (cache_k, cache_v):
            t, scale = kernels.float8_rows_torch(cache[slot, pos])
            cache[slot, pos] = t.float() * scale
        return q

    monkeypatch.setattr(engine, "rotary_to_cache", rounded)
    caches = engine._Slots.caches
    monkeypatch.setattr(engine._Slots, "caches", lambda self: moved.append(1) or caches(self))
    want = logits(False)
    assert got.shape == (sum(targets), 300) and len(moved) == 5  # the head taken, put in 3 refills, 1 row moved
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 0.01
    prompt = [prompts[0]]
    with pytest.raises(ValueError, match="float8 KV cache runs in the fused layers only"):
        slot_generate(model, prompt, [0], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_ids=[], fused=False,
                      kv_fp8=True)
    with pytest.raises(ValueError, match="float8 KV cache is read by decode='kernel' or 'sdpa'"):
        slot_generate(model, prompt, [0], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_ids=[], decode="flash",
                      kv_fp8=True)


def test_fused_prefill_gives_hfs_logits_and_cache(monkeypatch):
    """_prefill through the fused layers (prompts packed in one row, pipeline/kernels.py's torch versions on CPU):
    each prompt's last logits and the K/V written into its slot are HF's for that prompt alone."""
    model = random_decoder("llama")
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 1, 30)]
    rows = [3, 0, 4, 1]  # slot 2 stays empty
    calls = []
    monkeypatch.setattr(engine, "rotary_to_cache", lambda *args: calls.append(1) or rotary_to_cache(*args))
    slots = engine._Slots(model, 5, 32)
    slots.fused = engine._slot_weights(model)
    with torch.inference_mode():
        logits = engine._prefill(model, slots, rows, prompts)
    assert len(calls) == model.config.num_hidden_layers  # the fused path ran, once a layer
    for p, s, got in zip(prompts, rows, logits):
        with torch.no_grad():
            out = model(torch.tensor([p]))
        torch.testing.assert_close(got, out.logits[0, -1], rtol=1e-5, atol=1e-5)
        for i, layer in enumerate(out.past_key_values.layers):
            for cache, want in ((slots.k[i], layer.keys), (slots.v[i], layer.values)):
                torch.testing.assert_close(cache[s, :len(p)], want[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
                assert not cache[s, len(p):].any()
    assert not any(cache[2].any() for cache in slots.k + slots.v)


@pytest.mark.parametrize("fused", [True, False])
def test_shared_head_is_prefilled_once_with_the_same_logits(fused):
    """The first tokens all prompts share are prefilled once and copied into each slot, also into slots
    that earlier rows used: each row gets the logits and tokens of prefilling its prompt whole, through
    the fused layers and through HF's."""
    model = random_decoder("llama")
    head = torch.randint(1, 300, (20,)).tolist()
    prompts = [head + [first] + torch.randint(1, 300, (n,)).tolist()  # they differ from their 21st token on
               for first, n in zip((5, 6, 7, 8, 9), (3, 11, 0, 25, 6))]
    eos = model.config.vocab_size  # never drawn: every reply runs to max_new_tokens
    got = {}

    def keep(logits, r, steps):
        for key, row in zip(zip(r.tolist(), steps.tolist()), logits):
            seen.setdefault(key, row)
        return logits

    for share in (True, False):
        stats, seen = {}, {}
        got[share] = slot_generate(model, prompts, [3, 1, 4, 1, 5], max_new_tokens=6, temperature=0.8, top_p=0.9,
                                   eos_ids=eos, max_slots=2, prefill_tokens=50, fused=fused, share_head=share,
                                   stats=stats, processor=keep)
        got[share, "stats"], got[share, "logits"] = stats, seen
    assert got[True] == got[False]
    assert got[True, "logits"].keys() == got[False, "logits"].keys() and len(got[True, "logits"]) == 5 * 6
    for key, logits in got[True, "logits"].items():
        torch.testing.assert_close(logits, got[False, "logits"][key], rtol=1e-5, atol=1e-5)
    assert (got[True, "stats"]["shared"], got[False, "stats"]["shared"]) == (20, 0)
    total = sum(map(len, prompts))
    assert (got[True, "stats"]["prefill_tokens"], got[False, "stats"]["prefill_tokens"]) == (total - 4 * 20, total)
    # A call packs whole prompts up to prefill_tokens either way (the keys its attention reads): the same calls,
    # here one prompt a call (24, 32, 21, 46 and 27 tokens; 2 slots, and no two fit in 50).
    assert got[True, "stats"]["prefill_calls"] == got[False, "stats"]["prefill_calls"] == 5


def test_shared_head_counts_the_common_tokens():
    assert engine._shared_head([[1] * 30 + [2], [1] * 30 + [3, 4]]) == 30
    assert engine._shared_head([[1] * 30, [1] * 40]) == 29  # the shortest prompt keeps a token to prefill
    assert engine._shared_head([[1] * 40, [1] * 15 + [2] * 25]) == 0  # fewer than 16: not worth a call
    assert engine._shared_head([[1] * 40, [1] * 15 + [2] * 25], least=8) == 15
    assert engine._shared_head([[1] * 40, [1] * 30, [2] * 40]) == 0
    assert engine._shared_head([[1] * 10, [1] * 10]) == 0
    assert engine._shared_head([[1] * 40]) == 0  # a single prompt: nothing to share
    assert engine._shared_head([[], [1] * 40]) == 0
    assert engine._shared_head([(1,) * 30 + (2,), [1] * 30 + [3]]) == 30  # any sequences of ids


def test_pick_tokens_never_picks_an_excluded_token():
    # Seed 2, step 3098, token 514 (vocab 4096) draw a uniform that float32 rounds to 1.0; its
    # Gumbel noise was inf and -inf + inf = NaN won the argmax: a token top-p had removed got
    # picked, about once per 500 steps at a 32k vocab.
    scores = torch.full((1, 4096), float("-inf"))
    scores[0, 7] = 0.0
    assert pick_tokens(scores, [2], [3098], temperature=1.0, top_p=1.0).tolist() == [7]
    assert pick_tokens(scores, [2], [3098], temperature=0.7, top_p=0.9).tolist() == [7]


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_phi"])
def test_packed_varlen_loss_equals_padded_sdpa_loss(arch, four_bit, request):
    model, tok = load_student(request.getfixturevalue(arch), load_in_4bit=four_bit,
                              attn_implementation=PACKED_ATTENTION)
    model.eval()
    examples = [tokenize_chat(tok, c) for c in CONVS]
    packed, padded = collate_packed(examples), collate_padded(examples, tok.pad_token_id)
    n = supervised_tokens(packed)
    with torch.no_grad():
        fast = loss_sum(model, packed).item() / n
        # Control: without the restarts the row is one sequence and attends across conversations.
        joined = loss_sum(model, {k: v for k, v in packed.items() if k != "position_ids"}).item() / n
        model.set_attn_implementation("sdpa")
        plain = loss_sum(model, padded).item() / n
    assert fast == pytest.approx(plain, rel=1e-4)
    assert abs(joined - plain) > 1e-4 * plain


def test_short_training_run_matches_the_padded_run(tiny_phi):
    curves = []
    for fast in (True, False):
        model, tok = load_student(tiny_phi, load_in_4bit=False, gradient_checkpointing=0.5 if fast else 0,
                                  attn_implementation=PACKED_ATTENTION if fast else "sdpa")
        assert [layer.gradient_checkpointing for layer in model.model.layers] == ([True, False] if fast else
                                                                                 [False, False])
        if fast:
            fused_gelu(model)  # what load_student does on a GPU
        torch.manual_seed(0)
        model = add_lora(model, dropout=0.0)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        examples = [tokenize_chat(tok, c) for c in CONVS]
        batch = collate_packed(examples) if fast else collate_padded(examples, tok.pad_token_id)
        losses = []
        for _ in range(6):
            loss = loss_sum(model, batch) / supervised_tokens(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert curves[0][-1] < curves[0][0] - 0.05  # the run learned something


def test_fused_gelu_is_phis_gelu_new(tiny_phi):
    model, _ = load_student(tiny_phi, load_in_4bit=False)
    mlp = model.model.layers[0].mlp
    assert type(mlp.activation_fn).__name__ == "NewGELUActivation"
    x = torch.randn(4, 7, model.config.hidden_size) * 3
    with torch.no_grad():
        before = mlp(x)
        fused_gelu(model)
        after = mlp(x)
    assert type(mlp.activation_fn).__name__ == "GELUTanh"
    assert torch.allclose(before, after, atol=1e-6)


def test_bf16_adapters_give_the_fp32_adapter_loss_and_gradients(tiny_phi):
    """adapters_in_bf16 (05's default): the adapter maths in bf16, the weights and their gradients fp32,
    the loss and the gradients those of peft's fp32 adapter maths within bf16 rounding."""
    model, tok = load_student(tiny_phi, load_in_4bit=False)
    model = add_lora(model.to(torch.bfloat16), dropout=0.0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient
            p.data.normal_(0, 0.05)
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])
    dropout = model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    seen = []  # the dtype the adapter maths start in
    dropout.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))

    def loss_and_grads():
        model.zero_grad()
        loss = loss_sum(model, batch) / supervised_tokens(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        return loss.item(), grads

    plain, plain_grads = loss_and_grads()
    adapters_in_bf16(model)
    fast, fast_grads = loss_and_grads()
    adapters_in_bf16(model, False)
    again, _ = loss_and_grads()
    assert seen == [torch.float32, torch.bfloat16, torch.float32]  # on, then undone
    assert again == plain
    assert fast == pytest.approx(plain, rel=1e-2)
    assert all(g.dtype == torch.float32 for g in fast_grads.values())
    a = torch.cat([g.flatten() for g in plain_grads.values()])
    b = torch.cat([fast_grads[n].flatten() for n in plain_grads])
    assert a.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def bf16_student(folder, monkeypatch, four_bit=False, dropout=0.0):
    """The tiny model computing in bf16 on CPU, as 05 runs Phi-2 on a GPU; LoRA B random (it starts at zero)."""
    if four_bit:  # NF4 with bf16 compute, as load_student sets it up on a GPU
        monkeypatch.setattr(training, "default_dtype", lambda device: torch.bfloat16)
        model, tok = load_student(folder, load_in_4bit=True)
    else:
        model, tok = load_student(folder, load_in_4bit=False)
        model = model.to(torch.bfloat16)
    torch.manual_seed(0)
    model = add_lora(model, dropout=dropout)  # alpha = r, as 05's recipe: scaling 1
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model, tok


def peft_under_autocast(model):
    """The previous adapters_in_bf16: every LoRA layer runs peft's forward under autocast."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.forward = torch.autocast("cpu", dtype=torch.bfloat16)(functools.partial(type(m).forward, m))


def loss_and_lora_grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout masks
    loss = loss_sum(model, batch) / supervised_tokens(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("four_bit", [False, True])
def test_lean_lora_forward_is_peft_forward_under_autocast(tiny_phi, four_bit, dropout, monkeypatch):
    """Without dropout the lean forward gives peft's loss and gradients bit for bit (same ops, same
    order; the scale is 1). With dropout it draws the same masks, but on CPU peft upcasts the adapter
    input to fp32 even under autocast (its torch.is_autocast_enabled() asks about CUDA), so its
    dropout scales in fp32: bf16 rounding apart. On a GPU peft's dropout runs in bf16 too."""
    model, tok = bf16_student(tiny_phi, monkeypatch, four_bit, dropout)
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])
    masks = []
    for name, m in model.named_modules():
        if name.endswith("lora_dropout.default"):
            m.register_forward_hook(lambda m, args, out: masks.append(out == 0))
    peft_under_autocast(model)
    before, before_grads = loss_and_lora_grads(model, batch)
    before_masks = masks[:]
    masks.clear()
    adapters_in_bf16(model)
    lean, lean_grads = loss_and_lora_grads(model, batch)
    assert len(masks) == len(before_masks) == 8  # 4 projections x 2 layers
    assert all(torch.equal(a, b) for a, b in zip(masks, before_masks))
    assert all(g.dtype == torch.float32 for g in lean_grads.values())
    if dropout == 0:
        assert lean == before
        assert all(torch.equal(lean_grads[n], g) for n, g in before_grads.items())
    else:
        assert sum(float(m.float().mean()) for m in masks) / len(masks) == pytest.approx(0.1, abs=0.02)
        assert lean == pytest.approx(before, rel=1e-4)  # seen: 2.4e-5 (bf16), 1.5e-5 (4-bit)
        a = torch.cat([g.flatten() for g in before_grads.values()])
        b = torch.cat([lean_grads[n].flatten() for n in before_grads])
        assert F.cosine_similarity(a, b, dim=0) > 0.9999


@pytest.mark.parametrize("checkpointed", [False, True])
def test_lean_nf4_gives_bitsandbytes_loss_and_gradients_bit_for_bit(tiny_phi, monkeypatch, checkpointed):
    """lean_nf4 (load_student applies it to 4-bit models): the same loss and LoRA gradients as
    bitsandbytes' own 4-bit matmul, bit for bit, with and without checkpointed layers; without
    gradients bitsandbytes' forward runs."""
    model, tok = bf16_student(tiny_phi, monkeypatch, four_bit=True)
    adapters_in_bf16(model)
    if checkpointed:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])
    calls = []
    dequantized = training._dequantized
    monkeypatch.setattr(training, "_dequantized", lambda *a: calls.append(a) or dequantized(*a))

    lean, lean_grads = loss_and_lora_grads(model, batch)
    n_lean = len(calls)
    training.lean_nf4(model, on=False)
    plain, plain_grads = loss_and_lora_grads(model, batch)
    assert len(calls) == n_lean
    # 6 linears x 2 layers dequantized in forward; in backward those whose input needs a gradient: all 6
    # of layer 1, only dense in layer 0 (q, k, v, fc1 and fc2 see frozen embeddings). Checkpointing
    # recomputes (and HF's makes the embeddings' output need a gradient): more.
    assert n_lean == 12 + 7 if not checkpointed else n_lean > 12 + 7
    assert lean == plain
    assert lean_grads.keys() == plain_grads.keys()
    assert all(torch.equal(lean_grads[n], g) for n, g in plain_grads.items())
    assert sum(g.abs().sum() for g in plain_grads.values()) > 0

    training.lean_nf4(model)
    with torch.no_grad():
        assert loss_sum(model, batch).item() / supervised_tokens(batch) == pytest.approx(plain, rel=1e-3)
    assert len(calls) == n_lean


def test_lean_lora_forward_defers_to_peft_when_disabled_or_merged(tiny_phi, monkeypatch):
    model, tok = bf16_student(tiny_phi, monkeypatch)
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])

    def loss():
        with torch.no_grad():
            return loss_sum(model, batch).item() / supervised_tokens(batch)

    with model.disable_adapter():
        base = loss()
    adapters_in_bf16(model)
    lean = loss()
    with model.disable_adapter():
        assert loss() == base != lean
    assert loss() == lean
    model.merge_adapter()  # the adapters are in the base weights now: adding them again would count them twice
    assert loss() == pytest.approx(lean, rel=1e-3) and abs(loss() - base) > 1e-3


def old_loss_sum(model, batch):
    """loss_sum before the chunks: one fp32 log-softmax over every kept position, kept for backward."""
    target = batch["labels"][:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("packed", [True, False])
def test_chunked_loss_equals_the_vocab_wide_loss(tiny_phi, packed):
    model, tok = load_student(tiny_phi, load_in_4bit=False)
    torch.manual_seed(0)
    model = add_lora(model, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    examples = [tokenize_chat(tok, c) for c in CONVS]
    batch = collate_packed(examples) if packed else collate_padded(examples, tok.pad_token_id)
    assert supervised_tokens(batch) > 3 * 16  # several chunks, the last one short
    results = []
    for loss_fn in (old_loss_sum, functools.partial(loss_sum, chunk=16)):
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (old, old_grads), (new, new_grads) = results
    assert new == pytest.approx(old, rel=1e-6)  # seen: 1e-7, the sum's order
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads))  # each row's gradient is its own


def test_chunked_loss_keeps_no_vocab_wide_tensor(tiny_phi, monkeypatch):
    """What autograd saves for backward: the fp32 log-softmax of every kept position before; now only
    the model's bf16 logits (checkpoint's input), each chunk's fp32 maths recomputed in backward."""
    model, tok = bf16_student(tiny_phi, monkeypatch)
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])
    vocab = model.get_output_embeddings().weight.shape[0]

    def wide_saved(loss_fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss_fn(model, batch)
        return [t.dtype for t in saved if t.shape[-1:] == (vocab,) and t.numel() >= supervised_tokens(batch) * vocab]

    assert set(wide_saved(old_loss_sum)) == {torch.float32}  # the control: the log-softmax (nll_loss saves it too)
    assert wide_saved(loss_sum) == [torch.bfloat16]
