"""Stages 02-04's writer: one generated message appended to each record, resumably.

MessageStage is generate_all's on_batch for 02-04 (and, through judge.JudgeStage, for 04b): each reply
is cleaned and kept as the record's next message, or written to the rejects with its reason; ids in
either file are done, so a rerun skips them; finish prints the stage's summary line.
"""

import time
from collections import Counter
from pathlib import Path

from pipeline.records import Appender, as_reply, control_string, fsync_path, write_failed


class MessageStage:
    """Stages 02-04: append one generated message to each record, resumably.

    clean(text, ended) -> (content, reason), ended as the backend's Reply says (False: cut by
    max_new_tokens, None: unknown): a kept reply becomes the record's next message in out_file,
    a rejected one goes to rejected_file as {"id", "reason", "text"} (also a reply holding a chat
    control string: "control_token"). Ids in either file are done, so a rerun skips them; a
    failed request (None) is retried.
    """

    def __init__(self, records, role, clean, out_file, rejected_file, overwrite):
        self.by_id, self.role, self.clean = {r["id"]: r for r in records}, role, clean
        # --overwrite empties both files at the first write, as one step: the marker stands while they are
        # emptied, and a run that finds it (a kill came in between) starts over too, so no resume mixes two runs.
        self.marker = Path(str(out_file) + ".overwrite")
        self.overwrite = overwrite or self.marker.exists()
        self.out = Appender(out_file, overwrite=self.overwrite)
        self.rejected = Appender(rejected_file, overwrite=self.overwrite)
        self.done = self.out.done | self.rejected.done
        self.skipped = sum(i in self.done for i in self.by_id)
        self.counts, self.start = Counter(), time.time()

    def _write(self, good, bad):
        if self.overwrite and self.out.writer:
            try:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.touch()
                fsync_path(self.marker.parent)
            except OSError as e:
                raise write_failed(self.marker, e) from None
            self.out.open()
            self.rejected.open()
            self.marker.unlink()
            self.overwrite = False
        self.out.write(good)
        self.rejected.write(bad)

    def save(self, batch, replies):
        """generate_all's on_batch: write one finished batch (a Reply or None each) to the two files."""
        good, bad = [], []
        for job, reply in zip(batch, map(as_reply, replies)):
            if reply is None:
                self.counts["failed"] += 1
                continue
            kept, rejected = self.verdict(job, reply)
            if rejected:
                self.counts[rejected["reason"]] += 1
                bad.append(rejected)
            else:
                good.append(kept)
        self._write(good, bad)
        self.counts["kept"] += len(good)

    def verdict(self, job, reply):
        """One Reply -> (the record to keep, None), or (None, the reject {"id", "reason", "text", ...})."""
        text = reply.text
        content, reason = self.clean(text, reply.ended)
        if not reason and control_string(content):
            reason = "control_token"  # as cleaned and stored: NFKC could have made one of full-width signs
        if reason:
            return None, {"id": job["id"], "reason": reason, "text": text}
        # Stripped as read_conversations strips: no turn may start with whitespace (tokenization rule).
        messages = self.by_id[job["id"]]["messages"] + [{"role": self.role, "content": content.strip()}]
        return {"id": job["id"], "messages": messages}, None

    def reject(self, records):
        """Write rejects decided before generation (stage 03's reworded duplicates), except ids already done."""
        fresh = [r for r in records if r["id"] not in self.done]
        self._write([], fresh)
        self.done.update(r["id"] for r in fresh)
        self.counts.update(r["reason"] for r in fresh)

    def finish(self, stage, what, extra=""):
        """Close the files and print the summary line (extra: more of it, before the skipped count); exit 1 if
        requests failed (rerun retries)."""
        self.out.close()
        self.rejected.close()
        kept, failed = self.counts.pop("kept", 0), self.counts.pop("failed", 0)
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.counts.items())) or "none"
        print(f"{stage}: kept {kept:,} {what}, rejected {sum(self.counts.values()):,} ({reasons}), {extra}"
              f"skipped {self.skipped:,} as existing, failed {failed:,}; {len(self.out.done):,} in "
              f"{self.out.file.name}; {time.time() - self.start:.0f}s")
        if failed:
            raise SystemExit(f"{failed:,} requests failed; rerun to retry them")
