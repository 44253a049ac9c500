"""pipeline/engine.py, checked on CPU against the plain paths.

slot_generate (HFBackend's GPU path) gives the texts HF generate gives, with slots refilled and
shrinking, a shared head prefilled once, the fused layers and prefill, float8 weights and KV cache
(emulated); the sampler never picks a token its logits excluded. The training fast paths are
checked in test_training.py.
"""

import pytest
import torch
import torch.nn.functional as F

import common
from common import HFBackend
from pipeline import engine, kernels
from pipeline.engine import EngineOptions, RowSampler, force_lengths, pick_tokens, slot_generate
from pipeline.kernels import rotary_to_cache
from pipeline.knobs import InputError
from pipeline.records import Reply

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
            texts = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
            assert [Reply(t, len(row) < 12) for t, row in zip(texts, out)] == want  # ended: before max_new_tokens
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
    texts = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
    assert flags == [(True, True)] and [r.text for r in got] == texts


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
                                    eos_ids=eos, max_slots=6, stats=stats, processor=keep,
                                    options=EngineOptions(shrink=shrink))
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


def float8_rounded(t):
    """t's rows rounded to float8 e4m3, each scaled so its largest magnitude is 448, and scaled back (fp32)."""
    scale = t.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (t.float() / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmul_multiplies_each_row_rounded_to_float8(dtype):
    """matmul with an Fp8 weight: the input's rows and the weight's rows each rounded to float8 at their
    own scale, multiplied, the bias added, in the weight's dtype; rows of any magnitude (zero too) keep
    float8's ~3% error, not one row's scale for all."""
    torch.manual_seed(0)
    x = (torch.randn(6, 64) * torch.tensor([1e-3, 1, 1, 30, 1e4, 0])[:, None]).to(dtype)
    w, bias = (torch.randn(96, 64) * 0.3).to(dtype), torch.randn(96).to(dtype)
    got = engine.matmul(x, engine.Fp8(w), bias)
    assert got.dtype == dtype
    want = F.linear(float8_rounded(x), float8_rounded(w), bias.float())
    off = (got.float() - want).abs() / want.abs().amax(1, keepdim=True)  # each row against its own size
    assert off.max() < (1e-2 if dtype == torch.bfloat16 else 1e-6), off.max()
    got, exact = engine.matmul(x, engine.Fp8(w)).float(), F.linear(x.float(), w.float())
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
    plain = engine.matmul
    monkeypatch.setattr(engine, "matmul", lambda x, w, b=None: plain(x, w, b) if w is model.lm_head.weight
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
    caches = engine.SlotCache.caches
    monkeypatch.setattr(engine.SlotCache, "caches", lambda self: moved.append(1) or caches(self))
    want = logits(False)
    assert got.shape == (sum(targets), 300) and len(moved) == 5  # the head taken, put in 3 refills, 1 row moved
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 0.01
    prompt = [prompts[0]]
    with pytest.raises(ValueError, match="float8 KV cache runs in the fused layers only"):
        slot_generate(model, prompt, [0], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_ids=[], kv_fp8=True,
                      options=EngineOptions(fused=False))
    with pytest.raises(ValueError, match="float8 KV cache is read by decode='kernel' or 'sdpa'"):
        slot_generate(model, prompt, [0], max_new_tokens=2, temperature=0.0, top_p=1.0, eos_ids=[], kv_fp8=True,
                      options=EngineOptions(decode="flash"))


def test_fused_prefill_gives_hfs_logits_and_cache(monkeypatch):
    """prefill through the fused layers (prompts packed in one row, pipeline/kernels.py's torch versions on CPU):
    each prompt's last logits and the K/V written into its slot are HF's for that prompt alone."""
    model = random_decoder("llama")
    prompts = [torch.randint(1, 300, (n,)).tolist() for n in (5, 17, 1, 30)]
    rows = [3, 0, 4, 1]  # slot 2 stays empty
    calls = []
    monkeypatch.setattr(engine, "rotary_to_cache", lambda *args: calls.append(1) or rotary_to_cache(*args))
    slots = engine.SlotCache(model, 5, 32)
    slots.fused = engine.slot_weights(model)
    with torch.inference_mode():
        logits = engine.prefill(model, slots, rows, prompts)
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
                                   eos_ids=eos, max_slots=2, prefill_tokens=50, stats=stats, processor=keep,
                                   options=EngineOptions(fused=fused, share_head=share))
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
