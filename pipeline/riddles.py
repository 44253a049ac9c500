"""The riddle text rules of stages 01-04: seed files, cleaning, dedup, follow-up questions.

Plain text in, plain text out (no models): load_seed_rows reads the seed formats (load_seed_riddles
only their riddles), clean_riddle / filter_riddles turn generated lines into new riddles (exact and
near duplicates dropped, seeds included), clean_answer and clean_followup judge the replies of
stages 02 and 03. Reworded duplicates, which need embeddings, are dedup.py's.
"""

import csv
import io
import re
import unicodedata

from pipeline.knobs import InputError
from pipeline.records import (MAX_RECORD_CHARS, control_string, nonblank_line_numbers, path, read_json, read_jsonl,
                              read_text, stable_id)

# -----------------------------------------------------------------------------
# Stage 01: generated lines -> riddles (cleaning, exact and near-duplicate dedup)

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
    if control_string(text):  # after NFKC, which makes "<|" of full-width signs
        return text, "control_token"
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
    """Raw generations `{"id", "text", "ended"}` -> (kept records, rejected lines), in input order.

    The first of two near-duplicates is kept; anything close to a seed is dropped. The last line
    of a reply that max_new_tokens cut ("ended": false) is "unfinished", however it ends.
    Kept: `{"id", "messages": [user riddle]}`; rejected: `{"line", "prompt_id", "reason"}`.
    """
    dedup = Deduper(threshold, n)
    for s in seeds:
        dedup.add(s, "seed")
    kept, rejected = [], []
    for rec in raw:
        lines = rec["text"].splitlines()
        cut = -1  # the line max_new_tokens cut: the last nonblank one of a reply that did not end
        if rec.get("ended") is False:
            cut = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            text, reason = clean_riddle(line, min_words, max_chars)
            if reason is None and i == cut:
                reason = "unfinished"
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


# -----------------------------------------------------------------------------
# Seed riddles: local files in several shapes, or a hub dataset


def _riddle_of(rec, where):
    if isinstance(rec, str):  # a line of a .txt, an item of a .json list; blank ones are skipped
        if not rec.strip():
            return ""
        rec = {"text": rec}
    for field in RIDDLE_FIELDS:
        value = rec.get(field) if isinstance(rec, dict) else None
        if isinstance(value, str) and value.strip():
            if len(value) > MAX_RECORD_CHARS:
                raise InputError(f"{where}: riddle of {len(value):,} characters, over the limit of "
                                 f"{MAX_RECORD_CHARS:,} (MAX_RECORD_CHARS in pipeline/records.py)")
            text = normalize_text(value)
            found = control_string(text)  # after NFKC, as stored
            if found:
                raise InputError(f"{where}: riddle holds {found!r}, a chat control token; text must stay text, "
                                 f"so remove the record or the string")
            return text
    raise InputError(f"{where}: record has no riddle field ({', '.join(RIDDLE_FIELDS)}) with text")


def _seed_row(rec, where):
    riddle = _riddle_of(rec, where)
    return dict(rec, riddle=riddle) if isinstance(rec, dict) else {"riddle": riddle}


def load_seed_riddles(source):
    """Seed riddles (strings) from a local .jsonl/.json/.csv/.txt file or a hub dataset name."""
    return [r["riddle"] for r in load_seed_rows(source)]


def load_seed_rows(source):
    """The seed records as dicts, each with its normalized riddle under "riddle" (other fields as given,
    e.g. riddles_v1's answer and output); a .txt line or a JSON string becomes {"riddle": text}."""
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
            lines = nonblank_line_numbers(file)
            return [_seed_row(r, f"{file}:{n}") for r, n in zip(read_jsonl(file), lines)]
        if suffix == ".json":
            data = read_json(file, kinds=(dict, list))
            if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise InputError(f"{file}: expected a JSON list of records")
            rows = [_seed_row(r, f"{file}: record {i}") for i, r in enumerate(data, 1)]
        elif suffix == ".txt":
            text = read_text(file)  # UTF-8 checked here, with the line of a bad byte
            rows = [_seed_row(x, f"{file}:{n}") for n, x in enumerate(text.split("\n"), 1)]
        else:
            reader = csv.DictReader(io.StringIO(read_text(file), newline=""))
            try:
                if not set(reader.fieldnames or ()) & set(RIDDLE_FIELDS):
                    raise InputError(f"{file}:1: no riddle column ({', '.join(RIDDLE_FIELDS)}) in the header")
                rows = [_seed_row(row, f"{file}:{reader.line_num}") for row in reader]
            except csv.Error as e:  # a field over csv's own limit (131,072 characters), a stray NUL, ...
                raise InputError(f"{file}:{reader.line_num}: invalid CSV ({e})") from None
        rows = [r for r in rows if r["riddle"]]
        if not rows:
            raise InputError(f"{file}: no records (empty file)")
        return rows
    try:
        import datasets  # only for a hub dataset: its import costs seconds

        data = datasets.load_dataset(source, split="train")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot load seed dataset {source!r} from the hub ({first[:160]}); "
                         f"offline, pass a local .jsonl/.json/.csv/.txt file") from None
    return [_seed_row(r, f"{source}: row {i}") for i, r in enumerate(data, 1)]


# -----------------------------------------------------------------------------
# Stages 02-04: the generator's replies, kept or rejected with a reason


def clean_answer(text, ended=None):
    """A generated answer -> (text, None) or (text, reason): "empty", or "unfinished" when max_new_tokens cut it
    (training on it would teach stopping mid-sentence). ended: the backend's word (Reply.ended); where a server
    gives none (None), a last character that ends no sentence counts as cut."""
    text = text.strip()
    if not text:
        return text, "empty"
    if ended is False or (ended is None and re.search(r"[\w,;:(\-]$", text)):
        return text, "unfinished"
    return text, None


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


