"""The student and its training, for stage 05: 4-bit loading, LoRA, micro-batches, the loss.

load_student gives the model and its ChatML tokenizer (QLoRA: NF4 weights, bf16 compute),
add_lora wraps it, micro_batches packs tokenized conversations under a token budget, and
loss_sum is the cross-entropy over the supervised tokens of a batch. The GPU fast paths:
packed rows through torch's flash varlen attention (packed_attention, PACKED_ATTENTION), Phi's
GELU in one kernel (fused_gelu), the 4-bit linears and LoRA adapters as their bare maths
(lean_nf4, adapters_in_bf16). Around the run: the trackers --report-to names (trackers), and the model
cards and pushes of 05's adapter and 06's merged model (card_header, recipe_section, push_files).
"""

import functools
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import (best_device, collate_packed, collate_padded, default_dtype, from_pretrained, load_tokenizer,
                    setup_chat_tokenizer, token_budget_batches)
from pipeline.knobs import InputError
from pipeline.records import ROOT, path

# transformers and peft are imported inside the functions, as in common.py (HF_HUB_OFFLINE, startup).

# Attention projections to adapt, per model_type. Phi calls its output projection `dense`.
DEFAULT_LORA_TARGETS = {
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
}

# -----------------------------------------------------------------------------
# Packed rows through varlen attention, never a T x T mask; Phi's GELU in one kernel

PACKED_ATTENTION = "packed_varlen"
_bounds = [None, None]  # the last position_ids seen and its (cu_seqlens, longest): one lookup per forward


def _packed_bounds(position_ids):
    if _bounds[0] is not position_ids:
        pos = position_ids[0]
        starts = (pos == 0).nonzero().flatten()
        cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
        _bounds[:] = [position_ids, (cu, int((cu[1:] - cu[:-1]).max()))]
    return _bounds[1]


def _varlen(query, key, value, cu, longest, scaling):
    """torch's flash varlen kernel on [tokens, heads, dim]; causal within each sequence."""
    varlen_attn, params = _varlen_attn()
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        extra["scale"] = scaling
    return varlen_attn(query, key, value, cu, cu, longest, longest, **extra)


@functools.cache
def _varlen_attn():
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10, and only needed on a GPU

    return varlen_attn, inspect.signature(varlen_attn).parameters


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                      **kwargs):
    """Causal attention within each sequence of a packed row; anything else goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, q_len, dim = query.shape
    packed = (attention_mask is None and rows == 1 and position_ids is not None and key.shape[2] == q_len
              and dropout == 0.0)
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cu, longest = _packed_bounds(position_ids)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [tokens, heads, dim]
        return _varlen(q, k, v, cu, longest, scaling).unsqueeze(0), None
    rep = heads // key.shape[1]  # elsewhere: the same function, one sequence at a time
    bounds = cu.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b].repeat_interleave(rep, 1),
                                            value[:, :, a:b].repeat_interleave(rep, 1), is_causal=True, scale=scaling)
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


def _packed_mask(*args, **kwargs):
    """No mask at all for an unpadded row (the attention reads position_ids); sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, **kwargs)


def fused_gelu(model):
    """Phi's gelu_new (the tanh approximation, ~7 elementwise kernels) as the same function in one
    kernel (GELUTanh): QLoRA steps ~20% faster on an H100 (bench/RESULTS.md). Returns the model."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in model.modules():
        if isinstance(getattr(module, "activation_fn", None), NewGELUActivation):
            module.activation_fn = GELUTanh()
    return model


def packed_attention():
    """Register the attention for packed rows and return its name (an attn_implementation).

    A packed row (collate_packed) attends causally within each sequence through torch's
    flash varlen kernel on a GPU, so memory grows with tokens, not tokens squared (sdpa
    with the block-diagonal mask falls back to a kernel that materialises it). Padded
    batches, generation and CPU runs take the plain sdpa path or an exact CPU equivalent.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    return PACKED_ATTENTION


# -----------------------------------------------------------------------------
# The student


def load_student(name, load_in_4bit=True, double_quant=True, attn_implementation="sdpa", device=None,
                 gradient_checkpointing=False):
    """The model to fine-tune and its ChatML tokenizer (setup_chat_tokenizer applied).

    4-bit NF4 weights (QLoRA) with bf16 compute where supported, fp32 otherwise, all on
    `device` (default best_device()); the ids setup_chat_tokenizer added are in
    `tokenizer.new_token_ids`.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or best_device()
    dtype = default_dtype(device)
    quant = None
    if load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_use_double_quant=double_quant)
    if attn_implementation == PACKED_ATTENTION:
        packed_attention()  # registered before from_pretrained checks the name
    model = from_pretrained(AutoModelForCausalLM, name, dtype=dtype, quantization_config=quant, device_map={"": device},
                  attn_implementation=attn_implementation)
    if torch.device(device).type == "cuda":
        fused_gelu(model)
    if quant is not None and torch.device(device).type == "cpu":
        # bnb 0.50 repacks 4-bit weights for CPU inference on the first no-grad eval forward;
        # backward through the repacked weights then gives wrong gradients (tested). Keep one format.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if quant is not None:
        lean_nf4(model)
    tokenizer = load_tokenizer(name)
    tokenizer.new_token_ids = setup_chat_tokenizer(tokenizer, model)
    # A KV cache during training would also hide packed position_ids from the mask builder.
    model.config.use_cache = False
    if gradient_checkpointing:  # True or a share of the decoder layers, from the first
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < round(float(gradient_checkpointing) * len(layers))
    return model, tokenizer


class _NF4Linear(torch.autograd.Function):
    """x @ W.T + b for a frozen NF4 weight W, dequantized in forward and again in backward (never kept)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer  # the module, not a saved tensor: its weight is a constant, as in bitsandbytes
        return F.linear(x, _dequantized(layer, x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ _dequantized(ctx.layer, grad.dtype), None


def _dequantized(layer, dtype):
    state = layer.weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(layer.weight, layer.nf4_absmax, state.blocksize,
                                                         state.quant_type, state.shape, dtype)


def lean_nf4(model, on=True):
    """Train through each 4-bit linear as its bare maths: the NF4 weight dequantized, then F.linear.

    bitsandbytes gives the same numbers (a test checks them bit for bit), but per call it also checks
    its arguments in Python, dispatches a custom op, and with double quantization dequantizes the
    block scales again in two more kernels, forward and backward. The scales of a frozen weight never
    change, so they are dequantized once here (fp32, 4 bytes per 64 weights: ~160 MB for Phi-2).
    Without gradients (evaluation, generation) bitsandbytes' forward runs, with its kernels for
    few rows. on=False undoes it. Returns the model.
    """
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.__dict__.pop("forward", None)
            m.__dict__.pop("nf4_absmax", None)
            state = m.weight.quant_state
            if not on or state is None:
                continue
            absmax = state.absmax
            if state.nested:  # as bitsandbytes' dequantize_4bit does it
                absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
            m.nf4_absmax = absmax.float()
            m.forward = _lean_nf4_forward(m, m.forward)
    return model


def _lean_nf4_forward(layer, fallback):
    def forward(x):
        dtype = layer.compute_dtype
        bias = layer.bias
        if not torch.is_grad_enabled() or dtype is None or x.dtype != dtype or layer.weight.requires_grad or (
                bias is not None and (bias.dtype != dtype or bias.requires_grad)):
            return fallback(x)
        return _NF4Linear.apply(x, layer)

    return forward


def _module_name(model, module):
    return next(n for n, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def add_lora(model, r=32, alpha=32, dropout=0.1, targets=None, new_token_ids=(), full_copies=False):
    """Wrap a model with LoRA adapters on `targets` (default: DEFAULT_LORA_TARGETS of its type).

    The rows of `new_token_ids` in the input embedding and an untied lm_head train as PEFT
    trainable tokens; full_copies trains whole copies of both instead (the reference's way).
    """
    from peft import LoraConfig, get_peft_model

    kind = model.config.model_type
    if not targets:
        if kind not in DEFAULT_LORA_TARGETS:
            raise InputError(f"no default LoRA targets for model type {kind!r}: pass --lora-targets=a,b,c")
        targets = DEFAULT_LORA_TARGETS[kind]
    embed = _module_name(model, model.get_input_embeddings())
    head = _module_name(model, model.get_output_embeddings())
    extra = {}
    if full_copies:
        extra["modules_to_save"] = [embed, head]
    elif new_token_ids:
        ids = sorted(set(new_token_ids))
        extra["trainable_token_indices"] = {embed: ids, head: ids}  # a tied head shares the rows
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM", **extra)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. no module of that name in this model
        raise InputError(f"--lora-targets {','.join(targets)}: {str(e).strip().splitlines()[0][:200]}") from None


def adapters_in_bf16(model, on=True):
    """Run each LoRA adapter's dropout and matmuls in the model's 16-bit compute dtype, its weights
    staying fp32 for the optimizer. peft otherwise casts every adapter input to fp32: a copy of the
    activations per adapted projection, fp32 dropout and fp32 matmuls. A layer in the plain state
    takes _lean_lora_forward, any other peft's forward under autocast. on=False undoes it.
    Models computing in fp32 are left as they are."""
    from peft.tuners.lora import LoraLayer

    dtype = next((m.compute_dtype for m in model.modules() if hasattr(m, "compute_dtype")), model.dtype)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.__dict__.pop("forward", None)  # back to the class's forward
            if on and dtype in (torch.bfloat16, torch.float16):
                device = next(m.parameters()).device.type
                m.forward = torch.autocast(device, dtype=dtype)(functools.partial(type(m).forward, m))
                if _plain_adapters(m, dtype):
                    m.forward = _lean_lora_forward(m, dtype, m.forward)
    return model


def _plain_adapters(layer, dtype):
    """The adapters of a LoRA layer that _lean_lora_forward can run: vanilla LoRA (no DoRA or other
    variant, no bias) of nn.Linear A and B, on a linear base computing in `dtype`."""
    base = layer.base_layer
    if not isinstance(base, torch.nn.Linear) or (getattr(base, "compute_dtype", None) or base.weight.dtype) != dtype:
        return set()
    return {n for n, a in layer.lora_A.items() if type(a) is type(layer.lora_B[n]) is torch.nn.Linear
            and layer.lora_B[n].bias is None and n not in layer.lora_variant}


def _lean_lora_forward(layer, dtype, fallback):
    """A LoRA layer's forward as its bare maths: base(x) + scaling * B(A(dropout(x))), the adapter in
    `dtype` with its fp32 weights cast (their gradients stay fp32), the scale inside the add.

    peft's forward also copies a 4-bit base's output (a "defensive" clone), scales and adds in two
    kernels, and does per-call Python work; on Phi-2 the GPU waited on that host work. The add is out
    of place: a 4-bit base's output is a view made inside bitsandbytes' autograd Function, which
    autograd forbids changing in place; addmm would not save a kernel either (it copies its input
    first). Disabled, merged, several active adapters, extra arguments, another input dtype: `fallback`.
    """
    plain, base, lora_a, lora_b, dropout, scaling = (_plain_adapters(layer, dtype), layer.base_layer, layer.lora_A,
                                                     layer.lora_B, layer.lora_dropout, layer.scaling)

    def forward(x, *args, **kwargs):
        names = layer.active_adapters
        if args or kwargs or layer.disable_adapters or layer.merged or len(names) != 1 or names[0] not in plain \
                or x.dtype != dtype:
            return fallback(x, *args, **kwargs)
        name = names[0]
        result = base(x)  # first, as in peft: autograd then sums x's gradients in the same order
        h = F.linear(dropout[name](x), lora_a[name].weight.to(dtype))
        return torch.add(result, F.linear(h, lora_b[name].weight.to(dtype)), alpha=scaling[name])

    return forward


def micro_batches(examples, max_tokens, packed=True, pad_id=None, seed=0):
    """Tokenized examples -> collated micro-batches of at most max_tokens tokens each.

    packed: one padding-free row per batch (collate_packed); else right-padded rows
    (collate_padded, padding counted in the budget). An example longer than the budget
    gets a batch of its own.
    """
    groups = token_budget_batches([len(e["input_ids"]) for e in examples], max_tokens, seed, padded=not packed)
    if packed:
        return [collate_packed([examples[i] for i in g]) for g in groups]
    return [collate_padded([examples[i] for i in g], pad_id) for g in groups]


def supervised_tokens(batch):
    """How many tokens of a batch the loss counts (labels shifted by one, as predicted)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _cross_entropy_sum(logits, target):
    return F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")


def loss_sum(model, batch, chunk=1024):
    """Sum of the token losses of a padded or packed batch (cross-entropy over supervised tokens).

    Divide by the supervised tokens of the whole optimizer step: every token then weighs the
    same, however the step was cut into rows. Logits are computed only where a label is. For
    backward only the model's own (16-bit) logits are kept: each chunk of `chunk` rows is upcast
    and log-softmaxed in fp32 again in backward instead of keeping that fp32 copy, twice the size.
    """
    target = batch["labels"][:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)  # positions whose next token is supervised
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Through model(...), not its parts: under DDP its forward must be the one called.
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.flatten(0, 1)
    target = target[:, keep].flatten()
    # split, not slices: its backward joins the chunks' gradients once; a slice's pads each to the full size
    return torch.stack([checkpoint(_cross_entropy_sum, x, y, use_reentrant=False)
                        for x, y in zip(logits.split(chunk), target.split(chunk))]).sum()


# -----------------------------------------------------------------------------
# Experiment trackers: 05's --report-to, through accelerate

# accelerate's name of a tracker: (the module it imports, the package pip installs), where they differ from the name.
TRACKER_PACKAGES = {"comet_ml": ("comet_ml", "comet-ml")}


def _pip_install(package):
    """The pip command for a package: pinned as requirements-extra.txt pins it, where it does."""
    extra = ROOT / "requirements-extra.txt"
    for line in (extra.read_text(encoding="utf-8").splitlines() if extra.exists() else []):
        if line.split("==")[0].strip().lower() == package:
            return f"pip install {line.split('#')[0].strip()}"
    return f"pip install {package}"


def trackers(report_to):
    """The trackers --report-to names (comma-separated; empty or none: none), each one accelerate knows and whose
    package is installed: anything else is one line (InputError) saying what to use or which pip install to run.
    accelerate itself would skip a tracker whose package is missing without a word."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [n.strip().lower() for n in report_to.split(",")]
    names = list(dict.fromkeys(n for n in names if n not in ("", "none")))
    known = [t for t in LoggerType.list() if t != "all"]
    for name in names:
        if name not in known:
            raise InputError(f"--report-to: unknown tracker {name!r}; use none or any of {', '.join(known)} "
                             f"(comma-separated)")
        module, package = TRACKER_PACKAGES.get(name, (name, name))
        if importlib.util.find_spec(module) is None or LoggerType(name) not in get_available_trackers():
            raise InputError(f"--report-to={name}: the {package} package is not installed: run "
                             f"`{_pip_install(package)}`")
    return names


# -----------------------------------------------------------------------------
# Model cards and pushes: 05's adapter, 06's merged model


def hub_model_id(name):
    """A model name as a Hub repository id, for a card's base_model; None where it is none: an alias of a bundled
    model (converted from a quantized GGUF, not the Hub's weights) or a local folder."""
    from common import ALIASES

    if name in ALIASES or path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def describe_base(name):
    """The base model in a card's words: a link for a Hub id, else what it is."""
    from common import ALIASES

    if hub_model_id(name):
        return f"[{name}](https://huggingface.co/{name})"
    if name in ALIASES:
        return f"`{name}`: the pipeline's bundled {ALIASES[name][1]}, converted to a model folder"
    return f"`{name}`: a local model folder"


def card_header(base, **fields):
    """A model card's YAML header; base_model only where the base is a Hub id (the Hub refuses anything else)."""
    from huggingface_hub import ModelCardData

    base = hub_model_id(base)
    return f"---\n{ModelCardData(base_model=base, **fields).to_yaml()}\n---\n"


def recipe_section(recipe):
    """The knobs that define what was learned, as a table and as the command that trains the same adapter."""
    recipe = dict(recipe)
    processes = recipe.pop("PROCESSES", 1)

    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    rows = "".join(f"| `--{k.lower().replace('_', '-')}` | {f'`{shown(v)}`' if shown(v) else '(default)'} |\n"
                   for k, v in recipe.items())
    launch = f"accelerate launch --num_processes={processes}" if processes > 1 else "python"
    command = " ".join(f"--{k.lower().replace('_', '-')}={shown(v)}" for k, v in recipe.items())
    return (f"| knob | value |\n|---|---|\n{rows}\nThe same run: `{launch} 05_finetune_phi2.py {command}`"
            f"{f' on {processes} processes' if processes > 1 else ''}.\n")


def training_section(run, log_file):
    """What a 05 run learned from and how far it went (its run.json and log.jsonl), as a card's list."""
    from pipeline.evaluation import best_eval, read_train_log

    lines = [f"- data: `{Path(run['data']).name}` (sha1 `{run['data_sha1'][:12]}`): {run['train']:,} conversations "
             f"trained on, {run['eval']:,} held out for the eval loss; {run['train_tokens']:,} training tokens",
             f"- {run['steps_done']:,} optimizer steps ({run['steps_done'] / run['steps_per_epoch']:.2f} epochs of "
             f"{run['steps_per_epoch']:,} steps), {run['processes']} process(es) on {run['device']}"
             + (f", {run['seconds']:,.0f} s at {run['tokens_per_second']:,} tok/s" if "seconds" in run else "")]
    best = None
    if Path(log_file).exists():
        _, evals = read_train_log(log_file)
        best = best_eval(evals)
    if best:
        lines.append(f"- eval loss (mean per supervised token): {evals[0][2]:.4f} at step {evals[0][0]:,}, "
                     f"{evals[-1][2]:.4f} at step {evals[-1][0]:,}; best {best[2]:.4f} at step {best[0]:,}")
    return "\n".join(lines) + "\n"


def push_files(repo_id, folder, names, card, *, private=False, message="Upload"):
    """Upload the named files of `folder` and `card` as README.md to a Hub model repository in one push
    (pipeline.hub.push_folder), through a folder of hard links beside it: the pushed set is exactly these files,
    and nothing in `folder` changes, pushed or not. Returns the commit's URL."""
    from pipeline.hub import push_folder

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.push-", dir=folder.parent) as tmp:
        for name in names:
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(folder / name, Path(tmp) / name)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(folder / name, Path(tmp) / name)
        (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
        return push_folder(repo_id, tmp, private=private, message=message)
