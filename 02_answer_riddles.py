"""Stage 02: the generator answers each riddle, step by step and simply.

The generator sees the riddle inside an instruction (PROMPT); the record keeps the bare
riddle as the user turn and appends the answer as the assistant turn. Empty answers and
answers cut off by MAX_NEW_TOKENS are rejected with their reason.

Reads:  data/01_riddles.jsonl   {"id", "messages": [user riddle]}
Writes: data/02_answers.jsonl   {"id", "messages": [user riddle, assistant answer]}
        data/02_rejected.jsonl  {"id", "reason", "text"}

    python 02_answer_riddles.py
    python 02_answer_riddles.py --generator=smollm2 --max-new-tokens=128   # CPU demo

Resume: finished batches are appended to both files; a rerun skips ids found in either.
A request that failed (openai backend) is written nowhere, so a rerun retries it.
--overwrite starts over.
Runtime: ~0.7 min on one H100 for ~1.7k riddles; the CPU demo above ~1.5 min on 2 cores.
"""

from common import generate_all, load_backend
from pipeline.knobs import check_template, configure
from pipeline.message_stage import MessageStage
from pipeline.records import check_paths, check_unique_ids, path, read_conversations, require_stage
from pipeline.riddles import clean_answer

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id, local folder, or the offline alias smollm2
BACKEND = "hf"  # hf (local transformers), hf-fp8 (the same in float8: faster on an H100, other samples) or openai (any OpenAI-compatible server)
BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
PROMPT = "Answer this riddle. Think step by step and explain simply. If information is missing, ask one short question at the end.\n\nRiddle: {riddle}"  # {riddle}
BATCH_SIZE = 512  # riddles written at a time (openai: requests at once; a GPU streams all through 512 slots)
MAX_NEW_TOKENS = 512  # tokens per answer; answers cut off here are rejected
TEMPERATURE = 0.7  # 0 = greedy
TOP_P = 0.95  # nucleus sampling, 1.0 = off
SEED = 0  # sampling: same seed, same answers
IN_FILE = "data/01_riddles.jsonl"  # stage 01's output
OUT_FILE = "data/02_answers.jsonl"  # input of stage 03
REJECTED_FILE = "data/02_rejected.jsonl"  # rejected answers with their reason
OVERWRITE = False  # start over instead of resuming
# -----------------------------------------------------------------------------
configure(globals())
check_template("prompt", PROMPT, "riddle")
check_paths({"in-file": path(IN_FILE)},
            {"out-file": path(OUT_FILE), "rejected-file": path(REJECTED_FILE)})

# %% Riddles -> prompts; the instruction wraps only what the generator sees
require_stage(path(IN_FILE), "01_generate_riddles.py")
records = read_conversations(path(IN_FILE), roles_end="user")
check_unique_ids(records, path(IN_FILE))
jobs = [{"id": r["id"], "prompt": r["messages"][:-1] + [
    {"role": "user", "content": PROMPT.format(riddle=r["messages"][-1]["content"])}]} for r in records]
print(f"{len(records):,} riddles from {IN_FILE}")

# %% Answer the missing ones, appending each finished batch
stage = MessageStage(records, "assistant", clean_answer, path(OUT_FILE), path(REJECTED_FILE), OVERWRITE)
if stage.skipped < len(records):
    print(f"{stage.skipped:,} already answered or rejected; answering {len(records) - stage.skipped:,} with {GENERATOR}")
    backend = load_backend(BACKEND, GENERATOR, BASE_URL, API_KEY)
    generate_all(backend, jobs, stage.done, stage.save, batch_size=BATCH_SIZE, seed=SEED,
                 max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, desc="02 answers")
stage.finish("02", "answers")
