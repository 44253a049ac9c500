"""The records layer: paths, ids, and the JSONL files every stage reads and writes. It imports no torch.

- paths resolve from the project folder; ids and seeds are derived from text, so reruns agree on them;
- reading: whole files as UTF-8, JSONL and JSON with errors naming the file and line, conversations checked;
- outputs: checked before any work (writable, never an input), appended crash-safely with resume
  (Appender), or written whole at once (write_*_atomic).
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from pipeline.knobs import InputError

ROOT = Path(__file__).resolve().parent.parent

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
                         f"(MAX_RECORD_CHARS in pipeline/records.py)")
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


def write_failed(file, e, kept=""):
    """An OSError while writing an output as one line (InputError): a full disk says what was kept and how to go on."""
    if e.errno == errno.ENOSPC:
        return InputError(f"{file}: disk full{kept}; free space and rerun: the run goes on from there")
    return InputError(f"{file}: cannot be written ({e.strerror or e})")


def fsync_path(p):
    """Flush a file or folder (its names) to the disk's own storage: past a power loss, not just past a kill."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder, names=None):
    """fsync the named files of a folder (None: everything under it), then the folder: on disk past a power loss."""
    folder = Path(folder)
    for p in folder.rglob("*") if names is None else (folder / n for n in names):
        if p.exists():
            fsync_path(p)
    fsync_path(folder)


@contextlib.contextmanager
def building_folder(target):
    """A folder of this process's own beside target to build in (another process may build the same one, as two
    ranks of accelerate launch do); when the block ends it is published as target (publish_folder), and when
    the block fails it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, target)


def publish_folder(tmp, target):
    """Rename the finished folder tmp to target, which readers check by its config.json: when another process
    published target first, that one stays and tmp goes; a target left without config.json (a crash) is
    replaced. tmp is fsynced first: a power loss leaves no named folder with half its files."""
    target = Path(target)
    fsync_tree(tmp)
    if target.exists() and not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # a folder is there now: another process's, whole
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    fsync_path(target.parent)
    return target


class Appender:
    """Append-only JSONL output that survives a crash at any moment.

    On open it repairs a torn last line (the write that a kill or a full disk interrupted) and
    collects the ids already written; `write` appends whole records, flushed and fsynced (a power
    loss costs at most the batch in flight). The file is opened (with overwrite: emptied) only at
    the first write, so a start that fails before it (a bad input, a server that is down) creates
    and changes nothing. Under several processes (see generate_all) only the first one writes: the
    others read the same ids (a torn last line counts for none) and never touch the file.
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

    def open(self):
        """Open the file now (with overwrite: empty it); write does so at its first call."""
        if self.writer and self._f is None:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.file, self._mode, encoding="utf-8")
            except OSError as e:
                raise write_failed(self.file, e) from None

    def write(self, records):
        if self.writer:
            self.open()
            try:
                self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                self._f.flush()
                os.fsync(self._f.fileno())
            except OSError as e:  # a part of the batch may be on disk: the next run repairs a torn last line
                raise write_failed(self.file, e, f" ({len(self.done):,} records were kept before this batch)") from None
        self.done.update(r[self.key] for r in records)

    def close(self):
        if self._f is not None:
            try:
                self._f.close()
            except OSError:  # the flush of a write that already failed (and said so)
                pass


def write_text_atomic(file, text):
    """Write a whole file at once, fsynced: a crash or a power loss leaves the old file or the new one. Under
    several processes the first one writes."""
    if process_share()[0] > 0:
        return
    file = Path(file)
    tmp = file.with_suffix(file.suffix + ".tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        fsync_path(file.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failed(file, e, " (the old file is kept)") from None


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


class Reply(NamedTuple):
    """A generated reply as a backend hands it to a stage's writer: its text, and whether it ended on its own
    (False: cut by max_new_tokens; None: the server did not say, and the stage falls back on the text)."""
    text: str
    ended: bool | None = None


def as_reply(reply):
    """A Reply from a backend's reply: a plain string (a backend that gives no signal) ended None; None stays None
    (a request that failed)."""
    return Reply(reply) if isinstance(reply, str) else reply


def check_unique_ids(records, file):
    """Resume skips by id, so two input records with one id would lose one: refuse them."""
    seen = set()
    for r in records:
        if r["id"] in seen:
            raise InputError(f"{file}: id {r['id']!r} appears twice; ids must be unique")
        seen.add(r["id"])


def process_share():
    """(rank, processes) under `accelerate launch` or torchrun; (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
