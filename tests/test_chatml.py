"""ChatML: one template for training, the saved tokenizer and chat; the assistant-only mask.

Two tokenizers: the test BPE that already has the ChatML tokens (like SmolLM2), and a
Phi-2-like one that has only <|endoftext|> (eos, no pad), so setup_chat_tokenizer must add them.
"""

import pytest

from common import CHATML_TEMPLATE, IM_END, IM_START, render_chatml, setup_chat_tokenizer, tokenize_chat
from helpers import make_tokenizer, phi_like_tokenizer

CONVS = [
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
    for conv in CONVS:
        for gen in (False, True):
            assert render_chatml(conv, gen)[0] == chat_tok.apply_chat_template(conv, tokenize=False,
                                                                               add_generation_prompt=gen)
    text, spans = render_chatml(CONVS[0][:2])
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
    for conv in CONVS:
        ids = saved.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_chat(chat_tok, conv)["input_ids"] == ids
        prompt = saved.apply_chat_template(conv[:-1], tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
        assert ids[:len(prompt)] == prompt  # what chat feeds the model is a prefix of what training saw


def test_mask_token_by_token(chat_tok):
    conv = CONVS[0]
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
    for conv in CONVS:
        ref = chat_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ex = tokenize_chat(chat_tok, conv)
        assert ex["input_ids"] == ref["input_ids"]
        assert [int(label != -100) for label in ex["labels"]] == ref["assistant_masks"]
        assert sum(ref["assistant_masks"]) > 0


def test_header_knob_supervises_the_header(chat_tok):
    ex = tokenize_chat(chat_tok, CONVS[0], train_on_header=True)
    assert supervised_text(chat_tok, ex) == (
        "<|im_start|>assistant\nA piano has keys.<|im_end|>"
        "<|im_start|>assistant\nBecause it reflects the light of the sun.<|im_end|>")
    assert ex["input_ids"] == tokenize_chat(chat_tok, CONVS[0])["input_ids"]


def test_truncation_keeps_ids_and_labels_aligned(chat_tok):
    full = tokenize_chat(chat_tok, CONVS[1])
    for n in (1, 7, len(full["input_ids"]) - 3, len(full["input_ids"]) + 5):
        cut = tokenize_chat(chat_tok, CONVS[1], max_length=n)
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
