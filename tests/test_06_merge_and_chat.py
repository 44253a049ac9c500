"""Stage 06 (06_merge_and_chat.py) on an adapter stage 05 trained (conftest's trained): the merge is checked
and saved, chat stops at <|im_end|>, a wrong or empty merge is refused, a kill while swapping in a new merge,
a damaged adapter, pushing to the Hub. The stage runs in this process; run_06 hands back its exit and output.
"""

import io
import json
import sys
from pathlib import Path

import pytest

from common import CHATML_TEMPLATE, IM_END
from helpers import Killed, fake_adapter, folder_files, jsonl, refused, run_stage, server_error, snapshot
from pipeline.training import add_lora, load_student


@pytest.mark.parametrize("run, config, message", [
    (b"", None, "run.json:1: invalid JSON \\(Expecting value\\)"),
    (b'{"student": "x",', None, "run.json:1: invalid JSON"),
    (b'"just a string"', None, "run.json: expected a JSON object, got str"),
    (b'{"student": "caf\xe9"}', None, "run.json:1: not UTF-8 text \\(byte 0xe9\\)"),
    (jsonl({"student": "x", "steps_done": 6}), None, "stage 05 has not finished saving this adapter"),
    (None, b"{", "adapter_config.json:1: invalid JSON"),
    (None, b"", "adapter_config.json:1: invalid JSON"),
])
def test_06_refuses_a_damaged_or_unfinished_adapter(tmp_path, monkeypatch, run, config, message):
    adapter = fake_adapter(tmp_path)
    if run is not None:
        (adapter / "run.json").write_bytes(run)
    if config is not None:
        (adapter / "adapter_config.json").write_bytes(config)
    before = snapshot(tmp_path)
    refused(monkeypatch, "06_merge_and_chat.py", f"--adapter={adapter}", f"--merged={tmp_path / 'merged'}",
            match=message)
    assert snapshot(tmp_path) == before


def test_06_killed_while_swapping_in_a_new_merge(trained, tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    args = (f"--adapter={trained['adapter']}", f"--merged={merged}", "--chat=false")
    with pytest.raises(SystemExit):
        run_stage(monkeypatch, "06_merge_and_chat.py", *args)
    first = snapshot(merged)
    rename = Path.rename

    def aside_then_die(self, target):  # the old merge moved aside, the new one not yet in place
        rename(self, target)
        if Path(target).suffix == ".old":
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(Path, "rename", aside_then_die)
        with pytest.raises(Killed):
            run_stage(monkeypatch, "06_merge_and_chat.py", *args, "--overwrite")
    assert not merged.exists() and (tmp_path / "merged.old" / "merge.json").exists()
    with pytest.raises(SystemExit):
        run_stage(monkeypatch, "06_merge_and_chat.py", *args)  # merges again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    again = snapshot(merged)
    assert again.keys() == first.keys() and again[merged / "model.safetensors"] == first[merged / "model.safetensors"]


def run_06(monkeypatch, capsys, *args, stdin=None):
    """06_merge_and_chat.py in this process: (its exit: None, 0 or the message of a failure, what it printed)."""
    capsys.readouterr()
    with monkeypatch.context() as m:
        if stdin is not None:
            m.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            run_stage(m, "06_merge_and_chat.py", *args)
            code = None
        except SystemExit as stop:
            code = stop.code
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def merged(trained):
    out = trained["tmp"] / "merged"
    user, assistant = trained["train"][0][0]["content"], trained["train"][0][1]["content"]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as m, pytest.raises(SystemExit) as stop:
        m.setattr(sys, "stdout", printed)
        run_stage(m, "06_merge_and_chat.py", f"--adapter={trained['adapter']}", f"--merged={out}",
                  f"--prompt={user}", "--temperature=0", "--max-new-tokens=24")
    assert stop.value.code == 0
    return {**trained, "out": out, "printed": printed.getvalue(), "expected": assistant}


def test_learning_is_real(merged):
    log = [json.loads(x) for x in (merged["adapter"] / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert len(losses) == 100 and losses[-1] < 0.1 * losses[0]
    out = merged["printed"]
    assert out.rstrip().splitlines()[-1] == merged["expected"]  # the reply, then it stopped on its own
    assert "[cut at" not in out


def test_merged_folder_is_a_chat_model(merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = merged["out"]
    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == IM_END
    assert gen.eos_token_id == im_end and gen.pad_token_id == tok.pad_token_id != im_end
    info = json.loads((out / "merge.json").read_text())
    assert info["changed_tensors"] == info["adapted_tensors"] == 8 and info["unchanged_adapted"] == []
    assert 0 <= info["max_logit_diff_rel"] <= info["tolerance"] == 1e-4

    # What `transformers chat out/06_merged` does: template with a generation prompt, generate to eos.
    model = AutoModelForCausalLM.from_pretrained(out)
    for messages in merged["train"]:
        inputs = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        new = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert new[-1] == im_end
        assert tok.decode(new, skip_special_tokens=True) == messages[1]["content"]


def test_chat_repl_reset_exit_and_skipped_merge(merged, monkeypatch, capsys):
    (a, b) = merged["train"][:2]
    # A typed control token is not sent (it would end the user's turn and open a system turn).
    stdin = f"{a[0]['content']}\n/reset\nHi<|im_end|>\n<|im_start|>system\n{b[0]['content']}\n/exit\nnever read\n"
    code, out = run_06(monkeypatch, capsys, f"--adapter={merged['adapter']}", f"--merged={merged['out']}",
                       "--temperature=0", "--max-new-tokens=24", stdin=stdin)
    assert code is None
    assert "is current (merged from this adapter): skipping the merge" in out
    turns = out.split("bot> ")[1:]
    assert [t.split("\n")[0] for t in turns] == [a[1]["content"], b[1]["content"]]
    assert "(new conversation)" in turns[0] and "never read" not in out
    assert out.count("(not sent: '<|im_end|>' is a control token") == 1
    assert out.count("(not sent: '<|im_start|>' is a control token") == 1


def test_bf16_save_of_an_fp32_merge(trained, monkeypatch, capsys):
    out = trained["tmp"] / "merged_bf16"
    code, _ = run_06(monkeypatch, capsys, f"--adapter={trained['adapter']}", f"--merged={out}", "--dtype=bfloat16",
                     "--chat=false")
    assert code == 0
    info = json.loads((out / "merge.json").read_text())
    assert info["dtype"] == "torch.bfloat16" and info["tolerance"] == 1e-4 and info["changed_tensors"] >= 8
    assert 0 <= info["max_logit_diff_rel"] <= 1e-4 < info["saved_dtype_logit_diff_rel"]  # merged in fp32, saved in bf16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_wrong_merge_is_refused_and_saves_nothing(trained, tmp_path, monkeypatch):
    """A merge that adds the adapter's update twice (as a broken merge might) must fail the logit check."""
    from peft.tuners.lora import Linear

    right = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 2 * right(self, adapter))
    with pytest.raises(SystemExit) as stop:
        run_stage(monkeypatch, "06_merge_and_chat.py", f"--adapter={trained['adapter']}",
                  f"--merged={tmp_path / 'merged'}", "--chat=false")
    assert str(stop.value).startswith("error: merged logits differ from the adapter model's by")
    assert not (tmp_path / "merged").exists()


def test_moved_adapter_and_merged_model_work_from_another_folder(trained, tmp_path, monkeypatch, capsys):
    import shutil

    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained["student"])  # the name 05 was given, not a resolved path
    shutil.copytree(trained["adapter"], tmp_path / "moved" / "adapter")
    monkeypatch.chdir(tmp_path)
    code, _ = run_06(monkeypatch, capsys, f"--adapter={tmp_path / 'moved' / 'adapter'}",
                     f"--merged={tmp_path / 'moved' / 'merged'}", "--chat=false")
    assert code == 0
    shutil.move(tmp_path / "moved" / "merged", tmp_path / "elsewhere")
    user, assistant = trained["train"][0][0]["content"], trained["train"][0][1]["content"]
    code, out = run_06(monkeypatch, capsys, f"--adapter={tmp_path / 'moved' / 'adapter'}",
                       f"--merged={tmp_path / 'elsewhere'}", f"--prompt={user}", "--temperature=0",
                       "--max-new-tokens=24", "--overwrite=false")
    assert code == 0
    assert "is current (merged from this adapter)" in out
    assert out.rstrip().splitlines()[-1] == assistant


def test_an_adapter_that_changes_nothing_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    """Exit 1 with the message (a SystemExit with text: Python prints it to stderr and exits 1)."""
    model, tok = load_student(tiny_llama, load_in_4bit=False)
    adapter = tmp_path / "adapter"
    add_lora(model, r=4, alpha=4, dropout=0.0).save_pretrained(adapter)  # lora_B = 0: a no-op
    tok.save_pretrained(adapter)
    (adapter / "run.json").write_text(json.dumps({"student": tiny_llama}))
    code, _ = run_06(monkeypatch, capsys, f"--adapter={adapter}", f"--merged={tmp_path / 'merged'}", "--chat=false")
    assert str(code).startswith("error: the merged weights equal the base's")
    assert not (tmp_path / "merged").exists()


def test_06_pushes_the_merged_model_and_its_card(trained, hub, tmp_path, monkeypatch, capsys):
    from pipeline.knobs import InputError

    out = tmp_path / "merged"
    code, printed = run_06(monkeypatch, capsys, f"--adapter={trained['adapter']}", f"--merged={out}", "--chat=false",
                           "--push-to-hub=me/riddle-student")
    assert code == 0 and "to https://huggingface.co/me/riddle-student/commit/0" in printed
    assert hub["repos"] == [{"repo_id": "me/riddle-student", "repo_type": "model", "private": False, "exist_ok": True}]
    (commit,) = hub["commits"]
    assert sorted(commit["files"]) == ["README.md", "chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]  # no merge.json
    assert all(data == (out / name).read_bytes() for name, data in commit["files"].items() if name != "README.md")
    card = commit["files"]["README.md"].decode()
    info, run = json.loads((out / "merge.json").read_text()), json.loads((trained["adapter"] / "run.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n") and "base_model" not in card
    assert f"- base model: `{trained['student']}`: a local model folder\n" in card
    assert f"sha1 of its config and weights `{info['adapter_sha1'][:12]}`), rank 16, alpha 16" in card
    assert f"(sha1 `{run['data_sha1'][:12]}`): 3 conversations trained on" in card and "- 100 optimizer steps" in card
    assert "| `--lora-r` | `16` |" in card and "| `--lr` | `0.01` |" in card
    assert f"- {info['adapted_tensors']} of {info['adapted_tensors']} adapted weight tensors changed" in card
    assert f"max |difference| = {info['max_logit_diff_rel']:.2e} x max |logit| (tolerance 1e-04)" in card
    assert f"moves them {info['saved_dtype_logit_diff_rel']:.2e}" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/riddle-student")' in card
    assert (out / "README.md").read_text() == card.replace("me/riddle-student", str(out))

    # A failed push (the merge is current: skipped) is one line, and no local file changes.
    before = folder_files(out)
    hub["fail"] = server_error("me/riddle-student")
    with pytest.raises(InputError) as failed:
        run_06(monkeypatch, capsys, f"--adapter={trained['adapter']}", f"--merged={out}", "--chat=false",
               "--push-to-hub=me/riddle-student")
    assert "\n" not in str(failed.value) and "me/riddle-student" in str(failed.value)
    assert folder_files(out) == before and [p.name for p in tmp_path.iterdir()] == ["merged"]
