"""Stage 05: packed == padded loss, token-budget batches, LoRA setup, 4-bit on CPU, resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import collate_packed, collate_padded, setup_chat_tokenizer, token_budget_batches, tokenize_chat
from helpers import CONVS, make_tokenizer, run_script
from pipeline.knobs import InputError
from pipeline.records import read_conversations
from pipeline.training import DEFAULT_LORA_TARGETS, add_lora, load_student, loss_sum, micro_batches, supervised_tokens

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
