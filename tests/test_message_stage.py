"""pipeline/message_stage.py: the writer of stages 02-04 (kept and rejected records, --overwrite as one step).
"""

import json
from pathlib import Path

import pytest

from helpers import lines
from pipeline import records, riddles


@pytest.mark.parametrize("kill", ["marker made", "output emptied", "rejects emptied", "marker gone"])
def test_overwrite_killed_before_its_first_record_never_mixes_two_runs(tmp_path, monkeypatch, kill):
    """--overwrite is one step: killed anywhere between clearing and the first new record, a resume without
    --overwrite keeps none of the old run's records beside the new ones."""
    from pipeline.message_stage import MessageStage

    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Riddle {i}?"}]} for i in range(4)]
    out, rej = tmp_path / "02.jsonl", tmp_path / "rej.jsonl"
    out.write_text("".join(json.dumps(dict(r, old=True)) + "\n" for r in recs[:2]))
    rej.write_text(json.dumps({"id": "r2", "reason": "old", "text": "x"}) + "\n")

    class Killed(Exception):
        pass

    def stage(overwrite):
        return MessageStage(recs, "assistant", riddles.clean_answer, out, rej, overwrite)

    real_open = records.Appender.open

    def open_then_die(self):
        if kill == "marker made":
            raise Killed
        real_open(self)
        if self.file == {"output emptied": out, "rejects emptied": rej}.get(kill):
            raise Killed

    def write_dies(self, batch):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(records.Appender, "open", open_then_die)
        if kill == "marker gone":
            m.setattr(records.Appender, "write", write_dies)
        with pytest.raises(Killed):
            stage(overwrite=True).save([{"id": "r0"}], [records.Reply("It is a towel.", True)])
    resumed = stage(overwrite=False)
    assert resumed.skipped == 0  # nothing of the old run counts as done
    resumed.save([{"id": "r3"}, {"id": "r1"}], [records.Reply("It is a clock.", True), records.Reply("Ice", False)])
    resumed.finish("02", "answers")
    assert [r["id"] for r in lines(out)] == ["r3"] and not any("old" in r for r in lines(out))
    assert [(r["id"], r["reason"]) for r in lines(rej)] == [("r1", "unfinished")]
    assert not Path(str(out) + ".overwrite").exists()
