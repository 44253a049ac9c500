"""pipeline/knobs.py: `--name=value` overrides and --help, the ranges of every stage's numeric knobs
(KNOB_RANGES), prompt templates, secrets never printed; a bad value is one line and exit code 2.
"""

import os
import re
import subprocess
import sys

import pytest

from helpers import (GOOD, ROOT, fake_adapter, jsonl, refused, run_script, script_knobs, snapshot, stage_args,
                     stage_outcome, user_only)
from pipeline.knobs import InputError, KNOB_RANGES, configure


PY = sys.executable


def test_configure_types_unknown_bool_and_help(tmp_path, capsys):
    script = tmp_path / "stage.py"
    script.write_text('N = 3  # rows\nLR = 0.1  # learning rate\nNAME = "x"  # a name\nFLAG = False  # on/off\n'
                      'ITEMS = ["a"]\n')
    knobs = {"__file__": str(script), "__doc__": "A stage.", "N": 3, "LR": 0.1, "NAME": "x", "FLAG": False,
             "ITEMS": ["a"], "lower": 1, "IMPORTED": ("a", "b")}  # IMPORTED: not assigned in the script
    configure(knobs, ["--n=5", "--lr", "0.5", "--name=y", "--flag", "--items=a,b"])
    assert (knobs["N"], knobs["LR"], knobs["NAME"], knobs["FLAG"], knobs["ITEMS"]) == (5, 0.5, "y", True, ["a", "b"])
    assert "override: N = 5" in capsys.readouterr().out
    configure(knobs, ["--flag=false"])
    assert knobs["FLAG"] is False
    capsys.readouterr()
    for argv, message in [(["--nope=1"], "unknown knob --nope"), (["--lower=2"], "unknown knob --lower"),
                          (["--imported=c"], "unknown knob --imported"),
                          (["--n=abc"], "--n wants an int, got 'abc'"), (["--flag=maybe"], "--flag wants true or false"),
                          (["--lr=fast"], "--lr wants a float"), (["n=3"], "unexpected argument 'n=3'"),
                          (["--name"], "--name needs a value")]:
        with pytest.raises(InputError, match=message):
            configure(dict(knobs), argv)
    with pytest.raises(SystemExit) as exit_:
        configure(dict(knobs), ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("A stage.")
    assert any(line.split() == ["--lr", "0.1", "learning", "rate"] for line in out.splitlines())
    assert "--items" in out and "--imported" not in out


def test_script_help_and_exit_code_2(tmp_path, monkeypatch, capsys):
    """Real scripts: --help lists the knobs; bad input is one stderr line and exit code 2 (one real process; the
    other cases in this process, where the exit code is the InputError's)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = stage_outcome(monkeypatch, capsys, "02_answer_riddles.py", "--help")
    assert r.returncode == 0
    assert "--max-new-tokens" in r.stdout and "answers cut off here are rejected" in r.stdout
    bad = tmp_path / "01.jsonl"
    bad.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "b", "mess\n')
    out = tmp_path / "02.jsonl"
    out.write_text("keep me\n")
    r = subprocess.run([PY, str(ROOT / "02_answer_riddles.py"), f"--in-file={bad}", f"--out-file={out}",
                        f"--rejected-file={tmp_path / 'rej.jsonl'}", "--overwrite"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(f"error: {bad}:2: invalid JSON (")
    assert out.read_text() == "keep me\n" and not (tmp_path / "rej.jsonl").exists()
    r = stage_outcome(monkeypatch, capsys, "01_generate_riddles.py", "--num-prompts=ten")
    assert (r.returncode, r.stderr.strip()) == (2, "error: --num-prompts wants an int, got 'ten'")
    r = stage_outcome(monkeypatch, capsys, "01_generate_riddles.py", "--seed-file=nobody/no-such-riddles")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: cannot load seed dataset 'nobody/no-such-riddles' from the hub (")
    assert r.stderr.strip().endswith("offline, pass a local .jsonl/.json/.csv/.txt file")


STAGES = sorted(p.name for p in ROOT.glob("0[1-7]*_*.py"))


@pytest.mark.parametrize("script", STAGES)
def test_every_numeric_knob_has_a_range(script):
    knobs = script_knobs(script)
    numeric = [k for k, v in knobs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert numeric and [k for k in numeric if k not in KNOB_RANGES] == []
    configure(knobs, [])  # and the defaults lie in them


@pytest.mark.parametrize("script, arg, message", [
    ("02_answer_riddles.py", "--batch-size=0", "--batch-size must be in [1, inf), got 0"),
    ("02_answer_riddles.py", "--max-new-tokens=-5", "--max-new-tokens must be in [1, inf), got -5"),
    ("02_answer_riddles.py", "--top-p=0", "--top-p must be in (0, 1], got 0.0"),
    ("02_answer_riddles.py", "--temperature=nan", "--temperature must be in [0, inf), got nan"),
    ("01_generate_riddles.py", "--near-dup=1.5", "--near-dup must be in (0, 1], got 1.5"),
    ("01_generate_riddles.py", "--num-prompts=0", "--num-prompts must be in [1, inf), got 0"),
    ("03_followup_questions.py", "--max-words=0", "--max-words must be in [1, inf), got 0"),
    ("05_finetune_phi2.py", "--lr=inf", "--lr must be in (0, inf), got inf"),
    ("05_finetune_phi2.py", "--lora-dropout=1", "--lora-dropout must be in [0, 1), got 1.0"),
    ("05_finetune_phi2.py", "--eval-fraction=1", "--eval-fraction must be in [0, 1), got 1.0"),
    ("05_finetune_phi2.py", "--gradient-checkpointing=2", "--gradient-checkpointing must be in [0, 1], got 2.0"),
    ("05_finetune_phi2.py", "--seed=-1", "--seed must be in [0, 4294967295], got -1"),
    ("06_merge_and_chat.py", "--merge-tolerance=0", "--merge-tolerance must be in (0, inf), got 0.0"),
    ("07_evaluate.py", "--n-choices=1", "--n-choices must be in [2, inf), got 1"),
])
def test_out_of_range_knobs_are_one_line(script, arg, message):
    with pytest.raises(InputError, match=re.escape(message)):
        configure(script_knobs(script), [arg])


def test_out_of_range_knob_exits_2_with_one_line():
    r = run_script("02_answer_riddles.py", "--batch-size=0")
    assert (r.returncode, r.stderr) == (2, "error: --batch-size must be in [1, inf), got 0\n")


@pytest.mark.parametrize("script, arg, message", [
    ("05_finetune_phi2.py", "--lora-targets=nope", "--lora-targets nope: Target modules {'nope'} not found"),
    ("05_finetune_phi2.py", "--attn=bogus", 'Specified `attn_implementation="bogus"` is not supported'),
    ("02_answer_riddles.py", "--backend=bogus", "unknown backend 'bogus': use hf, hf-fp8 or openai"),
])
def test_names_of_things_are_one_line(tiny_llama, tmp_path, monkeypatch, script, arg, message):
    """Found only once the model is loaded: 05 --overwrite still leaves its old folder as it was."""
    data = tmp_path / "in.jsonl"
    if script.startswith("05"):
        data.write_bytes(jsonl(GOOD, dict(GOOD, id="b")))
        fake_adapter(tmp_path)
        args = (f"--student={tiny_llama}", "--gradient-checkpointing=0", "--overwrite",
                *stage_args(script, data, tmp_path))
    else:
        data.write_bytes(jsonl(user_only(GOOD)))
        args = stage_args(script, data, tmp_path)
    before = snapshot(tmp_path)
    refused(monkeypatch, script, *args, arg, match=re.escape(message))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script, prompt, message", [
    ("02_answer_riddles.py", "Answer this: {ridle}", r"--prompt must use \{riddle\} and no other \{field\}"),
    ("02_answer_riddles.py", "Answer this riddle.", r"it uses none"),
    ("03_followup_questions.py", "Next question after {conversation", r"--prompt: expected '\}' before end"),
    ("01_generate_riddles.py", "{k} riddles: {examples} {extra}", r"it uses \{examples\}, \{extra\}, \{k\}"),
])
def test_prompt_templates_are_checked(tmp_path, monkeypatch, script, prompt, message):
    data = tmp_path / "in.jsonl"
    data.write_bytes(jsonl(GOOD))
    before = snapshot(tmp_path)
    refused(monkeypatch, script, *stage_args(script, data, tmp_path), f"--prompt={prompt}", match=message)
    assert snapshot(tmp_path) == before


def test_secrets_are_masked_by_name(capsys):
    knobs = {"API_KEY": "", "HF_TOKEN": "", "MAX_NEW_TOKENS": 5, "TOKENS_PER_BATCH": 8}
    configure(knobs, ["--api-key=sk-live-1234", "--hf-token", "hf_abcd", "--max-new-tokens=7",
                             "--tokens-per-batch=9"])
    out = capsys.readouterr().out
    assert knobs["API_KEY"] == "sk-live-1234" and knobs["HF_TOKEN"] == "hf_abcd"  # used, only not shown
    assert out.splitlines() == ["override: API_KEY = '***'", "override: HF_TOKEN = '***'",
                                "override: MAX_NEW_TOKENS = 7", "override: TOKENS_PER_BATCH = 9"]
