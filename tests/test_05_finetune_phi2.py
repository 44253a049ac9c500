"""Stage 05 (05_finetune_phi2.py), run in this process: outputs, a resume equals an uninterrupted run (both
optimizers), stopped at every point of its checkpoint and final saves (and one real SIGKILL), bad input,
trackers, pushing to the Hub; DDP under torchrun x2 equals one process accumulating.
"""

import io
import json
import signal
from pathlib import Path

import peft
import pytest
import torch

from helpers import Killed, ROOT, jsonl, lines, refused, run_killed, run_stage, snapshot, stage_outcome, torchrun
from pipeline import evaluation, records


def kill_at(m, point, nth=1):
    """Stop the next 05 run at the nth `point`, leaving what SIGKILL would leave there."""
    count = [0]

    def due():
        count[0] += 1
        return count[0] == nth

    if point == "mid log line":  # half a record of log.jsonl reaches the disk
        write = records.Appender.write

        def torn(self, records):
            if self.file.name == "log.jsonl" and due():
                write(self, [])  # opens the file
                text = json.dumps(records[0]) + "\n"
                self._f.write(text[:len(text) // 2])
                self._f.flush()
                raise Killed
            write(self, records)
        m.setattr(records.Appender, "write", torn)
    elif point == "mid state.pt":  # a checkpoint's optimizer state half written, in its .tmp folder
        save = torch.save

        def half(obj, file, *a, **k):
            if Path(file).name == "state.pt" and due():
                buffer = io.BytesIO()
                save(obj, buffer, *a, **k)
                Path(file).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                raise Killed
            save(obj, file, *a, **k)
        m.setattr(torch, "save", half)
    elif point == "after checkpoint rename":  # the checkpoint is in place, run.json does not know it yet
        rename = Path.rename

        def then_die(self, target):
            result = rename(self, target)
            if Path(target).name.startswith("step-") and due():
                raise Killed
            return result
        m.setattr(Path, "rename", then_die)
    elif point == "after final adapter":  # the case: no tokenizer.json, no loss.png, no `finished`
        save_adapter = peft.PeftModel.save_pretrained

        def then_die(self, folder, *a, **k):
            save_adapter(self, folder, *a, **k)
            if not str(folder).endswith(".tmp") and due():
                raise Killed
        m.setattr(peft.PeftModel, "save_pretrained", then_die)
    elif point == "before loss.png":
        m.setattr(evaluation, "plot_loss", lambda *a: (_ for _ in ()).throw(Killed))
    elif point == "before final run.json":
        write_json = records.write_json_atomic

        def before(file, obj):
            if "finished" in obj and due():
                raise Killed
            write_json(file, obj)
        m.setattr(records, "write_json_atomic", before)


def kill_train_args(student, data, adapter, *extra):
    """6 steps (3 per epoch), checkpoints at steps 2, 3, 4 and 6."""
    return (f"--student={student}", f"--data={data}", f"--adapter={adapter}", "--epochs=2", "--tokens-per-batch=96",
            "--max-length=96", "--grad-accum=2", "--lr=1e-2", "--lora-r=4", "--lora-alpha=8",
            "--gradient-checkpointing=0", "--save-every-steps=2", "--keep-checkpoints=5", *extra)


@pytest.fixture(scope="module")
def training(tiny_llama, tmp_path_factory):
    """The data and an uninterrupted run to compare with."""
    tmp = tmp_path_factory.mktemp("kills")
    data = tmp / "04.jsonl"
    data.write_bytes(jsonl(*({"id": f"c{i:02d}", "messages": [
        {"role": "user", "content": f"Riddle {i}: what has keys but cannot open locks?"},
        {"role": "assistant", "content": "A piano." + " It has keys." * (i % 4)}]} for i in range(12))))
    with pytest.MonkeyPatch.context() as m:
        run_stage(m, "05_finetune_phi2.py", *kill_train_args(tiny_llama, data, tmp / "reference"))
    reference = tmp / "reference"
    assert json.loads((reference / "run.json").read_text())["steps_done"] == 6
    return {"student": tiny_llama, "data": data, "reference": reference}


def assert_same_run(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical
    assert lines(a / "log.jsonl") == lines(b / "log.jsonl")
    for name in ("tokenizer.json", "chat_template.jinja", "loss.png", "train.jsonl", "eval.jsonl"):
        assert (b / name).is_file(), name
    run = json.loads((b / "run.json").read_text())
    assert run["finished"] is True and run["steps_done"] == 6


def unfinished_refused_by_06(monkeypatch, adapter, tmp_path):
    refused(monkeypatch, "06_merge_and_chat.py", f"--adapter={adapter}", f"--merged={tmp_path / 'merged'}",
            "--chat=false", match="stage 05 has not finished saving this adapter")


def test_05_killed_at_every_save_point_ends_as_an_uninterrupted_run(training, tmp_path, monkeypatch, capsys):
    args = lambda *extra: kill_train_args(training["student"], training["data"], tmp_path / "run", *extra)  # noqa: E731
    chain = [("mid log line", 3), ("mid state.pt", 2), ("after checkpoint rename", 1), ("after final adapter", 1),
             ("before loss.png", 1), ("before final run.json", 1)]
    for point, nth in chain:
        with monkeypatch.context() as m:
            kill_at(m, point, nth)
            with pytest.raises(Killed):
                run_stage(monkeypatch, "05_finetune_phi2.py", *args())
        out = capsys.readouterr().out
        assert "finished" not in json.loads((tmp_path / "run" / "run.json").read_text()), point
        if point == "mid state.pt":
            assert "repaired log.jsonl: dropped a torn last line" in out  # left by the kill before
        if point == "after checkpoint rename":
            assert "resuming from step-000002" in out  # the half-saved step-000003.tmp is not a checkpoint
        if point == "before loss.png":
            assert (tmp_path / "run" / "tokenizer.json").exists() and not (tmp_path / "run" / "loss.png").exists()
        if point.startswith(("after final", "before")):
            unfinished_refused_by_06(monkeypatch, tmp_path / "run", tmp_path)
    run_stage(monkeypatch, "05_finetune_phi2.py", *args())
    assert "05: nothing left to train; saved the adapter of step 6" in capsys.readouterr().out
    assert_same_run(training["reference"], tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        run_stage(monkeypatch, "05_finetune_phi2.py", *args())
    assert stop.value.code == 0 and "already trained to step 6: nothing to do" in capsys.readouterr().out

    # A damaged state.pt (not a kill's doing: checkpoints are renamed into place whole) is one line, too.
    state = tmp_path / "run" / "checkpoints" / "step-000006" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = snapshot(tmp_path / "run")
    refused(monkeypatch, "05_finetune_phi2.py", *args("--epochs=3"),
            match="step-000006/state.pt is unreadable .*: delete that folder to resume from the checkpoint before it")
    assert snapshot(tmp_path / "run") == before


def test_05_sigkill_during_the_final_save(training, tmp_path, monkeypatch, capsys):
    """The issue's report, with a real SIGKILL: the rerun used to say "nothing to do" and 06 then failed."""
    adapter = tmp_path / "adapter"
    r = run_killed("05_finetune_phi2.py", *kill_train_args(training["student"], training["data"], adapter),
                   KILL_AFTER_FINAL_ADAPTER="1")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "tokenizer.json").exists()
    unfinished_refused_by_06(monkeypatch, adapter, tmp_path)
    run_stage(monkeypatch, "05_finetune_phi2.py", *kill_train_args(training["student"], training["data"], adapter))
    assert "nothing left to train; saved the adapter of step 6" in capsys.readouterr().out
    assert_same_run(training["reference"], adapter)


def conversations(n):
    riddles = [("What has keys but cannot open locks?", "A piano has keys."),
               ("The more you take, the more you leave behind.", "Footsteps!"),
               ("Why does the moon shine?", "Because it reflects the light of the sun."),
               ("How many legs does a spider have?", "Eight."),
               ("I speak without a mouth. What am I?", "An echo.")]
    out = []
    for i in range(n):
        q, a = riddles[i % len(riddles)]
        out.append({"id": f"c{i:02d}", "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a},
            {"role": "user", "content": "Can you tell me why?" + " Why?" * (i % 3)},
            {"role": "assistant", "content": f"Because {a.lower()}" + " Yes." * (i % 4)}]})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "04_conversations.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in conversations(16)))
    return file


def train_args(student, data, out, *extra, optimizer="adamw"):
    return ("05_finetune_phi2.py", f"--student={student}", f"--data={data}", f"--adapter={out}", "--epochs=2",
            "--tokens-per-batch=160", "--max-length=160", "--grad-accum=2", "--lr=1e-3", "--lora-r=4",
            "--lora-alpha=8", "--keep-checkpoints=2", "--gradient-checkpointing=0", f"--optimizer={optimizer}", *extra)


def flat_tensors(state, prefix=""):
    """The tensors of an optimizer state but its step count (torch keeps it as a tensor); bitsandbytes nests its
    moments in a dict."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif torch.is_tensor(v) and k != "step":
            out[prefix + k] = v
    return out


def read_log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_32bit"])
def test_resume_equals_uninterrupted_run(tiny_llama, data_file, tmp_path, optimizer, monkeypatch, capsys):
    from safetensors.torch import load_file

    def run_script(*args):  # in this process: seconds less a run than a subprocess
        return stage_outcome(monkeypatch, capsys, *args)

    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_script(*train_args(tiny_llama, data_file, full, optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((full / "run.json").read_text())
    steps = run["steps_done"]
    assert run["finished"] and steps == 2 * run["steps_per_epoch"] and steps >= 6
    assert "05: trained steps 1-" in r.stdout

    r = run_script(*train_args(tiny_llama, data_file, cut, f"--max-steps={steps // 2 + 1}", optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cut / "run.json").read_text())["steps_done"] == steps // 2 + 1
    if optimizer == "paged_adamw_32bit":  # the only one before the knob: a run.json without it resumes with it
        run = json.loads((cut / "run.json").read_text())
        del run["recipe"]["OPTIMIZER"]
        (cut / "run.json").write_text(json.dumps(run))
        r = run_script(*train_args(tiny_llama, data_file, cut))
        assert r.returncode == 2 and "holds a run with other optimizer" in r.stderr
    r = run_script(*train_args(tiny_llama, data_file, cut, optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step-{steps // 2 + 1:06d}" in r.stdout
    assert json.loads((cut / "run.json").read_text())["steps_done"] == steps

    a, b = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it did train
    state_a = torch.load(full / "checkpoints" / f"step-{steps:06d}" / "state.pt")
    state_b = torch.load(cut / "checkpoints" / f"step-{steps:06d}" / "state.pt")
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for k in opt_a:
        moments_a, moments_b = flat_tensors(opt_a[k]), flat_tensors(opt_b[k])
        assert moments_a.keys() == moments_b.keys() and len(moments_a) == 2  # Adam's two moments
        assert all(torch.allclose(moments_a[n], moments_b[n], atol=1e-6) for n in moments_a)
        assert opt_a[k]["step"] == opt_b[k]["step"] == steps
    train_a = [(x["step"], round(x["loss"], 5)) for x in read_log(full) if "loss" in x]
    train_b = [(x["step"], round(x["loss"], 5)) for x in read_log(cut) if "loss" in x]
    assert train_a == train_b and [s for s, _ in train_a] == list(range(1, steps + 1))

    # The outputs stage 06 and 07 read.
    assert len(list((full / "checkpoints").glob("step-*"))) == 2
    assert (full / "loss.png").stat().st_size > 1000
    assert (full / "chat_template.jinja").exists() and (full / "adapter_config.json").exists()
    split = [json.loads(x) for f in ("train.jsonl", "eval.jsonl") for x in (full / f).read_text().splitlines()]
    assert sorted(r["id"] for r in split) == [f"c{i:02d}" for i in range(16)]
    assert len((full / "eval.jsonl").read_text().splitlines()) == 2
    evals = [x for x in read_log(full) if "eval_loss" in x]
    assert evals[0]["step"] == 0 and len(evals) == 1 + 2 * 2 and set(evals[-1]) == {"step", "epoch", "eval_loss"}

    # A finished run is not retrained; other recipe knobs are refused; --overwrite starts afresh.
    r = run_script(*train_args(tiny_llama, data_file, full, optimizer=optimizer))
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = run_script(*train_args(tiny_llama, data_file, full, "--lr=5e-4", optimizer=optimizer))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {full} holds a run with other lr: rerun with --overwrite to start afresh"]
    r = run_script(*train_args(tiny_llama, data_file, full, "--lr=5e-4", "--overwrite", "--max-steps=1",
                               "--eval-fraction=0", optimizer=optimizer))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in read_log(full)] == [1]
    assert not (full / "checkpoints" / f"step-{steps:06d}").exists()


def test_bad_input_is_one_line_and_touches_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello."}]}) + "\n{oops\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    r = stage_outcome(monkeypatch, capsys, *train_args(tiny_llama, bad, out, "--overwrite"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: invalid JSON")
    assert [p.name for p in out.iterdir()] == ["run.json"] and (out / "run.json").read_text() == "{}"


def test_ddp_two_processes_equal_one_process_accumulating(tiny_llama, data_file, tmp_path, monkeypatch):
    """torchrun x2 on CPU (gloo) with 1 micro-batch per step each = 1 process with 2 per step.

    The loss is divided by the supervised tokens of the whole step across processes, so the
    gradients agree. One eval conversation gives the processes unequal eval shares (a hang
    if eval went through DDP's forward, which syncs buffers).
    """
    from safetensors.torch import load_file

    common = ("--lora-dropout=0", "--max-steps=3", "--eval-fraction=0.0625")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_stage(monkeypatch, *train_args(tiny_llama, data_file, single, *common))
    args = [a for a in train_args(tiny_llama, data_file, ddp, *common) if a != "--grad-accum=2"]
    r = torchrun(ROOT / args[0], *args[1:], "--grad-accum=1", ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x 1 per step" in r.stdout
    assert json.loads((ddp / "run.json").read_text())["recipe"]["PROCESSES"] == 2
    log_a, log_b = read_log(single), read_log(ddp)
    assert [x["step"] for x in log_a] == [x["step"] for x in log_b] == [0, 1, 2, 3, 3]
    for x, y in zip(log_a, log_b):
        key = "loss" if "loss" in x else "eval_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-5)
    a, b = load_file(single / "adapter_model.safetensors"), load_file(ddp / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
