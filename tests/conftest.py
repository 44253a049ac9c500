"""Fixtures shared by the tests: a tokenizer trained here and tiny random models.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few sentences,
the models are built from configs with random weights and saved to a temp folder.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = [
    "What has keys but cannot open locks? A piano has keys.",
    "I weigh 1.5 kg and I speak without a mouth. What am I? An echo.",
    "The more you take, the more you leave behind. Footsteps!",
    "Why does the moon shine? Because it reflects the light of the sun.",
    "Can you tell me a riddle about time, water, fire and the wind?",
    "A curious child might ask: how many legs does a spider have? Eight.",
] * 20


def make_tokenizer():
    """A byte-level BPE (GPT-2 style) with ChatML specials, like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)


CHAT_TEMPLATE_GEN = (  # a generator's own template, as an instruct model ships it
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_model_folder(folder, arch="llama", seed=0):
    """Save a tiny random causal LM (llama or phi) with the test tokenizer; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig

    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE_GEN
    common = dict(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None)
    if arch == "llama":
        config = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    else:
        config = PhiConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


CONVS = [  # a few conversations in our record shape, for the training tests
    [{"role": "user", "content": "What has keys but cannot open locks?"},
     {"role": "assistant", "content": "A piano has keys."}],
    [{"role": "user", "content": "The more you take, the more you leave behind."},
     {"role": "assistant", "content": "Footsteps!"},
     {"role": "user", "content": "Why does the moon shine?"},
     {"role": "assistant", "content": "Because it reflects the light of the sun."}],
    [{"role": "user", "content": "Can you tell me a riddle about time, water, fire and the wind?"},
     {"role": "assistant", "content": "I weigh 1.5 kg and I speak without a mouth. What am I? An echo."}],
]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine two threads spin-wait (up to 30x slower)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny_phi"), "phi")
