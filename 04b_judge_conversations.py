"""Stage 04b (optional): the generator judges each finished conversation; low scores are dropped.

For each conversation the generator scores three points from 1 to 5 (is the answer right and
simple, is the follow-up a child's question, is the second answer on topic) and gives a reason,
in a fixed format (PROMPT) that judge.parse_judgement reads. The conversation's score is the
lowest of the three (a conversation is as good as its worst part). Records scoring MIN_SCORE or
more are kept with the judgement; the others, and replies that cannot be read, are rejected.

Reads:  data/04_conversations.jsonl  {"id", "messages": [user, assistant, user, assistant]}
Writes: data/04b_judged.jsonl        the record unchanged plus "judge": {"scores": {"answer",
                                     "follow_up", "second_answer"}, "score": the lowest, "reason"}
        data/04b_rejected.jsonl      {"id", "reason": "low_score", "score", "scores", "judge_reason", "text"}
                                     or {"id", "reason": "unparsed", "text"} (text: the judge's reply)
        data/report.md, report_*.png the data card (pipeline/datacard.py) again, now with the judge's scores

    python 04b_judge_conversations.py
    python 04b_judge_conversations.py --min-score=4   # stricter
    python 05_finetune_phi2.py --data=data/04b_judged.jsonl

Resume: finished batches are appended to both files; a rerun skips ids found in either (also
unparsed ones: --overwrite judges them again). A request that failed (openai backend) is written
nowhere, so a rerun retries it. A new MIN_SCORE applies only to records judged after it: rerun
with --overwrite to apply it to all.
Runtime: not measured; about a third of stage 04's (the judge's reply is ~40 tokens).
"""

from common import generate_all, load_backend
from pipeline.datacard import generator_tokenizer, write_card
from pipeline.hub import check_repo_id, push_dataset
from pipeline.judge import JudgeStage
from pipeline.knobs import InputError, check_template, configure
from pipeline.records import (check_paths, check_unique_ids, nonblank_line_numbers, path, read_conversations,
                              read_jsonl, require_stage)

# -----------------------------------------------------------------------------
GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id, local folder, or the offline alias smollm2
BACKEND = "hf"  # hf (local transformers), hf-fp8 (the same in float8: faster on an H100, other samples) or openai (any OpenAI-compatible server)
BASE_URL = ""  # openai backend: e.g. http://localhost:8000/v1; several, comma-separated, share the requests
API_KEY = ""  # openai backend; empty: $OPENAI_API_KEY
PROMPT = "A curious 10-year-old asked an assistant a riddle, then a follow-up question. Judge the conversation.\n\nRiddle: {riddle}\n\nAssistant: {answer}\n\nChild: {followup}\n\nAssistant: {second_answer}\n\nScore each point from 1 (bad) to 5 (good):\n- answer: is the answer to the riddle right, and explained simply enough for a child?\n- follow-up: is the follow-up a short question a child would ask about the answer?\n- second answer: does the second answer reply to the follow-up, on topic and simply?\n\nReply with exactly these four lines and nothing else:\nanswer: N\nfollow-up: N\nsecond answer: N\nreason: one short sentence"  # {riddle} {answer} {followup} {second_answer}
BATCH_SIZE = 512  # conversations written at a time (openai: requests at once; a GPU streams all through 512 slots)
MAX_NEW_TOKENS = 96  # tokens per judgement: three scores and a one-sentence reason
TEMPERATURE = 0.0  # 0 = greedy: a judgement should not depend on a draw
TOP_P = 1.0  # nucleus sampling, 1.0 = off
SEED = 0  # sampling (when TEMPERATURE > 0): same seed, same judgements
MIN_SCORE = 3  # 1-5: conversations whose lowest score is below this are rejected as low_score
IN_FILE = "data/04_conversations.jsonl"  # stage 04's output
OUT_FILE = "data/04b_judged.jsonl"  # kept conversations with their judgement; 05 takes it with --data=
REJECTED_FILE = "data/04b_rejected.jsonl"  # low scores and unreadable judgements, with the judge's reply
DATA_CARD = True  # rewrite report.md + report_*.png beside OUT_FILE from the stage files there (pipeline/datacard.py)
SEED_FILE = "data/seed_riddles.jsonl"  # stage 01's seeds, named in the card of a pushed dataset
PUSH_TO_HUB = ""  # hub dataset repo (user/name) to upload the conversations and data card to; needs a token
PRIVATE = False  # make the pushed repository private
OVERWRITE = False  # start over instead of resuming
# -----------------------------------------------------------------------------
configure(globals())
check_template("prompt", PROMPT, "riddle", "answer", "followup", "second_answer")
check_paths({"in-file": path(IN_FILE)},
            {"out-file": path(OUT_FILE), "rejected-file": path(REJECTED_FILE)})
if PUSH_TO_HUB:
    check_repo_id(PUSH_TO_HUB)

# %% Conversations -> one prompt each; the records are written back unchanged (any extra fields kept)
require_stage(path(IN_FILE), "04_followup_answers.py")
checked = read_conversations(path(IN_FILE), roles_end="assistant")
check_unique_ids(checked, path(IN_FILE))
records, jobs = [], []
for raw, rec, line in zip(read_jsonl(path(IN_FILE)), checked, nonblank_line_numbers(path(IN_FILE))):
    turns = [m["content"] for m in rec["messages"] if m["role"] != "system"]
    if [m["role"] for m in rec["messages"] if m["role"] != "system"] != ["user", "assistant"] * 2:
        raise InputError(f"{path(IN_FILE)}:{line}: expected a two-turn conversation (user, assistant, user, "
                         f"assistant), got {len(turns)} messages")
    records.append(dict(raw, id=rec["id"]))
    prompt = PROMPT.format(riddle=turns[0], answer=turns[1], followup=turns[2], second_answer=turns[3])
    jobs.append({"id": rec["id"], "prompt": [{"role": "user", "content": prompt}]})
print(f"{len(records):,} conversations from {IN_FILE}")

# %% Judge the missing ones, appending each finished batch
stage = JudgeStage(records, MIN_SCORE, path(OUT_FILE), path(REJECTED_FILE), OVERWRITE)
backend = None
if stage.skipped < len(records):
    print(f"{stage.skipped:,} already judged; judging {len(records) - stage.skipped:,} with {GENERATOR}")
    backend = load_backend(BACKEND, GENERATOR, BASE_URL, API_KEY)
    generate_all(backend, jobs, stage.done, stage.save, batch_size=BATCH_SIZE, seed=SEED,
                 max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, desc="04b judge")
stage.finish("04b")

# %% The data card, with the judge's scores
if DATA_CARD:
    tokenizer = generator_tokenizer(backend, BACKEND, GENERATOR)
    card = write_card(path(OUT_FILE).parent, tokenizer=tokenizer, tokenizer_name=GENERATOR)
    print(f"data card: {card} (lengths in {'tokens' if tokenizer is not None else 'words'})")

# %% Share: the conversations and their card as a Hub dataset, in one commit
if PUSH_TO_HUB:
    url = push_dataset(PUSH_TO_HUB, {"train": read_jsonl(path(OUT_FILE))}, path(OUT_FILE).parent,
                       private=PRIVATE, generator=GENERATOR, seed_file=SEED_FILE)
    print(f"pushed {OUT_FILE} and its card to {url}")
