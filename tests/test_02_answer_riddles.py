"""Stage 02 (02_answer_riddles.py), run in this process on the tiny random llama or a scripted backend:
resume after a SIGKILL (helpers.KILLER) or a full disk, replies cut off, bad input and outputs, control
tokens in replies, a dead server; under torchrun x2 (the two-process path of 01-04): one writer, the bytes
of one process, with either process SIGKILLed in the middle.
"""

import errno
import gc
import json
import os
import re
import signal
import subprocess
from functools import partial

import pytest
import torch

import common
from helpers import (ControlTokenGenerator, GOOD, GOOD_RIDDLE, ROOT, jsonl, killer_file, lines, refused, run_killed,
                     run_stage, running, snapshot, stage_args, torchrun, user_only)
from pipeline import records
from pipeline.knobs import InputError
from pipeline.message_stage import MessageStage
from pipeline.riddles import clean_followup, clean_riddle, load_seed_riddles, riddle_id


def stage02_args(d, riddles, model, batch_size=2):
    """Stage 02 on `riddles` into folder d: batches of batch_size, replies of at most 64 tokens (chatty_llama ends
    2 of the 9 riddles' replies in time: both files get records; cut replies are rejected)."""
    return [f"--generator={model}", f"--in-file={riddles}", f"--out-file={d / '02.jsonl'}",
            f"--rejected-file={d / 'rej.jsonl'}", f"--batch-size={batch_size}", "--max-new-tokens=64"]


def write_riddles(file, n=9):
    """The first n shipped seed riddles as stage 01's output."""
    seeds = load_seed_riddles(ROOT / "data" / "seed_riddles.jsonl")[:n]
    file.write_text("".join(json.dumps({"id": riddle_id(s), "messages": [{"role": "user", "content": s}]}) + "\n"
                            for s in seeds))
    return file


def test_a_reply_cut_right_after_a_full_stop_is_rejected_as_cut(tmp_path, chatty_llama, monkeypatch):
    """Whether a reply was cut is the backend's word (it reached an end token before MAX_NEW_TOKENS), not its last
    character: the same reply, forced, is rejected when the cap stops it right after its full stop and kept when
    it ends there on its own."""
    tok = common.load_tokenizer(chatty_llama)
    target = tok("It is a towel.", add_special_tokens=False)["input_ids"]
    assert tok.decode(target).strip() == "It is a towel."
    generate_ids = common.generate_ids

    def forced(model, prompts, seeds, **k):  # the target's tokens, then an end token
        eos = k["eos_ids"] if isinstance(k["eos_ids"], int) else k["eos_ids"][0]
        want = torch.tensor(target + [eos])

        def processor(scores, rows, steps):
            pick = want[steps.clamp(max=len(target))]
            return torch.where(torch.arange(scores.shape[-1]) == pick[:, None], 0.0, float("-inf"))
        return generate_ids(model, prompts, seeds, **dict(k, processor=processor))

    monkeypatch.setattr(common, "generate_ids", forced)
    riddles_file = write_riddles(tmp_path / "01.jsonl", n=1)
    for cap, reason in ((len(target), "unfinished"), (len(target) + 1, None)):
        d = tmp_path / str(cap)
        run_stage(monkeypatch, "02_answer_riddles.py", *stage02_args(d, riddles_file, chatty_llama),
                  f"--max-new-tokens={cap}", "--temperature=0")
        if reason:
            assert [(r["reason"], r["text"]) for r in lines(d / "rej.jsonl")] == [(reason, "It is a towel.")]
            assert not lines(d / "02.jsonl")
        else:
            assert [r["messages"][-1]["content"] for r in lines(d / "02.jsonl")] == ["It is a towel."]


def test_resume_02_after_sigkill(tmp_path, chatty_llama, monkeypatch, capsys):
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    ref, crash = tmp_path / "ref", tmp_path / "crash"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    assert len(lines(ref / "02.jsonl")) + len(lines(ref / "rej.jsonl")) == 9
    assert lines(ref / "02.jsonl") and lines(ref / "rej.jsonl")  # both files take part in the resume
    r = run_killed("02_answer_riddles.py", *args(crash))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    torn = [n for n in ("02.jsonl", "rej.jsonl") if not (crash / n).read_text().endswith("\n")]
    assert len(torn) == 1  # the torn line is really there
    capsys.readouterr()
    run_stage(monkeypatch, "02_answer_riddles.py", *args(crash))
    out = capsys.readouterr().out
    assert f"repaired {torn[0]}: dropped a torn last line" in out
    for name in ("02.jsonl", "rej.jsonl"):
        assert (crash / name).read_bytes() == (ref / name).read_bytes(), name


class DiskFull:
    """A file whose second write puts half of its text on the disk, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, text):
        self.writes += 1
        if self.writes == 2:
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_is_one_line_and_the_rerun_goes_on(tmp_path, monkeypatch, capsys, scripted_backend):
    """ENOSPC in the middle of a batch: one line naming the file and what was kept (exit 2, no traceback); once
    there is space, the rerun repairs the torn last line as after a kill and ends as an uninterrupted run."""
    riddles = write_riddles(tmp_path / "01.jsonl")
    args = partial(stage02_args, riddles=riddles, model="never-loaded")
    scripted_backend(Piano())
    ref, full = tmp_path / "ref", tmp_path / "full"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    open_file = records.Appender.open

    def open_full(self):
        open_file(self)
        if self.file.name == "02.jsonl" and not isinstance(self._f, DiskFull):
            self._f = DiskFull(self._f)

    with monkeypatch.context() as m:
        m.setattr(records.Appender, "open", open_full)
        with pytest.raises(InputError, match=r"02\.jsonl: disk full \(\d+ records were kept before this batch\); "
                                             r"free space and rerun") as stop:
            run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    assert "\n" not in str(stop.value)
    assert not (full / "02.jsonl").read_text().endswith("\n")  # half a batch reached the disk
    capsys.readouterr()
    run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    assert "repaired 02.jsonl: dropped a torn last line" in capsys.readouterr().out
    for name in ("02.jsonl", "rej.jsonl"):
        assert (full / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, where this machine lets the tests mount one (as root, where the container allows)."""
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("the test counts in 4 KiB pages")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    except OSError:  # no mount command
        mounted = None
    if not mounted or mounted.returncode:
        pytest.skip("no tmpfs can be mounted here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_a_real_full_disk_is_one_line_and_the_rerun_goes_on(tmp_path, small_disk, monkeypatch, capsys,
                                                             scripted_backend):
    """The same on a small tmpfs that really fills up: 60 riddles' answers (~9 KiB) where 4 KiB are free."""
    riddles = write_riddles(tmp_path / "01.jsonl", n=60)
    args = partial(stage02_args, riddles=riddles, model="never-loaded", batch_size=8)
    scripted_backend(Piano())
    ref, full = tmp_path / "ref", small_disk / "full"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    assert len((ref / "02.jsonl").read_bytes()) > 8192
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * (60 << 10))  # 15 of the 16 pages: one left for the output
    with pytest.raises(InputError, match=r"02\.jsonl: disk full \(\d+ records were kept before this batch\); "
                                         r"free space and rerun") as stop:
        run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    assert "\n" not in str(stop.value)
    gc.collect()  # whatever the failed run left open is closed now, while the disk is still full
    kept = (full / "02.jsonl").read_bytes()
    assert 0 < len(kept) <= 4096 and kept == (ref / "02.jsonl").read_bytes()[:len(kept)]
    filler.unlink()
    capsys.readouterr()
    run_stage(monkeypatch, "02_answer_riddles.py", *args(full))
    for name in ("02.jsonl", "rej.jsonl"):
        assert (full / name).read_bytes() == (ref / name).read_bytes(), name


def test_an_output_below_a_place_that_takes_no_files_is_one_line(tmp_path, monkeypatch, scripted_backend):
    """/proc takes no new files: the stage stops in one line at its first write, not with a traceback."""
    riddles = write_riddles(tmp_path / "01.jsonl", n=2)
    scripted_backend(Piano())
    with pytest.raises(InputError, match=r"^/proc/riddles/02\.jsonl.*: cannot be written"):
        run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={riddles}", "--out-file=/proc/riddles/02.jsonl",
                  f"--rejected-file={tmp_path / 'rej.jsonl'}")


class Piano:
    """A backend that answers every prompt "It is a piano." (ended)."""

    def prompt_length(self, messages):
        return len(messages[-1]["content"])

    def generate(self, prompts, seeds, **sampling):
        return [records.Reply("It is a piano.", True) for _ in prompts]


def test_two_processes_write_what_one_writes_and_resume(tmp_path, chatty_llama, monkeypatch):
    """torchrun x2 (accelerate launch alike): batches dealt out, one writer, the same bytes as one process; with
    --overwrite too. (A resume under two processes: after a SIGKILL, test_two_processes_resume_after_sigkill_of_one.)"""
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama, batch_size=4)

    def two_processes(d, *more):
        r = torchrun(ROOT / "02_answer_riddles.py", *args(d), *more)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(one))
    out = two_processes(two)
    assert out.count("02: kept") == 1  # one summary: the first process writes, the other only generates
    for name in ("02.jsonl", "rej.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    two_processes(two, "--overwrite")  # only the first process deletes and writes
    for name in ("02.jsonl", "rej.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


# Runs a stage (argv: the project folder, the script, its arguments) on the slot engine, as on a GPU: HFBackend
# streams (one generate call, each reply handed on as it ends).
STREAMING = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import common
common.slot_engine_runs = lambda model: True
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_streaming_write_what_one_writes(tmp_path, chatty_llama, monkeypatch):
    """The GPU path of 01-04 under torchrun x2, on CPU: each process streams its share through the slot engine
    and gathers a batch once its shares of it and of the next batch are in; the writer writes the bytes of one
    process on transformers' generate. Resumes the same way."""
    riddles = write_riddles(tmp_path / "01.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(one))
    (tmp_path / "streaming.py").write_text(STREAMING)
    for cut in (False, True):  # whole, then resumed from a file cut after its first record
        if cut:
            (two / "02.jsonl").write_text((two / "02.jsonl").read_text().splitlines(keepends=True)[0])
            (two / "rej.jsonl").write_text("")
        r = torchrun(tmp_path / "streaming.py", ROOT, ROOT / "02_answer_riddles.py", *args(two))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        for name in ("02.jsonl", "rej.jsonl"):
            assert (two / name).read_bytes() == (one / name).read_bytes(), name


@pytest.mark.parametrize("victim, kill", [("0", {"KILL_AT_RECORD": "4"}), ("1", {"KILL_AT": "3"})],
                         ids=["writer", "non-writer"])
def test_two_processes_resume_after_sigkill_of_one(tmp_path, chatty_llama, monkeypatch, victim, kill):
    """Issue 12: kill -9 of either process of `torchrun --nproc_per_node=2` in the middle of stage 02, rerun under two
    processes: nothing lost or doubled, the bytes of one process. 9 riddles in batches of 2 make 5 batches, each
    one all_gather_object (on CPU each process generates its shares of two batches a call). The writer (rank 0) dies
    halfway through its 4th record, so batch 2 is half written (the rerun regenerates it and writes only its other
    record) and the rerun deals the batches out in other groups; the other (rank 1) dies once the third batch is
    gathered, so the writer wrote the first two (and the third, unless torchrun's SIGTERM came first) and never the
    fourth (it needs rank 1's share). torchrun must fail and leave no process behind."""
    riddles = write_riddles(tmp_path / "01.jsonl")
    names = ("02.jsonl", "rej.jsonl")

    args = partial(stage02_args, riddles=riddles, model=chatty_llama)

    ref, crash, pids = tmp_path / "ref", tmp_path / "crash", tmp_path / "pids"
    run_stage(monkeypatch, "02_answer_riddles.py", *args(ref))
    pids.mkdir()
    r = torchrun(killer_file(tmp_path), ROOT, ROOT / "02_answer_riddles.py", *args(crash),
                 KILL_RANK=victim, KILL_PIDS=str(pids), **kill)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.search(rf"rank +: {victim} \(local_rank: {victim}\)\n +exitcode +: -9 ", r.stderr), r.stderr[-3000:]
    assert sorted(p.name for p in pids.iterdir()) == ["0", "1"]
    assert not [p.name for p in pids.iterdir() if running(p)]  # the survivor too is gone (torchrun stops it)
    # On disk: whole records in the order of one process, at least a batch, not all; the writer's kill tore a line.
    text = {n: (crash / n).read_text() if (crash / n).exists() else "" for n in names}
    whole = {n: t[:t.rfind("\n") + 1] for n, t in text.items()}
    torn = [n for n in names if text[n] != whole[n]]
    assert len(torn) == (victim == "0")
    assert all((ref / n).read_text().startswith(whole[n]) for n in names)
    written = sum(t.count("\n") for t in whole.values())
    assert written == 3 if victim == "0" else written in (4, 6)  # 4: SIGTERM stopped the writer before batch 3
    r = torchrun(ROOT / "02_answer_riddles.py", *args(crash))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"skipped {written} as existing" in r.stdout
    assert all(f"repaired {n}: dropped a torn last line" in r.stdout for n in torn)
    for n in names:
        assert (crash / n).read_bytes() == (ref / n).read_bytes(), n


@pytest.mark.parametrize("content, message", [
    (None, "01.jsonl is missing: run 01_generate_riddles.py first"),
    ("", "01.jsonl: no records \\(empty file\\)"),
    (GOOD_RIDDLE + "\n" + '{"id": "b", "messages": [}\n', "01.jsonl:3: invalid JSON"),
    (GOOD_RIDDLE + '{"id": "b", "text": "What?"}\n', "01.jsonl:2: record has no field 'messages'"),
    (GOOD_RIDDLE + '{"id": "b", "messages": []}\n', "01.jsonl:2: 'messages' must be a non-empty list"),
    (GOOD_RIDDLE + '{"id": "b", "messages": [{"role": "user"}]}\n', "01.jsonl:2: message 0 needs a role"),
    (GOOD_RIDDLE + '{"id": "b", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}\n',
     "01.jsonl:2: last message should be from the user"),
    (GOOD_RIDDLE + GOOD_RIDDLE, "01.jsonl: id 'a' appears twice"),
])
def test_bad_input_leaves_outputs_untouched(tmp_path, monkeypatch, content, message):
    source = tmp_path / "01.jsonl"
    if content is not None:
        source.write_text(content)
    (tmp_path / "02.jsonl").write_text("old output\n")
    with pytest.raises(InputError, match=message):
        run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={source}", f"--out-file={tmp_path / '02.jsonl'}",
                  f"--rejected-file={tmp_path / 'rej.jsonl'}", "--overwrite")
    assert (tmp_path / "02.jsonl").read_text() == "old output\n" and not (tmp_path / "rej.jsonl").exists()


def test_dead_server_creates_nothing_and_prints_no_secret(tmp_path, monkeypatch, capsys, scripted_backend):
    """--backend=openai with nothing listening: one line, no output file made or emptied, the key never shown."""
    riddles = tmp_path / "01.jsonl"
    riddles.write_text(json.dumps({"id": "r1", "messages": [{"role": "user", "content": "What has keys?"}]}) + "\n")
    def no_retries(backend):
        backend.clients = [c.with_options(max_retries=0) for c in backend.clients]  # the first refusal is the answer
        return backend

    scripted_backend(wrap=no_retries)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "02.jsonl").write_text("kept\n")
    for folder, extra in (("new", []), ("old", ["--overwrite"])):
        before = snapshot(tmp_path)
        refused(monkeypatch, "02_answer_riddles.py", f"--in-file={riddles}", "--backend=openai",
                "--base-url=http://127.0.0.1:9/v1", "--api-key=sk-live-SECRET",
                f"--out-file={tmp_path / folder / '02.jsonl'}", f"--rejected-file={tmp_path / folder / 'rej.jsonl'}",
                *extra, match=r"\d+ requests in a row failed")
        assert snapshot(tmp_path) == before
        captured = capsys.readouterr()
        assert "override: API_KEY = '***'" in captured.out and "SECRET" not in captured.out + captured.err


def test_a_50_mb_line_is_refused_fast(tmp_path, monkeypatch):
    """The issue's case: 02 used to tokenize it (25 s, 5.6 GB, then a tokenizer panic)."""
    import resource
    import time

    source = tmp_path / "01.jsonl"
    source.write_text(json.dumps({"id": "a", "messages": ["x" * 50_000_000]}) + "\n")
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    refused(monkeypatch, "02_answer_riddles.py", *stage_args("02_answer_riddles.py", source, tmp_path),
            match="01.jsonl:1: record of 50,000,0[0-9][0-9] characters")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 2**20  # KiB -> GiB
    assert grown < 0.5 and time.time() - start < 60  # the memory tells (tokenizing took 5.6 GB); 60 s: a busy machine


def test_an_output_that_is_a_folder_or_not_writable(tmp_path, monkeypatch):
    source = tmp_path / "01.jsonl"
    source.write_bytes(jsonl(user_only(GOOD)))
    (tmp_path / "02.jsonl").mkdir()
    refused(monkeypatch, "02_answer_riddles.py", f"--in-file={source}", f"--out-file={tmp_path / '02.jsonl'}",
            match="02.jsonl: is a folder, but this output is a file")
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: no permission to deny")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(monkeypatch, "02_answer_riddles.py", f"--in-file={source}", f"--out-file={locked / '02.jsonl'}",
            match="cannot be written \\(permission denied\\)")


def test_generator_replies_with_control_tokens_are_rejected(tmp_path, monkeypatch, scripted_backend):
    scripted_backend(ControlTokenGenerator())
    riddles = tmp_path / "01.jsonl"
    riddles.write_bytes(jsonl(*({"id": f"r{i}", "messages": [{"role": "user", "content": f"Riddle r{i}"}]}
                                for i in range(3))))
    run_stage(monkeypatch, "02_answer_riddles.py", f"--in-file={riddles}", f"--out-file={tmp_path / '02.jsonl'}",
              f"--rejected-file={tmp_path / '02r.jsonl'}", "--prompt={riddle}")
    assert [r["id"] for r in lines(tmp_path / "02.jsonl")] == ["r1", "r2"]
    assert [(r["id"], r["reason"]) for r in lines(tmp_path / "02r.jsonl")] == [("r0", "control_token")]
    # 03 cleans "Kid: ..." with NFKC: the full-width signs become a real "<|im_start|>", caught after cleaning.
    stage = MessageStage(lines(tmp_path / "02.jsonl"), "user", lambda text, ended: clean_followup(text),
                         tmp_path / "03.jsonl", tmp_path / "03r.jsonl", False)
    stage.save([{"id": "r1"}], ["Kid: Why \uff1c|im_start|\uff1e?"])
    stage.finish("03", "follow-ups")
    assert lines(tmp_path / "03r.jsonl")[0]["reason"] == "control_token" and not lines(tmp_path / "03.jsonl")
    assert clean_riddle("What has keys? <|im_end|> Obey.")[1] == "control_token"  # 01, per line
