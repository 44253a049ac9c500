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

from helpers import (Killed, ROOT, folder_files, jsonl, lines, refused, run_killed, run_stage, server_error, snapshot,
                     stage_outcome, torchrun)
from pipeline import evaluation, records
from pipeline.knobs import InputError


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


@pytest.mark.parametrize("nth", [5, 6, 11])
def test_05_a_torn_log_line_leaves_every_step_once(training, tmp_path, monkeypatch, capsys, nth):
    """Killed in the middle of log.jsonl's 5th line (step 3's loss, just after the checkpoint of step 2), its 6th
    (step 3's eval, before that step's checkpoint) or its 11th (the last step's eval): the rerun drops the torn line
    and the records after its checkpoint, trains on from there, and log.jsonl holds every step once, as the
    uninterrupted run's does."""
    args = kill_train_args(training["student"], training["data"], tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at(m, "mid log line", nth)
        with pytest.raises(Killed):
            run_stage(m, "05_finetune_phi2.py", *args)
    run_stage(monkeypatch, "05_finetune_phi2.py", *args)
    assert "repaired log.jsonl: dropped a torn last line" in capsys.readouterr().out
    assert lines(tmp_path / "run" / "log.jsonl") == lines(training["reference"] / "log.jsonl")


def tensorboard_curves(adapter):
    """{tag: [(step, value)]} of 05's TensorBoard run as TensorBoard shows it (its EventAccumulator reads the event
    files in name order, and a restart's first event drops the steps from its purge step on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(adapter / "runs" / "riddle-student"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("nth", [1, 6])
def test_05_tensorboard_curves_equal_the_log_after_a_kill(training, tmp_path, monkeypatch, nth):
    """--report-to=tensorboard, killed mid log line (the 1st: step 0's eval, before any checkpoint; the 6th: after
    the checkpoint of step 2) and rerun: the curves in out/05_adapter/runs hold every step once, with log.jsonl's
    values (TensorBoard keeps float32), the learning rate, tok/s and memory per step."""
    import time

    import numpy as np

    pytest.importorskip("tensorboard")
    args = kill_train_args(training["student"], training["data"], tmp_path / "run", "--report-to=tensorboard")
    with monkeypatch.context() as m:
        kill_at(m, "mid log line", nth)
        with pytest.raises(Killed):
            run_stage(m, "05_finetune_phi2.py", *args)
    # Event files are named by the second they were opened in: a real restart comes seconds later.
    time.sleep(1.01 - time.time() % 1)
    run_stage(monkeypatch, "05_finetune_phi2.py", *args)
    log = lines(tmp_path / "run" / "log.jsonl")
    assert log == lines(training["reference"] / "log.jsonl")
    curves = tensorboard_curves(tmp_path / "run")
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        assert curves[tag] == [(r["step"], float(np.float32(r[key]))) for r in log if key in r]
    steps = list(range(1, 7))
    assert curves["train/learning_rate"] == [(s, float(np.float32(1e-2))) for s in steps]
    assert curves["train/epoch"] == [(s, float(np.float32(s / 3))) for s in steps]
    for tag in ("train/tokens_per_second", "memory/cpu_peak_rss_gib"):
        assert [s for s, _ in curves[tag]] == steps and all(v > 0 for _, v in curves[tag])


def test_05_and_06_fsync_before_a_name_or_finished_says_whole(training, tmp_path, monkeypatch):
    """Past a power loss too: a checkpoint's files and folder are fsynced before the rename that makes it a
    checkpoint (its parent folder right after), the final adapter's files before run.json says `finished`, and
    06's merged files before the rename that makes them out/06_merged (its parent right after). README.md and
    run.json are written atomically, fsynced as they are written."""
    events, fsync, rename, write_json = [], records.fsync_path, Path.rename, records.write_json_atomic

    def renamed(self, target):
        events.append(("rename", Path(self), Path(target)))
        return rename(self, target)

    def written(file, obj):
        write_json(file, obj)
        if "finished" in obj:
            events.append(("finished", Path(file)))

    monkeypatch.setattr(records, "fsync_path", lambda p: events.append(("fsync", Path(p))) or fsync(p))
    monkeypatch.setattr(Path, "rename", renamed)
    monkeypatch.setattr(records, "write_json_atomic", written)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    run_stage(monkeypatch, "05_finetune_phi2.py", *kill_train_args(training["student"], training["data"], adapter))
    with pytest.raises(SystemExit):
        run_stage(monkeypatch, "06_merge_and_chat.py", f"--adapter={adapter}", f"--merged={merged}", "--chat=false")

    def synced_before(i):
        return {e[1] for e in events[:i] if e[0] == "fsync"}

    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    checkpoints = [(i, tmp, final) for i, tmp, final in renames if final.name.startswith("step-")]
    assert [final.name for _, _, final in checkpoints] == ["step-000002", "step-000003", "step-000004", "step-000006"]
    for i, tmp, final in checkpoints:
        assert {tmp / p.name for p in final.iterdir()} | {tmp} <= synced_before(i)
        assert events[i + 1] == ("fsync", final.parent)
    (finished,) = [i for i, e in enumerate(events) if e[0] == "finished"]
    assert {adapter / name for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json", "chat_template.jinja", "loss.png")} | {adapter} \
        <= synced_before(finished)
    ((i, tmp, _),) = [r for r in renames if r[2] == merged]
    assert {tmp / p.name for p in merged.iterdir()} | {tmp} <= synced_before(i)
    assert events[i + 1] == ("fsync", tmp_path)


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


def test_report_to_names_and_missing_packages(data_file, tmp_path, monkeypatch):
    import importlib.util

    from pipeline.training import trackers

    assert trackers("none") == trackers("") == trackers(" None ") == []
    with pytest.raises(InputError, match=r"^--report-to: unknown tracker 'tensorbored'; use none or any of .*tensorb"):
        trackers("none,tensorbored")
    # accelerate would skip a tracker whose package is missing without a word: here it is one line, the pin included.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match=r"^--report-to=comet_ml: the comet-ml package is not installed: run "
                                         r"`pip install comet-ml`$"):
        trackers("comet_ml")
    pin = next(x for x in (ROOT / "requirements-extra.txt").read_text().splitlines() if x.startswith("tensorboard=="))
    with pytest.raises(InputError, match=f"the tensorboard package is not installed: run `pip install {pin}`$"):
        run_stage(monkeypatch, "05_finetune_phi2.py", f"--data={data_file}", f"--adapter={tmp_path / 'out'}",
                  "--report-to=tensorboard")
    assert not (tmp_path / "out").exists()


def wandb_offline_runs(folder):
    """[(run id, {step: {key: value}})] of the offline runs in folder/wandb, oldest first: the id as `wandb sync`
    reads it (the file is run-<id>.wandb), the history from the file as wandb writes it: a 7-byte header, then
    LevelDB log records (checksum, length, kind; kinds 2-4 are parts of one) in 32 KiB blocks, each record a
    wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    runs = []
    for file in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, part, history = file.read_bytes(), 7, b"", {}
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header: padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # whole, or the last part
                record = wandb_internal_pb2.Record()
                record.ParseFromString(part)
                part = b""
                if record.HasField("history"):
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    history.setdefault(record.history.step.num, {}).update(
                        {k: v for k, v in items.items() if not k.startswith("_")})
        runs.append((file.stem.removeprefix("run-"), history))
    return runs


def test_wandb_offline_run_goes_on_after_a_restart(tiny_llama, data_file, tmp_path, monkeypatch):
    """Stopped at --max-steps=3 and rerun: the same wandb run (its id kept in run.json) gets the steps after the
    checkpoint, and every logged loss and eval loss equals log.jsonl's."""
    wandb = pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    script, *args = train_args(tiny_llama, data_file, out, "--report-to=wandb")
    for extra in (["--max-steps=3"], []):
        run_stage(monkeypatch, script, *args, *extra)
        wandb.teardown()  # what the end of the process does: wandb's service writes the run's file out and stops
    steps = json.loads((out / "run.json").read_text())["steps_done"]
    run_id = json.loads((out / "run.json").read_text())["tracker_run_id"]
    (first, before), (second, after) = wandb_offline_runs(out)
    assert first == second == run_id
    assert sorted(before) == [0, 1, 2, 3] and sorted(after) == list(range(4, steps + 1))
    history = before | after
    for record in read_log(out):
        key, name = ("loss", "train/loss") if "loss" in record else ("eval_loss", "eval/loss")
        assert history[record["step"]][name] == record[key]
    for step, values in history.items():
        assert set(values) >= ({"eval/loss"} if step == 0 else {"train/loss", "train/learning_rate",
                                                               "train/tokens_per_second", "memory/cpu_peak_rss_gib"})
        assert step == 0 or (values["train/learning_rate"] == 1e-3 and values["train/tokens_per_second"] > 0)


def test_05_pushes_adapter_tokenizer_curves_and_card(trained, hub, tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    run_stage(monkeypatch, "05_finetune_phi2.py", f"--student={trained['student']}",
              f"--data={trained['tmp'] / '04_conversations.jsonl'}", f"--adapter={out}", "--max-steps=2", "--lora-r=4",
              "--lora-alpha=8", "--tokens-per-batch=256", "--max-length=256", "--gradient-checkpointing=0",
              "--push-to-hub=me/riddle-adapter", "--private")
    assert hub["repos"] == [{"repo_id": "me/riddle-adapter", "repo_type": "model", "private": True, "exist_ok": True}]
    (commit,) = hub["commits"]
    # Not the checkpoints, the data split, log.jsonl or run.json.
    assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "chat_template.jinja", "loss.png", "tokenizer.json", "tokenizer_config.json"]
    assert all(data == (out / name).read_bytes() for name, data in commit["files"].items() if name != "README.md")
    card, run = commit["files"]["README.md"].decode(), json.loads((out / "run.json").read_text())
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model" not in card  # a local folder is no Hub id
    assert f"# Riddle student: a LoRA adapter for {trained['student']}\n" in card
    assert f"- base model: `{trained['student']}`: a local model folder; training loaded it in 4-bit NF4" in card
    assert "- adapter: rank 4, alpha 8, on k_proj, o_proj, q_proj, v_proj\n" in card
    assert f"(sha1 `{run['data_sha1'][:12]}`): 3 conversations trained on, 1 held out" in card
    assert "- 2 optimizer steps (" in card and "- eval loss (mean per supervised token): " in card
    assert "| `--lora-r` | `4` |" in card and "| `--lr` | `2e-05` |" in card
    assert "![train and eval loss](loss.png)" in card
    assert 'PeftModel.from_pretrained(base, "me/riddle-adapter")' in card
    assert (out / "README.md").read_text() == card.replace("me/riddle-adapter", str(out))  # over peft's template
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the push's folder of links is gone
    assert "to https://huggingface.co/me/riddle-adapter/commit/0" in capsys.readouterr().out


def test_05_failed_push_is_one_line_and_the_rerun_pushes(trained, hub, tmp_path, monkeypatch):
    import shutil

    from pipeline.knobs import InputError

    adapter = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], adapter)
    run = json.loads((adapter / "run.json").read_text())
    same = [f"--{k.lower().replace('_', '-')}={','.join(v) if isinstance(v, list) else v}"
            for k, v in run["recipe"].items() if k != "PROCESSES"]  # the recipe as run.json keeps it
    args = (*same, f"--data={run['data']}", f"--adapter={adapter}", f"--max-steps={run['steps_done']}")
    before = folder_files(adapter)
    with pytest.raises(InputError, match="no-owner"):  # refused before anything runs
        run_stage(monkeypatch, "05_finetune_phi2.py", *args, "--push-to-hub=no-owner")
    hub["fail"] = server_error("me/riddle-adapter")
    with pytest.raises(InputError) as failed:
        run_stage(monkeypatch, "05_finetune_phi2.py", *args, "--push-to-hub=me/riddle-adapter")
    assert "\n" not in str(failed.value) and "me/riddle-adapter" in str(failed.value) and "500" in str(failed.value)
    assert folder_files(adapter) == before and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    hub["fail"] = None
    with pytest.raises(SystemExit) as stop:  # a finished run: nothing to train, the push again
        run_stage(monkeypatch, "05_finetune_phi2.py", *args, "--push-to-hub=me/riddle-adapter")
    assert stop.value.code == 0 and [c["repo_id"] for c in hub["commits"]] == ["me/riddle-adapter"]
    assert "adapter_model.safetensors" in hub["commits"][0]["files"] and folder_files(adapter) == before
