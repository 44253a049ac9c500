"""Stage 03: the generator writes the user's next message, a curious child's short question.

First, riddles that reword a seed or an earlier riddle are rejected (pipeline/dedup.py: close "trick"
embeddings with the answer hidden, the same short answer, no swapped words); this is the
first stage with answers to compare. Then the generator is shown the exchange so far and
asked for the child's next message. Its reply is cleaned (role prefixes like "Kid:", "A
curious child might ask ...", markdown, quotes; only the text up to the first question mark
is kept) and rejected, with the reason, when it is not a short question to the assistant.

Reads:  data/02_answers.jsonl    {"id", "messages": [user riddle, assistant answer]}
Writes: data/03_followups.jsonl  {"id", "messages": [..., user follow-up question]}
        data/03_rejected.jsonl   {"id", "reason", "text"}; reworded ones also "duplicate_of":
                                 {"id", "text"}, "scores": cosines, "answers": both short answers
        data/03_closest.jsonl    each kept riddle's closest seed or kept riddle, the cosines, and
                                 why it was kept (for the data card)

    python 03_followup_questions.py
    python 03_followup_questions.py --generator=smollm2 --max-new-tokens=32 --temperature=0.6   # CPU demo

Resume: finished batches are appended to both files; a rerun skips ids found in either.
The dedup reruns over all riddles (the same input, the same decisions) and writes only rejects
not yet written; once every riddle is done it is skipped. --overwrite starts over.
Runtime: ~1.3 min on one H100 for ~1.7k conversations, plus the dedup; the CPU demo ~0.7 min on 2 cores.
"""

from common import generate_all, load_backend
from pipeline.dedup import drop_duplicates, load_embedder, seed_item
from pipeline.knobs import check_template, configure
from pipeline.message_stage import MessageStage
from pipeline.records import (check_output, check_paths, check_unique_ids, path, read_conversations, require_stage,
                              write_jsonl_atomic)
from pipeline.riddles import clean_followup, load_seed_rows

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id, local folder, or the offline alias smollm2
BACKEND = "hf"  # hf (local transformers), hf-fp8 (the same in float8: faster on an H100, other samples) or openai (any OpenAI-compatible server)
BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
PROMPT = "A curious 10-year-old asked a riddle and got this answer.\n\n{conversation}\n\nWhat very short question would the child ask next, about the answer? Write only that question, ending with a question mark."  # {conversation}
BATCH_SIZE = 512  # conversations written at a time (openai: requests at once; a GPU streams all through 512 slots)
MAX_NEW_TOKENS = 64  # tokens per follow-up: a very short question
TEMPERATURE = 0.9  # 0 = greedy
TOP_P = 0.95  # nucleus sampling, 1.0 = off
SEED = 0  # sampling: same seed, same questions
MAX_WORDS = 25  # longer questions are rejected
DEDUP = True  # reject riddles that reword a seed or an earlier riddle (pipeline/dedup.py)
DEDUP_MODEL = "all-minilm-l6-v2"  # sentence embedder: this bundled alias, a local folder or a hub id
DEDUP_TRICK_MIN = 0.55  # trick cosine from which two riddles may be rewordings (README: Rewording dedup)
DEDUP_ANSWER_MIN = 0.7  # answer cosine from which short answers without shared words match
SEED_FILE = "data/seed_riddles.jsonl"  # stage 01's seeds; those with an "answer" are compared
IN_FILE = "data/02_answers.jsonl"  # stage 02's output
OUT_FILE = "data/03_followups.jsonl"  # input of stage 04
REJECTED_FILE = "data/03_rejected.jsonl"  # rejected riddles and follow-ups with their reason
CLOSEST_FILE = "data/03_closest.jsonl"  # each kept riddle's closest one, rewritten by each dedup
OVERWRITE = False  # start over instead of resuming
# -----------------------------------------------------------------------------
configure(globals())
check_template("prompt", PROMPT, "conversation")
check_paths({"in-file": path(IN_FILE), "seed-file": path(SEED_FILE)},
            {"out-file": path(OUT_FILE), "rejected-file": path(REJECTED_FILE),
             "closest-file": path(CLOSEST_FILE)})

# %% Answered riddles from stage 02
require_stage(path(IN_FILE), "02_answer_riddles.py")
records = read_conversations(path(IN_FILE), roles_end="assistant")
check_unique_ids(records, path(IN_FILE))
print(f"{len(records):,} conversations from {IN_FILE}")
stage = MessageStage(records, "user", lambda text, ended: clean_followup(text, MAX_WORDS), path(OUT_FILE),
                     path(REJECTED_FILE), OVERWRITE)
check_output(path(CLOSEST_FILE))

# %% Reworded duplicates: compared with the seeds and the riddles kept before them, in input order
kept = records
if DEDUP and stage.skipped < len(records):
    seeds = [seed_item(r) for r in load_seed_rows(SEED_FILE) if r.get("answer")]
    kept, reworded, closest = drop_duplicates(load_embedder(DEDUP_MODEL), records, seeds, trick_min=DEDUP_TRICK_MIN,
                                              answer_min=DEDUP_ANSWER_MIN)
    stage.reject(reworded)
    write_jsonl_atomic(path(CLOSEST_FILE), closest)
    on_seed = sum(r["reason"] == "reworded_seed" for r in reworded)
    print(f"dedup: {len(reworded):,} of {len(records):,} riddles reworded ({on_seed:,} a seed, "
          f"{len(reworded) - on_seed:,} an earlier riddle; {len(seeds):,} seeds with answers compared)")

# %% Conversations -> one prompt each showing the exchange as a transcript
speaker = {"user": "Child", "assistant": "Assistant", "system": "System"}
jobs = []
for r in kept:
    transcript = "\n\n".join(f"{speaker[m['role']]}: {m['content']}" for m in r["messages"])
    jobs.append({"id": r["id"], "prompt": [{"role": "user", "content": PROMPT.format(conversation=transcript)}]})

# %% Ask for the missing follow-ups, appending each finished batch
todo = sum(j["id"] not in stage.done for j in jobs)
if todo:
    print(f"{stage.skipped:,} already asked or rejected; asking {todo:,} with {GENERATOR}")
    backend = load_backend(BACKEND, GENERATOR, BASE_URL, API_KEY)
    generate_all(backend, jobs, stage.done, stage.save, batch_size=BATCH_SIZE, seed=SEED,
                 max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, desc="03 follow-ups")
stage.finish("03", "follow-ups")
