"""Stage 03's dedup at scale: 100k answered riddles through pipeline.dedup, on the CPU.

Makes N records like stage 02's output ({"id", "messages": [user riddle, assistant answer]}) from a
seeded generator (riddle shapes x phrasings x vocabulary, step-by-step replies), and plants at known
places the labelled pairs of tests/data/riddle_pairs.jsonl plus generated ones: rewordings (the same
riddle and answer in another phrasing and reply) and look-alikes (the same shape with another answer,
or two words swapped with the same answer). Then it embeds them with the bundled all-MiniLM-L6-v2
(dedup.vectors; cached under out/bench/), times the blocked comparison (dedup.compare) apart from the
embedding, samples its memory (resident set over the level before it, every 10 ms), and checks:
- every planted rewording caught, no planted look-alike merged with its partner (each pair is also
  judged on its own, as dedup.signals would, to tell the pass from the signals);
- on a sample of the records (5k), the blocked pass against the one-riddle-at-a-time pass it replaced
  (dedup.compare_reference, exact cosines), and against that pass with float32 cosines, as it ran
  before: decisions that differ, each one shown.
Writes bench/runs/<date>/dedup_<n/1000>k_cpu.json and prints a summary line.

    python bench/dedup_scale.py              # 100k: embedding ~20 min on 2 idle CPU cores (cached), then ~5 min
    python bench/dedup_scale.py --n=5000     # quick: embedding ~1 min
    python bench/dedup_scale.py --device=cuda --embed-only   # embed on a GPU into the cache, compare later
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import dedup  # noqa: E402
from pipeline.records import ROOT  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "riddle_pairs.jsonl"
CACHE_DIR = ROOT / "out" / "bench"

# -----------------------------------------------------------------------------
# Riddle-like texts: shapes, each with phrasings that say the same (same words affirmed and negated)
# and replies that explain it; slots filled from the vocabulary below.

SHAPES = {
    "has_cant": {
        "slots": ("parts", "act"),
        "riddles": ["What has {parts} but can't {act}?", "What has {parts} but cannot {act}?",
                    "I have {parts}, yet I can never {act}. What am I?",
                    "Though I have {parts}, I'm not able to {act}. What am I?",
                    "My {parts} are real enough, but they can't {act}. What am I?"],
        "replies": ["The answer is {ans}. {Ans} has {parts}, but not the kind that can {act}.",
                    "Let's think step by step.\n1. Something with {parts}.\n2. Those {parts} can't {act}.\n"
                    "So the answer is {ans}.",
                    "It's {ans}. People talk about the {parts} of {ans}, yet it can never {act}.",
                    "This riddle is describing {ans}. It has {parts} in name only, so it cannot {act}."],
    },
    "the_more": {
        "slots": ("verb", "more"),
        "riddles": ["The more you {verb} me, the {more} I get. What am I?",
                    "Each time you {verb} me, I grow {more}. What am I?",
                    "What gets {more} the more you {verb} it?",
                    "Keep on {verbing} me and I only become {more}. What am I?"],
        "replies": ["The answer is {ans}. Whenever you {verb} {ans}, it gets {more}.",
                    "Let's think step by step. Every time someone {verbs} it, it becomes {more}. "
                    "So the answer is {ans}.",
                    "It's {ans}! {Ans} is the thing that grows {more} as you {verb} it.",
                    "I think the answer is {ans}: {verbing} it only makes it {more}."],
    },
    "without": {
        "slots": ("act", "part", "act2", "part2"),
        "riddles": ["I {act} without {part} and {act2} without {part2}. What am I?",
                    "What can {act} with no {part} and {act2} with no {part2}?",
                    "With no {part}, I still {act}; with no {part2}, I still {act2}. What am I?"],
        "replies": ["The answer is {ans}. It can {act} though it has no {part}, and {act2} though it has no {part2}.",
                    "Let's think step by step. It has no {part}, yet it can {act}. It has no {part2}, yet it can "
                    "{act2}. So the answer is {ans}.",
                    "It's {ans}. {Ans} manages to {act} and to {act2} without any {part} or {part2}."],
    },
    "map": {
        "slots": ("place", "thing", "place2", "thing2"),
        "riddles": ["I have {place} but no {thing}, and {place2} but no {thing2}. What am I?",
                    "What has {place} without {thing} and {place2} without {thing2}?",
                    "You'll find {place} on me but never {thing}, {place2} but never {thing2}. What am I?"],
        "replies": ["The answer is {ans}. {Ans} shows {place} and {place2}, but only as pictures, so there are no "
                    "{thing} or {thing2}.",
                    "Let's think step by step. The {place} and the {place2} are only drawn, which is why they hold no "
                    "{thing} and no {thing2}. So the answer is {ans}.",
                    "It's {ans}: the {place} on it have no {thing}, the {place2} no {thing2}."],
    },
    "always": {
        "slots": ("where", "seen"),
        "riddles": ["What is always {where} but can never {seen}?",
                    "I'm always {where}, yet I can never {seen}. What am I?",
                    "Though I'm {where} all the time, I can't {seen}. What am I?"],
        "replies": ["The answer is {ans}. {Ans} is {where} wherever you go, but it can't {seen}.",
                    "Let's think step by step. It stays {where} all the time. Still, it can never {seen}. "
                    "So the answer is {ans}.",
                    "It's {ans}. It never leaves its place {where}, and yet nobody can make it {seen}."],
    },
    "runs": {
        "slots": ("does", "never"),
        "riddles": ["What {does} but never {never}?", "I {does_}, but I never {never_}. What am I?",
                    "What can {does_} all day and never {never_}?"],
        "replies": ["The answer is {ans}. {Ans} {does} all day long, but it never {never}.",
                    "Let's think step by step. It {does} without stopping. But it never {never}. "
                    "So the answer is {ans}.",
                    "It's {ans}! Anyone can see that it {does}, and nobody has ever seen it {never_}."],
    },
    "bark": {
        "slots": ("have", "lack"),
        "riddles": ["What has a {have} but no {lack}?", "I have a {have}, yet I have no {lack}. What am I?",
                    "What comes with a {have} but without a {lack}?"],
        "replies": ["The answer is {ans}. {Ans} has a {have}, but it has no {lack} at all.",
                    "Let's think step by step. There is a {have} on it. There is no {lack} on it. "
                    "So the answer is {ans}.",
                    "It's {ans}. You can point at its {have}, but you'll look in vain for a {lack}."],
    },
}

VOCAB = {
    "parts": "keys teeth hands legs wings eyes arms ears necks tongues spines heads feet fingers roots faces lips "
             "rings leaves scales bells strings buttons wheels handles pages horns tails".split(),
    "act": ["open a lock", "bite", "clap", "walk", "fly", "see", "hug", "hear", "turn", "speak", "read", "dance",
            "swim", "sing", "climb", "smile", "hold a cup", "taste food", "run", "wave", "kick", "listen", "jump",
            "grow", "write", "count", "whistle", "shout", "blink", "breathe"],
    "verb": [("take", "taking", "takes"), ("share", "sharing", "shares"), ("wash", "washing", "washes"),
             ("use", "using", "uses"), ("feed", "feeding", "feeds"), ("cut", "cutting", "cuts"),
             ("fill", "filling", "fills"), ("pull", "pulling", "pulls"), ("heat", "heating", "heats"),
             ("press", "pressing", "presses"), ("fold", "folding", "folds"), ("stretch", "stretching", "stretches"),
             ("polish", "polishing", "polishes"), ("shake", "shaking", "shakes"), ("water", "watering", "waters"),
             ("spin", "spinning", "spins"), ("sharpen", "sharpening", "sharpens"), ("blow", "blowing", "blows"),
             ("tell", "telling", "tells"), ("climb", "climbing", "climbs"), ("sweep", "sweeping", "sweeps"),
             ("squeeze", "squeezing", "squeezes"), ("paint", "painting", "paints"), ("dig", "digging", "digs")],
    "more": "bigger wetter lighter smaller emptier heavier quieter longer shorter colder warmer darker brighter "
            "stronger weaker thinner softer harder louder sharper duller cleaner dirtier rounder".split(),
    "part": "ears legs wings lungs eyes hands feet teeth fingers wheels arms toes lips bones muscles paws".split(),
    "place": "cities forests mountains lakes roads deserts islands valleys oceans villages fields rivers".split(),
    "thing": "houses trees rocks fish cars sand people stones boats cows grass water".split(),
    "where": ["in front of you", "above you", "under your feet", "behind you", "beside you", "inside you",
              "over your head", "around you", "ahead of you", "below the clouds", "between your ears",
              "at the end of the road", "in the middle of the night", "on the tip of your tongue"],
    "seen": ["be seen", "be touched", "be caught", "be held", "be heard", "be counted", "be weighed", "be kept",
             "be painted", "be photographed", "be reached", "be stopped"],
    "does": [("runs", "run"), ("flies", "fly"), ("falls", "fall"), ("ticks", "tick"), ("grows", "grow"),
             ("sings", "sing"), ("whistles", "whistle"), ("shines", "shine"), ("climbs", "climb"),
             ("rolls", "roll"), ("drips", "drip"), ("turns", "turn"), ("burns", "burn"), ("swings", "swing"),
             ("crawls", "crawl"), ("floats", "float"), ("jumps", "jump"), ("spins", "spin")],
    "never": [("walks", "walk"), ("sleeps", "sleep"), ("talks", "talk"), ("eats", "eat"), ("stops", "stop"),
              ("tires", "tire"), ("breathes", "breathe"), ("smiles", "smile"), ("drinks", "drink"),
              ("sits", "sit"), ("blinks", "blink"), ("cries", "cry"), ("laughs", "laugh"), ("waits", "wait")],
    "have": "bark trunk neck spine face mouth head foot bed tongue heart crown shell hand tail ring tooth "
            "eye cap nose belly key lid handle".split(),
    "lack": "bite leaf voice brain bone feather root wing stomach ear arm lock door hole beak horn".split(),
}
# Answers: objects and creatures, plain or with a modifier; none shares a word with a labelled pair's answer
# (checked below), and the planted pairs' objects (the last 40) appear in no background answer.
OBJECTS = """a kettle|a ladder|a lantern|a pencil|a mirror|a bucket|a broom|a doorbell|a chimney|a drum|a violin|
a trumpet|a guitar|a harp|a saddle|a wagon|a canoe|a sail|an anchor|a compass|a telescope|a microscope|a magnet|
a battery|a lightbulb|a switch|a plug|a cable|a keyboard|a mouse pad|a printer|a calendar|a diary|a notebook|
an envelope|a parcel|a ribbon|a button|a zipper|a belt|a scarf|a hat|a helmet|a boot|a sock|a mitten|a jacket|
a blanket|a mattress|a curtain|a carpet|a window|a doorway|a fence|a gate|a bridge|a tunnel|a tower|a castle|
a lighthouse|a windmill|a well|a fountain|a pond|a lake|a glacier|an iceberg|a volcano|a cave|a cliff|a desert|
a meadow|a garden|a hedge|a vine|a pumpkin|a carrot|an onion|a potato|a pepper|a lemon|an orange|a banana|
a pineapple|a coconut|a peanut|an acorn|a pinecone|a feather|a nest|a spider|a snail|a turtle|a frog|
a crab|a lobster|an octopus|a jellyfish|a shark|a whale|a dolphin|a penguin|an owl|a parrot|a rooster|a goose|
a duck|a swan|a bat|a squirrel|a rabbit|a fox|a wolf|a bear|a camel|a giraffe|an elephant|a zebra|a horse|
a donkey|a goat|a sheep|a pig|a cow|a cat|a snowman|a kite|a balloon|a yo-yo|a puzzle|a dice|a chessboard|
a deck of cards|a whistle|a flute|a bell|a gong|a hammer|a saw|a drill|a screwdriver|a wrench|a shovel|a rake|
a wheelbarrow|a tractor|a bicycle|a scooter|a skateboard|a sled|a train|a bus|a submarine|a rocket|a satellite|
a planet|a comet|the moon|a star|a cloud|a rainbow|the snow|the fog|the thunder|a shadow|a reflection|
a whisper|a secret|a riddle|a joke|a song|a poem|a story|a dream|a memory|a question|an idea|a thought|
a heartbeat|a sneeze|a yawn|a hiccup|a smile|a wink|a handshake|a hug|a kiss|a laugh|a tear|a blush|a sigh|
a glass|a cup|a plate|a bowl|a spoon|a fork|a knife|a pan|a pot|an oven|a fridge|a toaster|a blender|a sieve|
a funnel|a cork|a jar|a basket|a suitcase|a wallet|a purse|a key ring|a lock|a padlock|a chain|a rope|a knot|
a net|a hook|a fishing rod|a paddle|an oar|a raft|a flag|a trophy|a medal|a crown|a sword|a shield|an arrow|
a bow|a cannon|a statue|a painting|a photograph|a camera|a radio|a television|a speaker|a microphone|
a headphone|a doorknob|a hinge|a staircase rail|an elevator|an escalator|a parachute|a glider|a hot-air balloon|
a weather vane|a sundial|an hourglass|a thermometer|a scale|a ruler|a calculator|an abacus|a globe|an atlas|
a dictionary|a library|a museum|a theater|a circus|a carousel|a swing|a slide|a seesaw|a sandbox|a tent|
a campfire|a torch|a matchstick|a firework|a chandelier|a lamp|a flashlight|a candlestick|a fireplace|
a radiator|a fan|a heater|a vacuum cleaner|a washing machine|a dishwasher|a sink|a bathtub|a shower|a soap bar|
a toothbrush|a hairbrush|a razor|a perfume|a lipstick|a necklace|a bracelet|an earring|a wristwatch|
a pocket knife|a thimble|a spool|a sewing machine|a loom|a spinning wheel|a candle wick|a seed|a sprout|
a cactus|a fern|a moss|a lily|a rose|a tulip|a sunflower|a daisy|a cherry|a plum|a peach|a melon|a grape"""
OBJECTS = [a.strip().split(" ", 1)[1] for a in OBJECTS.replace("\n", "").split("|") if a.strip()]
MODIFIERS = """red blue green yellow golden silver wooden glass paper plastic striped spotted tiny giant old new broken
rusty frozen magic musical sleepy noisy shiny dusty velvet iron copper crystal woolen leather marble candy purple
checkered pink invisible haunted royal lazy""".split()

# Planted objects that all-MiniLM-L6-v2 puts, with modifiers, at an answer cosine of 0.7 or more from another
# planted object ("a velvet toothbrush" / "a sleepy hairbrush": 0.74): no planted answer is made of them, so
# that no two planted pairs have answers that match.
CLOSE_ANSWERS = {"hairbrush", "bracelet", "moss"}

FILLERS = ["Riddles like this play with the double meaning of a word.", "That's why it's such a classic riddle.",
           "The trick is to stop reading the words literally.", "Kids usually get this one after a second look.",
           "It sounds impossible until you think of everyday objects.", "Once you hear it, it seems obvious.",
           "The clue is hidden in the first half of the riddle.", "Nothing else fits both parts of the riddle.",
           "The riddle wants you to picture a living thing, but it isn't one.",
           "Think about where you would usually find one.", "The second line rules out the obvious guesses.",
           "Every word of the riddle points the same way.",
           "Most people guess an animal first.",
           "The tricky part is the word in the middle."]


def _capital(text):
    return text[:1].upper() + text[1:]


def _fill(template, slots, ans):
    return template.format(ans=ans, Ans=_capital(ans), **slots)


def _slots(rng, shape):
    """Slot values for a shape, the forms each phrasing needs included."""
    s = {}
    for name in SHAPES[shape]["slots"]:
        if name in ("act2", "part2", "place2", "thing2"):
            continue
        s[name] = rng.choice(VOCAB[name])
    if shape == "without":
        s["act"], s["act2"] = rng.sample(VOCAB["act"], 2)
        s["part"], s["part2"] = rng.sample(VOCAB["part"], 2)
    if shape == "map":
        s["place"], s["place2"] = rng.sample(VOCAB["place"], 2)
        s["thing"], s["thing2"] = rng.sample(VOCAB["thing"], 2)
    if shape == "the_more":
        s["verb"], s["verbing"], s["verbs"] = s["verb"]
    if shape == "runs":
        s["does"], s["does_"] = s["does"]
        s["never"], s["never_"] = s["never"]
    if shape == "bark":
        s["have"], s["lack"] = rng.choice(VOCAB["have"]), rng.choice(VOCAB["lack"])
    return s


def _riddle(rng, shape, slots, ans, phrasing=None, reply=None):
    """(riddle, reply): the given or a random phrasing and reply, with 0-2 filler sentences."""
    spec = SHAPES[shape]
    riddle = _fill(spec["riddles"][rng.randrange(len(spec["riddles"])) if phrasing is None else phrasing], slots, ans)
    text = _fill(spec["replies"][rng.randrange(len(spec["replies"])) if reply is None else reply], slots, ans)
    fillers = rng.sample(FILLERS, rng.randrange(3))
    return riddle, " ".join([text] + fillers) if rng.random() < 0.5 else " ".join(fillers + [text])


def _record(k, riddle, reply):
    return {"id": f"q-{k:06d}", "messages": [{"role": "user", "content": riddle},
                                             {"role": "assistant", "content": reply}]}


def make_records(n, seed=0, generated_pairs=1000):
    """(n records, planted pairs [{"kind", "label", "source", "a", "b"} with a < b record indices]).

    The labelled pairs of tests/data/riddle_pairs.jsonl, then generated_pairs generated ones (half
    rewordings, a quarter look-alikes with another answer, a quarter swapped look-alikes with the same
    answer), each at two random places; the rest background riddles, no two alike, answered "a red wooden
    kettle". Each planted generated pair has answers of its own ("a rusty lantern"), whose words no other
    riddle's answer holds or is held by.
    """
    rng = random.Random(seed)
    labelled = dedup.read_pairs(PAIRS)
    taken = {w for p in labelled for s in "ab" for w in dedup.answer_words(p[s]["answer"])}
    objects = [o for o in OBJECTS if not set(dedup.answer_words(o)) & taken]
    modifiers = [m for m in MODIFIERS if not set(dedup.answer_words(m)) & taken]
    planted = objects[-40:]  # no other object shares a word with these or a modifier ("knife" / "pocket knife")
    apart = {w for o in planted + modifiers for w in dedup.answer_words(o)}
    objects = [o for o in objects[:-40] if not set(dedup.answer_words(o)) & apart] + planted
    planted_combos = [(m, o) for o in planted for m in modifiers]
    rng.shuffle(planted_combos)

    def named(modifier, thing):
        words = f"{modifier} {thing}" if modifier else thing
        return ("an " if words[0] in "aeiou" else "a ") + words

    # Background answers: two modifiers and an object, none holding another's words ("a kettle" would hold every
    # "red kettle"), from 30k of them: about one riddle in ten shares its answer with an earlier one of its shape.
    combos = {(frozenset(rng.sample(modifiers, 2)), rng.choice(objects[:-40])) for _ in range(30_000)}
    combos = [(" ".join(sorted(m)), o) for m, o in sorted(combos, key=lambda c: (sorted(c[0]), c[1]))]

    def background_answer():
        return named(*rng.choice(combos))

    def planted_answer():  # one answer for each planted pair: none matches another's
        while True:
            modifier, thing = planted_combos.pop()
            if thing not in CLOSE_ANSWERS:
                return named(modifier, thing)

    pairs = []
    for p in labelled:
        pairs.append({"kind": p["kind"], "label": p["label"], "source": "labelled",
                      "texts": [(p[s]["riddle"], p[s]["reply"]) for s in "ab"]})
    seen = set()
    for g in range(generated_pairs):
        while True:
            shape = rng.choice(list(SHAPES))
            slots, ans = _slots(rng, shape), planted_answer()
            kind = "reworded" if g % 2 == 0 else ("another_answer" if g % 4 == 1 else "swapped_same_answer")
            if kind == "swapped_same_answer":
                shape = "bark"
                slots = _slots(rng, shape)
                slots["lack"] = rng.choice([w for w in VOCAB["have"] if w != slots["have"]])
            nphr, nrep = len(SHAPES[shape]["riddles"]), len(SHAPES[shape]["replies"])
            pa, ra = rng.randrange(nphr), rng.randrange(nrep)
            a = _riddle(rng, shape, slots, ans, pa, ra)
            if kind == "reworded":  # another phrasing and another reply, the same riddle and answer
                b = _riddle(rng, shape, slots, ans, (pa + 1 + rng.randrange(nphr - 1)) % nphr,
                            (ra + 1 + rng.randrange(nrep - 1)) % nrep)
            elif kind == "another_answer":  # the same phrasing, one slot changed, another answer
                other = dict(slots)
                name = SHAPES[shape]["slots"][rng.randrange(len(SHAPES[shape]["slots"]))]
                while other == slots:
                    other.update(_slots(rng, shape) if name in ("verb", "does", "never") else
                                 {name: _slots(rng, shape)[name]})
                b = _riddle(rng, shape, other, planted_answer(), pa, ra)
            else:  # the two words swapped, answered alike ("a bark but no bite" / "a bite but no bark")
                b = _riddle(rng, shape, {**slots, "have": slots["lack"], "lack": slots["have"]}, ans, pa, ra)
            if a[0] not in seen and b[0] not in seen:
                break
        seen.update((a[0], b[0]))
        pairs.append({"kind": kind, "label": "rewording" if kind == "reworded" else "look-alike",
                      "source": "generated", "texts": [a, b]})
    places = rng.sample(range(n), 2 * len(pairs))
    texts = [None] * n
    for p, (x, y) in zip(pairs, zip(places[::2], places[1::2])):
        p["a"], p["b"] = min(x, y), max(x, y)
        texts[p["a"]], texts[p["b"]] = p.pop("texts")
    seen.update(t[0] for t in texts if t)
    for k in range(n):
        while texts[k] is None:
            shape = rng.choice(list(SHAPES))
            riddle, reply = _riddle(rng, shape, _slots(rng, shape), background_answer())
            if riddle not in seen:
                seen.add(riddle)
                texts[k] = (riddle, reply)
    return [_record(k, *t) for k, t in enumerate(texts)], pairs


# -----------------------------------------------------------------------------
# Measuring

class PeakRSS:
    """The resident set's peak over its level at the start, sampled every 10 ms in a thread."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.over_base = self.peak - self.base


def cpu_model():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def embedded(records, cache, name, device):
    """(pool, vectors, {"s", "device", "from_cache", "embedded_now", "s_now"}): dedup.vectors of the records
    with the embedder `name` (alias or folder, run in float32). The cache holds vectors by record text, so a
    change to some records embeds only those (in "s_now"); "s" is the time of all n records at the mean rate
    of the runs that embedded the cache."""
    pool = [dedup.riddle_item(r) for r in records]
    keys = [hashlib.sha1((p["riddle"] + "\0" + p["reply"]).encode()).hexdigest()[:20] for p in pool]
    names = ("question", "trick", "answer")
    old = {"keys": np.empty(0, str), "answers": np.empty(0, str), "seconds": 0.0, "rows": 0, "device": ""}
    if cache and cache.exists():
        old = dict(np.load(cache, allow_pickle=False))
    row = {k: r for r, k in enumerate(old["keys"].tolist())}
    missing = {}
    for i, k in enumerate(keys):
        if k not in row:
            missing.setdefault(k, i)  # one of each text
    missing = list(missing.values())
    seconds, where, took = float(old["seconds"]), str(old["device"]), 0.0
    if missing:
        start = time.perf_counter()
        tokenizer, model = dedup.load_embedder(name, device=device)
        model.float()  # a folder may hold the weights in half precision
        loaded = time.perf_counter()
        new = dedup.vectors((tokenizer, model), [pool[i] for i in missing])
        took = time.perf_counter() - loaded
        on_gpu = model.device.type == "cuda"
        where = torch.cuda.get_device_name(model.device) if on_gpu else f"{os.cpu_count()} CPU cores"
        print(f"embedder loaded in {loaded - start:.1f} s; {len(missing):,} riddles embedded in {took:.0f} s "
              f"on {where}", flush=True)
        for k, i in enumerate(missing):
            row[keys[i]] = len(old["keys"]) + k
        old = {"keys": np.concatenate([old["keys"], np.array([keys[i] for i in missing])]),
               "answers": np.concatenate([old["answers"], np.array(new["answers"])]),
               "seconds": seconds + took, "rows": int(old["rows"]) + len(missing), "device": where,
               **{k: np.concatenate([old[k], new[k]]) if k in old else new[k] for k in names}}
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp.npz")
            np.savez(tmp, **old)
            os.replace(tmp, cache)
    rows = np.array([row[k] for k in keys])
    v = {k: old[k][rows] for k in names}
    v["answers"] = [str(a) for a in old["answers"][rows]]
    return pool, v, {"s": float(old["seconds"]) / int(old["rows"]) * len(pool), "device": where,
                     "from_cache": len(pool) - len(missing), "embedded_now": len(missing), "s_now": took}


def planted_results(pairs, found, pool, v):
    """Per planted pair: caught (b a duplicate), of which one (a or another), and the pair judged alone."""
    by_index = {d["index"]: d for d in found}
    rows = []
    for p in pairs:
        a, b = p["a"], p["b"]
        d = by_index[b]
        alone = dedup.signals(pool[a]["riddle"], pool[b]["riddle"], v["answers"][a], v["answers"][b],
                              float(v["trick"][a] @ v["trick"][b]), float(v["answer"][a] @ v["answer"][b]),
                              trick_min=dedup.TRICK_MIN, answer_min=dedup.ANSWER_MIN)
        rows.append({**{k: p[k] for k in ("kind", "label", "source", "a", "b")},
                     "dropped": d["duplicate"], "of_a": d["duplicate"] and d["of"] == ("new", a),
                     "of": d["of"][1], "a_kept": not by_index.get(a, {"duplicate": False})["duplicate"],
                     "alone_merged": all(alone), "trick": round(float(v["trick"][a] @ v["trick"][b]), 3),
                     "answers": [v["answers"][a], v["answers"][b]]})
    return rows


def sample_check(pool, v, indices, block_rows):
    """Blocked pass vs the one-at-a-time reference (exact cosines, and float32 as it ran) on pool[indices]."""
    sub = [pool[k] for k in indices]
    sv = {k: v[k][indices] for k in ("question", "trick", "answer")}
    sv["answers"] = [v["answers"][k] for k in indices]
    out = {"n": len(indices)}
    start = time.perf_counter()
    blocked = dedup.compare(sub, sv, block_rows=block_rows)
    out["blocked_s"] = round(time.perf_counter() - start, 2)
    for name, exact in (("reference", True), ("reference_float32", False)):
        start = time.perf_counter()
        ref = dedup.compare_reference(sub, sv, exact=exact)
        out[f"{name}_s"] = round(time.perf_counter() - start, 2)
        diffs = [{"record": int(indices[d["index"]]), "reference": r, "blocked": d}
                 for d, r in zip(blocked, ref) if d != r]
        out[f"{name}_differences"] = len(diffs) + abs(len(blocked) - len(ref))
        out[f"{name}_decisions_differ"] = sum(x["reference"]["duplicate"] != x["blocked"]["duplicate"] for x in diffs)
        out[f"{name}_shown"] = diffs[:20]
        for x in diffs:
            print(f"  differs from {name}: record {x['record']}: reference {x['reference']} / blocked {x['blocked']}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="answered riddles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=1000, help="generated planted pairs (the labelled ones come too)")
    ap.add_argument("--sample", type=int, default=5000, help="records checked against the one-at-a-time pass (0: none)")
    ap.add_argument("--block-rows", type=int, default=dedup.BLOCK_ROWS)
    ap.add_argument("--embedder", default=dedup.EMBEDDER_ALIAS, help="alias or folder (dedup.load_embedder)")
    ap.add_argument("--device", default="cpu", help="embedding device")
    ap.add_argument("--no-cache", action="store_true", help="embed again, and keep no vectors under out/bench/")
    ap.add_argument("--embed-only", action="store_true", help="embed into the cache, compare nothing")
    ap.add_argument("--out", help="JSON file (default bench/runs/<date>/dedup_<n>_cpu.json)")
    args = ap.parse_args()

    load_before = os.getloadavg()
    records, pairs = make_records(args.n, args.seed, args.pairs)
    cache = None if args.no_cache else CACHE_DIR / "dedup_vectors.npz"
    pool, v, embedding = embedded(records, cache, args.embedder, args.device)
    if args.embed_only:
        return

    load_at_compare = os.getloadavg()
    with PeakRSS() as mem:
        cpu0, start = time.process_time(), time.perf_counter()
        found = dedup.compare(pool, v, block_rows=args.block_rows)
        compare_s, compare_cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    dropped = sum(d["duplicate"] for d in found)
    print(f"compared {len(pool):,} riddles in {compare_s:.1f} s ({compare_cpu_s:.0f} s CPU), peak +"
          f"{mem.over_base / 2**30:.2f} GiB: {dropped:,} dropped", flush=True)

    rows = planted_results(pairs, found, pool, v)
    planted = {}
    for source in ("labelled", "generated", "all"):
        rs = [r for r in rows if source in ("all", r["source"])]
        rew = [r for r in rs if r["label"] == "rewording"]
        look = [r for r in rs if r["label"] == "look-alike"]
        planted[source] = {
            "rewordings": len(rew), "rewordings_caught": sum(r["dropped"] for r in rew),
            "rewordings_caught_as_dup_of_partner": sum(r["of_a"] for r in rew),
            "rewordings_merged_alone": sum(r["alone_merged"] for r in rew),
            "look_alikes": len(look), "look_alikes_merged_with_partner": sum(r["of_a"] for r in look),
            "look_alikes_dropped_for_another": sum(r["dropped"] and not r["of_a"] for r in look),
            "look_alikes_merged_alone": sum(r["alone_merged"] for r in look)}
    missed = [r for r in rows if r["label"] == "rewording" and not r["dropped"]]
    merged = [r for r in rows if r["label"] == "look-alike" and r["dropped"]]
    for r in missed + merged:
        print(f"  {'missed' if r in missed else 'dropped'} {r['source']} {r['kind']} #{r['a']}/#{r['b']}: of "
              f"#{r['of']}, alone merged {r['alone_merged']}, trick {r['trick']}, answers {r['answers']}: "
              f"{pool[r['b']]['riddle'][:70]!r} / #{r['of']}: {pool[r['of']]['riddle'][:70]!r}")

    sample = {"n": 0}
    if args.sample:
        rng = random.Random(args.seed + 1)
        chosen = {k for r in rows[:args.sample // 20] for k in (r["a"], r["b"])}  # some planted pairs in the sample
        rest = [k for k in range(len(pool)) if k not in chosen]
        indices = np.array(sorted(chosen | set(rng.sample(rest, max(0, min(args.sample, len(pool)) - len(chosen))))))
        sample = sample_check(pool, v, indices, args.block_rows)

    result = {
        "what": "stage 03's dedup (pipeline.dedup.compare) on generated answered riddles with planted pairs",
        "date": datetime.date.today().isoformat(), "n": len(pool), "seed": args.seed, "block_rows": args.block_rows,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_allowed": len(os.sched_getaffinity(0)),
                    "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                    "load_avg_at_start": [round(x, 2) for x in load_before],
                    "load_avg_at_compare": [round(x, 2) for x in load_at_compare],
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "numpy": np.__version__, "python": platform.python_version()},
        "embedding_s": round(embedding["s"], 1), "embedding_device": embedding["device"],
        "embedding_from_cache": embedding["from_cache"], "embedding_now": embedding["embedded_now"],
        "embedding_now_s": round(embedding["s_now"], 1),
        "compare_s": round(compare_s, 1), "compare_cpu_s": round(compare_cpu_s, 1),
        "compare_peak_rss_over_start_gib": round(mem.over_base / 2**30, 3),
        "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "vectors_gib": round(sum(v[k].nbytes for k in ("question", "trick", "answer")) / 2**30, 3),
        "dropped": dropped, "kept": len(pool) - dropped,
        "kept_because": {},
        "planted": planted, "planted_missed_or_dropped": [r for r in rows if r in missed or r in merged],
        "sample": sample,
    }
    for d in found:
        if not d["duplicate"]:
            key = d["kept_because"].split(":")[0]
            result["kept_because"][key] = result["kept_because"].get(key, 0) + 1
    out = (Path(args.out).resolve() if args.out else
           ROOT / "bench" / "runs" / result["date"] / f"dedup_{len(pool) // 1000}k_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    a = planted["all"]
    print(f"dedup {len(pool):,}: compare {compare_s:.1f} s, peak +{mem.over_base / 2**30:.2f} GiB, embedding "
          f"{embedding['s']:.0f} s on {embedding['device']}; planted rewordings caught {a['rewordings_caught']}/"
          f"{a['rewordings']} (alone {a['rewordings_merged_alone']}), look-alikes merged "
          f"{a['look_alikes_merged_with_partner']}/{a['look_alikes']}; "
          + (f"sample {sample['n']:,}: {sample['reference_differences']} differences from the reference, "
             f"{sample['reference_float32_differences']} from the float32 pass; " if sample["n"] else "")
          + f"load {load_at_compare[0]:.1f}; {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
