"""Stage 04: the generator answers the follow-up question: two-turn conversations, done.

The prompt is the conversation itself, [riddle, answer, follow-up], rendered with the
generator's own chat template. Empty answers and answers cut off by MAX_NEW_TOKENS are
rejected with their reason.

Reads:  data/03_followups.jsonl      {"id", "messages": [user, assistant, user]}
Writes: data/04_conversations.jsonl  {"id", "messages": [user, assistant, user, assistant]}
        data/04_rejected.jsonl       {"id", "reason", "text"}
        data/report.md, report_*.png the data card (pipeline/datacard.py): records kept and rejected per stage
                                     and reason, turn lengths, reworded duplicates, random samples

    python 04_followup_answers.py
    python 04_followup_answers.py --generator=smollm2 --max-new-tokens=128   # CPU demo

Load the result with datasets.load_dataset("json", data_files="data/04_conversations.jsonl").
Resume: finished batches are appended to both files; a rerun skips ids found in either.
The data card is rewritten from the stage files at the end of each run that finishes.
--overwrite starts over.
Runtime: ~1.6 min on one H100 for ~1.7k conversations; the CPU demo above ~0.4 min on 2 cores.
"""

from common import generate_all, load_backend
from pipeline.datacard import generator_tokenizer, write_card
from pipeline.hub import check_repo_id, push_dataset
from pipeline.knobs import configure
from pipeline.message_stage import MessageStage
from pipeline.records import check_paths, check_unique_ids, path, read_conversations, read_jsonl, require_stage
from pipeline.riddles import clean_answer

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id, local folder, or the offline alias smollm2
BACKEND = "hf"  # hf (local transformers), hf-fp8 (the same in float8: faster on an H100, other samples) or openai (any OpenAI-compatible server)
BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
BATCH_SIZE = 512  # conversations written at a time (openai: requests at once; a GPU streams all through 512 slots)
MAX_NEW_TOKENS = 512  # tokens per answer; answers cut off here are rejected
TEMPERATURE = 0.7  # 0 = greedy
TOP_P = 0.95  # nucleus sampling, 1.0 = off
SEED = 0  # sampling: same seed, same answers
IN_FILE = "data/03_followups.jsonl"  # stage 03's output
OUT_FILE = "data/04_conversations.jsonl"  # the final dataset
REJECTED_FILE = "data/04_rejected.jsonl"  # rejected answers with their reason
DATA_CARD = True  # write report.md + report_*.png beside OUT_FILE from the stage files there (pipeline/datacard.py)
SEED_FILE = "data/seed_riddles.jsonl"  # stage 01's seeds, named in the card of a pushed dataset
PUSH_TO_HUB = ""  # hub dataset repo (user/name) to upload the conversations and data card to; needs a token
PRIVATE = False  # make the pushed repository private
OVERWRITE = False  # start over instead of resuming
# -----------------------------------------------------------------------------
configure(globals())
check_paths({"in-file": path(IN_FILE)},
            {"out-file": path(OUT_FILE), "rejected-file": path(REJECTED_FILE)})
if PUSH_TO_HUB:
    check_repo_id(PUSH_TO_HUB)

# %% The conversation so far is the prompt, as the generator's chat template renders it
require_stage(path(IN_FILE), "03_followup_questions.py")
records = read_conversations(path(IN_FILE), roles_end="user")
check_unique_ids(records, path(IN_FILE))
jobs = [{"id": r["id"], "prompt": r["messages"]} for r in records]
print(f"{len(records):,} conversations from {IN_FILE}")

# %% Answer the missing ones, appending each finished batch
stage = MessageStage(records, "assistant", clean_answer, path(OUT_FILE), path(REJECTED_FILE), OVERWRITE)
backend = None
if stage.skipped < len(records):
    print(f"{stage.skipped:,} already answered or rejected; answering {len(records) - stage.skipped:,} with {GENERATOR}")
    backend = load_backend(BACKEND, GENERATOR, BASE_URL, API_KEY)
    generate_all(backend, jobs, stage.done, stage.save, batch_size=BATCH_SIZE, seed=SEED,
                 max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, desc="04 answers")
stage.finish("04", "conversations")

# %% The data card: lengths in the generator's tokens when its tokenizer is at hand, else in words
if DATA_CARD:
    tokenizer = generator_tokenizer(backend, BACKEND, GENERATOR)
    card = write_card(path(OUT_FILE).parent, tokenizer=tokenizer, tokenizer_name=GENERATOR)
    print(f"data card: {card} (lengths in {'tokens' if tokenizer is not None else 'words'})")

# %% Share: the conversations and their card as a Hub dataset, in one commit
if PUSH_TO_HUB:
    url = push_dataset(PUSH_TO_HUB, {"train": read_jsonl(path(OUT_FILE))}, path(OUT_FILE).parent,
                       private=PRIVATE, generator=GENERATOR, seed_file=SEED_FILE)
    print(f"pushed {OUT_FILE} and its card to {url}")
