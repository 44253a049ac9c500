"""pipeline/training.py: packed rows give the padded loss (sdpa, eager, the varlen attention), LoRA
targets and trainable token rows, 4-bit on CPU, micro-batches, and the fast paths against the plain ones
(fused_gelu is Phi's gelu_new, bf16 adapters, the lean LoRA forward is peft's under autocast, lean_nf4 is
bitsandbytes' bit for bit, the chunked loss is the vocab-wide one), the two optimizers' maths.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from common import collate_packed, collate_padded, setup_chat_tokenizer, tokenize_chat
from helpers import CONVS, make_tokenizer
from pipeline import training
from pipeline.knobs import InputError
from pipeline.training import (DEFAULT_LORA_TARGETS, PACKED_ATTENTION, adapters_in_bf16, add_lora, fused_gelu,
                               load_student, loss_sum, micro_batches, supervised_tokens)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed_varlen"])
@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_phi"])
def test_packed_loss_equals_padded_loss(arch, four_bit, attn, request):
    model, tok = load_student(request.getfixturevalue(arch), load_in_4bit=four_bit, attn_implementation=attn)
    model.eval()
    examples = [tokenize_chat(tok, c) for c in CONVS]
    packed, padded = collate_packed(examples), collate_padded(examples, tok.pad_token_id)
    assert "attention_mask" not in packed and packed["position_ids"][0].tolist().count(0) == 3
    n = supervised_tokens(packed)
    assert n == supervised_tokens(padded) == sum(sum(x != -100 for x in e["labels"]) for e in examples)
    with torch.no_grad():
        loss_packed = loss_sum(model, packed).item() / n
        loss_padded = loss_sum(model, padded).item() / n
        # Controls: without the restarts, or with a KV cache (which hides position_ids from
        # transformers' mask builder), a packed row attends across conversations and the loss
        # moves; packed_varlen reads position_ids itself, cache or not.
        joined = {k: v for k, v in packed.items() if k != "position_ids"}
        loss_joined = loss_sum(model, joined).item() / n
        inputs = {k: v for k, v in packed.items() if k != "labels"}
        logits_cache = model(**inputs, use_cache=True).logits
        logits_nocache = model(**inputs, use_cache=False).logits
    assert loss_packed == pytest.approx(loss_padded, rel=1e-4)
    assert abs(loss_joined - loss_padded) > 1e-4 * loss_padded
    assert torch.allclose(logits_cache, logits_nocache, atol=1e-5) == (attn == "packed_varlen")


def test_loss_is_the_mean_over_supervised_tokens(tiny_llama):
    model, tok = load_student(tiny_llama, load_in_4bit=False)
    model.eval()
    batch = collate_padded([tokenize_chat(tok, c) for c in CONVS], tok.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss.item()  # transformers' own mean over labels != -100
        ours = loss_sum(model, batch).item() / supervised_tokens(batch)
    assert ours == pytest.approx(reference, rel=1e-5)


def test_micro_batches():
    tokenizer = make_tokenizer()  # not the shared fixture: setup changes it
    setup_chat_tokenizer(tokenizer)
    examples = [tokenize_chat(tokenizer, c) for c in CONVS * 4]
    lengths = [len(e["input_ids"]) for e in examples]
    packed = micro_batches(examples, 2 * max(lengths), packed=True)
    assert sum(b["input_ids"].numel() for b in packed) == sum(lengths)  # no padding at all
    for b in packed:
        assert b["input_ids"].shape[0] == 1 and b["input_ids"].numel() <= 2 * max(lengths)
        starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert all(b["labels"][0, s] == -100 for s in starts)
    padded = micro_batches(examples, 2 * max(lengths), packed=False, pad_id=tokenizer.pad_token_id)
    assert sum(int(b["attention_mask"].sum()) for b in padded) == sum(lengths)
    for b in padded:
        assert b["input_ids"].numel() <= 2 * max(lengths)
        assert (b["labels"][b["attention_mask"] == 0] == -100).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def lora_modules(model):
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")})


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_phi"])
def test_add_lora(arch, request):
    model, tok = load_student(request.getfixturevalue(arch), load_in_4bit=True)
    kind = model.config.model_type
    hidden, rows = model.config.hidden_size, [5, 9]
    model = add_lora(model, r=4, alpha=8, dropout=0.1, new_token_ids=rows)
    assert lora_modules(model) == sorted(DEFAULT_LORA_TARGETS[kind])
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    lora = sum(v for n, v in trainable.items() if "lora_" in n)
    tokens = {n: v for n, v in trainable.items() if "trainable_tokens" in n}
    # Llama ties lm_head to the embedding, so one set of rows serves both; Phi's head is separate.
    assert sorted(tokens.values()) == [len(rows) * hidden] * (1 if kind == "llama" else 2)
    assert sum(trainable.values()) == lora + sum(tokens.values())
    assert model.peft_config["default"].trainable_token_indices is not None


def test_add_lora_full_copies_and_custom_targets(tiny_phi):
    model, _ = load_student(tiny_phi, load_in_4bit=False)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel() + model.get_output_embeddings().bias.numel()
    model = add_lora(model, r=4, alpha=8, dropout=0.0, targets=["fc1", "fc2"], full_copies=True)
    assert lora_modules(model) == ["fc1", "fc2"]
    copies = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert copies == embed + head


def test_unknown_architecture_needs_targets(tiny_llama):
    model, _ = load_student(tiny_llama, load_in_4bit=False)
    model.config.model_type = "mystery"
    with pytest.raises(InputError, match="--lora-targets"):
        add_lora(model)


def test_4bit_cpu_gradients_survive_an_eval_pass(tiny_llama):
    """bitsandbytes repacks 4-bit weights on CPU for no-grad eval; load_student keeps the format."""
    model, tok = load_student(tiny_llama, load_in_4bit=True)
    model = add_lora(model, r=4, alpha=4, dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # so gradients reach layer 0 through the adapters
    batch = collate_packed([tokenize_chat(tok, c) for c in CONVS])

    def grads():
        model.zero_grad()
        loss_sum(model, batch).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    before = grads()
    model.eval()
    with torch.no_grad():
        loss_sum(model, batch)
    model.train()
    assert all(torch.equal(a, b) for a, b in zip(before, grads()))


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


def test_the_two_optimizers_take_the_same_steps():
    """05's --optimizer: torch's AdamW and bitsandbytes' paged AdamW 32-bit are the same maths."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(4096)]
    a, b = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    opt_a, opt_b = torch.optim.AdamW(a, lr=1e-3, weight_decay=0.01), bnb.optim.PagedAdamW32bit(b, lr=1e-3,
                                                                                                weight_decay=0.01)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, opt in ((a, opt_a), (b, opt_b)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all((x - p).abs().max() > 1e-3 for x, p in zip(a, start))  # they moved
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b))
