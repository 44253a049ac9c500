"""Stage 01: expand the seed riddles into new ones with an instruct model.

Each of NUM_PROMPTS prompts shows the generator K seed riddles (picked by an RNG seeded
from the prompt number) and asks for K new ones. The replies are split into lines and
cleaned (numbering, bullets, "Riddle 3:" labels, markdown, quotes, headers, answers);
exact and near duplicates are dropped, among the new riddles and against the seeds. The
last line of a reply that MAX_NEW_TOKENS cut is rejected as unfinished.

Reads:  SEED_FILE: .jsonl/.json/.csv with a riddle field (instruction, riddle, question
        or text), .txt with one riddle per line, or a hub dataset name
Writes: data/01_raw.jsonl       {"id": "p00012", "seed_ids": [...], "text": reply, "ended": false if cut}
        data/01_riddles.jsonl   {"id": "r-...", "messages": [{"role": "user", "content": riddle}]}
        data/01_rejected.jsonl  {"line", "prompt_id", "reason"}

    python 01_generate_riddles.py
    python 01_generate_riddles.py --generator=smollm2 --num-prompts=12 --k=5 --max-new-tokens=160   # CPU demo

Resume: replies are appended to 01_raw.jsonl batch by batch; a rerun skips the prompts
already there, then cleans and dedups all replies again (seconds). --overwrite starts over.
Runtime: ~0.5 min on one H100 for the recipe's 300 prompts; the CPU demo above ~1.5 min on 2 cores.
"""

import random
import time
from collections import Counter

from common import generate_all, load_backend
from pipeline.knobs import InputError, check_template, configure
from pipeline.records import Appender, check_output, check_paths, path, read_jsonl, seed_of, write_jsonl_atomic
from pipeline.riddles import filter_riddles, load_seed_riddles, riddle_id

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id, local folder, or the offline alias smollm2
BACKEND = "hf"  # hf (local transformers), hf-fp8 (the same in float8: faster on an H100, other samples) or openai (any OpenAI-compatible server)
BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
SEED_FILE = "data/seed_riddles.jsonl"  # local .jsonl/.json/.csv/.txt, or a hub dataset name
NUM_PROMPTS = 300  # prompts, each asking for K riddles
K = 10  # seed riddles shown per prompt, and new riddles asked for
PROMPT = "Here are {k} riddles:\n\n{examples}\n\nWrite {k} new riddles like these, but different from them. One riddle per line, no numbering, no answers, nothing else."  # {k}, {examples}
BATCH_SIZE = 512  # prompts written at a time (openai: requests at once; a GPU streams all through 512 slots)
MAX_NEW_TOKENS = 512  # tokens per reply
TEMPERATURE = 0.9  # 0 = greedy
TOP_P = 0.95  # nucleus sampling, 1.0 = off
SEED = 0  # seed choice and sampling: same seed, same riddles
MIN_WORDS = 5  # shorter lines are not riddles
MAX_CHARS = 300  # longer lines are not riddles
NEAR_DUP = 0.5  # word-bigram Jaccard from which a riddle is a near-duplicate, in (0, 1]
RAW_FILE = "data/01_raw.jsonl"  # replies as generated: the resume point
OUT_FILE = "data/01_riddles.jsonl"  # kept riddles, input of stage 02
REJECTED_FILE = "data/01_rejected.jsonl"  # every dropped line with its reason
OVERWRITE = False  # start over instead of resuming
# -----------------------------------------------------------------------------
configure(globals())
check_template("prompt", PROMPT, "k", "examples")
check_paths({"seed-file": path(SEED_FILE)},
            {"raw-file": path(RAW_FILE), "out-file": path(OUT_FILE), "rejected-file": path(REJECTED_FILE)})
t0 = time.time()

# %% Seeds and prompts: prompt p00012 shows the same seeds whatever NUM_PROMPTS is
seeds = load_seed_riddles(SEED_FILE)
print(f"{len(seeds):,} seed riddles from {SEED_FILE}")
if not 1 <= K <= len(seeds) or NUM_PROMPTS < 1:
    raise InputError(f"--k must be in 1..{len(seeds)} (the seed count) and --num-prompts at least 1")
seed_ids = [riddle_id(s) for s in seeds]
jobs = []
for n in range(NUM_PROMPTS):
    pid = f"p{n:05d}"
    picks = random.Random(seed_of(pid, SEED)).sample(range(len(seeds)), K)
    examples = "\n".join(seeds[i] for i in picks)
    jobs.append({"id": pid, "seed_ids": [seed_ids[i] for i in picks],
                 "prompt": [{"role": "user", "content": PROMPT.format(k=K, examples=examples)}]})

# %% Generate the missing replies, appending each finished batch
for out_file in (OUT_FILE, REJECTED_FILE):  # written at the end: checked now, before minutes of generation
    check_output(path(out_file))
raw = Appender(path(RAW_FILE), overwrite=OVERWRITE)
if raw.done:
    planned = {j["id"]: j["seed_ids"] for j in jobs}
    for rec in read_jsonl(raw.file):
        if rec["id"] in planned and rec.get("seed_ids") != planned[rec["id"]]:
            raise InputError(f"{raw.file}: prompt {rec['id']} was made from other seeds (another SEED, K "
                             f"or SEED_FILE); rerun with --overwrite")
skipped = sum(j["id"] in raw.done for j in jobs)
failed = Counter()


def save(batch, replies):
    failed["prompts"] += sum(r is None for r in replies)
    raw.write([{"id": j["id"], "seed_ids": j["seed_ids"], "text": r.text, "ended": r.ended}
               for j, r in zip(batch, replies) if r is not None])


generated = 0
if skipped < len(jobs):
    print(f"{skipped:,} of {len(jobs):,} prompts already in {RAW_FILE}; generating the rest with {GENERATOR}")
    backend = load_backend(BACKEND, GENERATOR, BASE_URL, API_KEY)
    generated = generate_all(backend, jobs, raw.done, save, batch_size=BATCH_SIZE, seed=SEED,
                             max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                             desc="01 riddles") - failed["prompts"]
raw.close()
if failed["prompts"]:
    raise SystemExit(f"{failed['prompts']:,} prompts failed (see above); rerun to retry them")

# %% Clean and dedup all replies, in prompt order, then write both files whole
by_id = {r["id"]: r for r in read_jsonl(raw.file, need=("id", "text"))}
replies = [by_id[j["id"]] for j in jobs]
kept, rejected = filter_riddles(replies, seeds, MIN_WORDS, MAX_CHARS, NEAR_DUP)
write_jsonl_atomic(path(OUT_FILE), kept)
write_jsonl_atomic(path(REJECTED_FILE), rejected)
lines = len(kept) + len(rejected)
print(f"{lines:,} candidate lines from {len(replies):,} replies; rejected by reason:")
for reason, n in Counter(r["reason"] for r in rejected).most_common():
    print(f"  {reason:<16} {n:>6,}")
print(f"01: kept {len(kept):,} riddles ({len(rejected):,} lines rejected) -> {OUT_FILE}; prompts: "
      f"{generated:,} generated, {skipped:,} skipped as existing, 0 failed; {time.time() - t0:.0f}s")
