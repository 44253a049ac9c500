"""Stage 05: packed == padded loss, token-budget batches, LoRA setup, 4-bit on CPU, resume, bad input;
pipeline/training.py's fast paths against the plain ones (packed rows through the varlen attention give
the padded sdpa loss and the same short training curve, fused_gelu is Phi's gelu_new, the lean LoRA
forward is peft's under autocast, lean_nf4 is bitsandbytes' bit for bit, the chunked loss is the
vocab-wide one)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common import collate_packed, collate_padded, setup_chat_tokenizer, token_budget_batches, tokenize_chat
from helpers import CONVS, make_tokenizer, run_script
from pipeline import training
from pipeline.knobs import InputError
from pipeline.records import read_conversations
from pipeline.training import (DEFAULT_LORA_TARGETS, PACKED_ATTENTION, adapters_in_bf16, add_lora, fused_gelu,
                               load_student, loss_sum, micro_batches, supervised_tokens)

ROOT = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Loss: packed rows and padded batches give the same mean per supervised token


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


# -----------------------------------------------------------------------------
# Micro-batches under a token budget


def test_token_budget_batches():
    lengths = [50, 7, 30, 30, 12, 64, 1, 20, 33, 9]
    for padded in (False, True):
        groups = token_budget_batches(lengths, 64, seed=3, padded=padded)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = max(lengths[i] for i in g) * len(g) if padded else sum(lengths[i] for i in g)
            assert cost <= 64
        assert groups == token_budget_batches(lengths, 64, seed=3, padded=padded)
    assert len(token_budget_batches(lengths, 64)) == 5  # 256 tokens in 5 bins of 64: little waste
    assert token_budget_batches([100, 5], 64) in ([[0], [1]], [[1], [0]])  # too long: a batch of its own


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


# -----------------------------------------------------------------------------
# LoRA: default targets per architecture, trainable token rows, full copies


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


def test_read_conversations_shapes_and_errors(tmp_path):
    evolved = tmp_path / "evolved.jsonl"
    evolved.write_text(json.dumps({"number": 7, "messages": ["Riddle?", "Answer.", "Why?", "Because."]}) + "\n")
    (rec,) = read_conversations(evolved)
    assert rec["id"] == "7" and [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello."}]})
                   + "\n\n" + json.dumps({"id": "b", "messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(InputError, match=rf"{bad}:3: message 0 needs a role"):
        read_conversations(bad)


# -----------------------------------------------------------------------------
# Fast paths: packed varlen attention, fused GELU, bf16 adapters, lean NF4, the chunked loss


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


# -----------------------------------------------------------------------------
# The script: outputs, resume equals an uninterrupted run, refusals, bad input


def conversations(n):
    riddles = [("What has keys but cannot open locks?", "A piano has keys."),
               ("The more you take, the more you leave behind.", "Footsteps!"),
               ("Why does the moon shine?", "Because it reflects the light of the sun."),
               ("How many legs does a spider have?", "Eight."),
               ("I speak without a mouth. What am I?", "An echo.")]
    out = []
    for i in range(n):
        q, a = riddles[i % len(riddles)]
        out.append({"id": f"c{i:02d}", "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a},
            {"role": "user", "content": "Can you tell me why?" + " Why?" * (i % 3)},
            {"role": "assistant", "content": f"Because {a.lower()}" + " Yes." * (i % 4)}]})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "04_conversations.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in conversations(16)))
    return file


def train_args(student, data, out, *extra, optimizer="adamw"):
    return ("05_finetune_phi2.py", f"--student={student}", f"--data={data}", f"--adapter={out}", "--epochs=2",
            "--tokens-per-batch=160", "--max-length=160", "--grad-accum=2", "--lr=1e-3", "--lora-r=4",
            "--lora-alpha=8", "--keep-checkpoints=2", "--gradient-checkpointing=0", f"--optimizer={optimizer}", *extra)


def flat_tensors(state, prefix=""):
    """The tensors of an optimizer state but its step count (torch keeps it as a tensor); bitsandbytes nests its
    moments in a dict."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif torch.is_tensor(v) and k != "step":
            out[prefix + k] = v
    return out


def read_log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


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


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_32bit"])
def test_resume_equals_uninterrupted_run(tiny_llama, data_file, tmp_path, optimizer):
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_script(*train_args(tiny_llama, data_file, full, optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((full / "run.json").read_text())
    steps = run["steps_done"]
    assert run["finished"] and steps == 2 * run["steps_per_epoch"] and steps >= 6
    assert "05: trained steps 1-" in r.stdout

    r = run_script(*train_args(tiny_llama, data_file, cut, f"--max-steps={steps // 2 + 1}", optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cut / "run.json").read_text())["steps_done"] == steps // 2 + 1
    if optimizer == "paged_adamw_32bit":  # the only one before the knob: a run.json without it resumes with it
        run = json.loads((cut / "run.json").read_text())
        del run["recipe"]["OPTIMIZER"]
        (cut / "run.json").write_text(json.dumps(run))
        r = run_script(*train_args(tiny_llama, data_file, cut))
        assert r.returncode == 2 and "holds a run with other optimizer" in r.stderr
    r = run_script(*train_args(tiny_llama, data_file, cut, optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step-{steps // 2 + 1:06d}" in r.stdout
    assert json.loads((cut / "run.json").read_text())["steps_done"] == steps

    a, b = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it did train
    state_a = torch.load(full / "checkpoints" / f"step-{steps:06d}" / "state.pt")
    state_b = torch.load(cut / "checkpoints" / f"step-{steps:06d}" / "state.pt")
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for k in opt_a:
        moments_a, moments_b = flat_tensors(opt_a[k]), flat_tensors(opt_b[k])
        assert moments_a.keys() == moments_b.keys() and len(moments_a) == 2  # Adam's two moments
        assert all(torch.allclose(moments_a[n], moments_b[n], atol=1e-6) for n in moments_a)
        assert opt_a[k]["step"] == opt_b[k]["step"] == steps
    train_a = [(x["step"], round(x["loss"], 5)) for x in read_log(full) if "loss" in x]
    train_b = [(x["step"], round(x["loss"], 5)) for x in read_log(cut) if "loss" in x]
    assert train_a == train_b and [s for s, _ in train_a] == list(range(1, steps + 1))

    # The outputs stage 06 and 07 read.
    assert len(list((full / "checkpoints").glob("step-*"))) == 2
    assert (full / "loss.png").stat().st_size > 1000
    assert (full / "chat_template.jinja").exists() and (full / "adapter_config.json").exists()
    split = [json.loads(x) for f in ("train.jsonl", "eval.jsonl") for x in (full / f).read_text().splitlines()]
    assert sorted(r["id"] for r in split) == [f"c{i:02d}" for i in range(16)]
    assert len((full / "eval.jsonl").read_text().splitlines()) == 2
    evals = [x for x in read_log(full) if "eval_loss" in x]
    assert evals[0]["step"] == 0 and len(evals) == 1 + 2 * 2 and set(evals[-1]) == {"step", "epoch", "eval_loss"}

    # A finished run is not retrained; other recipe knobs are refused; --overwrite starts afresh.
    r = run_script(*train_args(tiny_llama, data_file, full, optimizer=optimizer))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = run_script(*train_args(tiny_llama, data_file, full, "--lr=5e-4", optimizer=optimizer))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {full} holds a run with other lr: rerun with --overwrite to start afresh"]
    r = run_script(*train_args(tiny_llama, data_file, full, "--lr=5e-4", "--overwrite", "--max-steps=1",
                               "--eval-fraction=0", optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in read_log(full)] == [1]
    assert not (full / "checkpoints" / f"step-{steps:06d}").exists()


def test_bad_input_is_one_line_and_touches_nothing(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello."}]}) + "\n{oops\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    r = run_script(*train_args(tiny_llama, bad, out, "--overwrite"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: invalid JSON")
    assert [p.name for p in out.iterdir()] == ["run.json"] and (out / "run.json").read_text() == "{}"


def test_ddp_two_processes_equal_one_process_accumulating(tiny_llama, data_file, tmp_path):
    """torchrun x2 on CPU (gloo) with 1 micro-batch per step each = 1 process with 2 per step.

    The loss is divided by the supervised tokens of the whole step across processes, so the
    gradients agree. One eval conversation gives the processes unequal eval shares (a hang
    if eval went through DDP's forward, which syncs buffers).
    """
    from safetensors.torch import load_file

    common = ("--lora-dropout=0", "--max-steps=3", "--eval-fraction=0.0625")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = run_script(*train_args(tiny_llama, data_file, single, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    args = [a for a in train_args(tiny_llama, data_file, ddp, *common) if a != "--grad-accum=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / args[0]), *args[1:], "--grad-accum=1"], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x 1 per step" in r.stdout
    assert json.loads((ddp / "run.json").read_text())["recipe"]["PROCESSES"] == 2
    log_a, log_b = read_log(single), read_log(ddp)
    assert [x["step"] for x in log_a] == [x["step"] for x in log_b] == [0, 1, 2, 3, 3]
    for x, y in zip(log_a, log_b):
        key = "loss" if "loss" in x else "eval_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-5)
    a, b = load_file(single / "adapter_model.safetensors"), load_file(ddp / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
