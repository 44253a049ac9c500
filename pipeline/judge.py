"""Stage 04b's quality gate: the generator's judgement of a finished conversation, read and applied.

parse_judgement reads a reply like "answer: 4 / follow-up: 5 / second answer: 3 / reason: ..."
(markdown, case, numbering, JSON quotes and chatter around it tolerated) into three 1-5 scores
and a reason; JudgeStage writes each judged record to the kept or the rejected file, resumably,
as MessageStage does for 02-04.
"""

import re

from pipeline.message_stage import MessageStage

# The three points, in the order the prompt asks for them; the keys stored under "scores".
POINTS = ("answer", "follow_up", "second_answer")

# A label starts the text, a line, or a part after , ; | . (one-line and JSON replies), so that an echoed
# "Assistant's answer: 4 legs" is not read as a score. Longer labels come first: "follow-up answer" and
# "answer 2" are the second answer, not the answer or the follow-up.
_LABELS = {
    "second_answer": r"second[\s_-]*answer|2nd[\s_-]*answer|answer[\s_-]*(?:2|two)|follow[\s_-]*up[\s_-]*answer",
    "follow_up": r"(?:child'?s[\s_-]*)?follow[\s_-]*up(?:[\s_-]*question)?|(?:child'?s[\s_-]*)?question",
    "answer": r"(?:first[\s_-]*|1st[\s_-]*)?answer(?:[\s_-]*1)?",
}
_START = r"(?:^|[,;|.]\s*)[\[{(]?\s*[\"']?"
_SEP = r"[\"']?\s*(?:\([^)\n]{0,60}\)\s*)?(?:score|rating)?\s*[:=\-\u2013]\s*"
_VALUE = r"[\"'\[(]?(?P<score>[1-5])(?:\.0)?(?:\s*(?:/|out\s+of)\s*5)?(?![\d.]*\d)"  # 4, "4", [4], 4/5, 4.0
_SCORE = {key: re.compile(_START + r"(?P<label>" + label + r")" + _SEP + _VALUE, re.I | re.M)
          for key, label in _LABELS.items()}
_REASON = re.compile(_START + r"(?:reasons?|explanation|justification|why|comments?)" + _SEP, re.I | re.M)
_MARKUP = re.compile(r"\*\*?|`|__|^\s*#+\s*|^\s*(?:[-+\u2022]|\d{1,2}[.)])\s+", re.M)


def parse_judgement(text):
    """A judge's reply -> ({"answer", "follow_up", "second_answer": 1-5}, reason), or None when any
    score is missing or outside 1-5. The first score of each point counts; the reason ("" if none)
    runs from its label to the next score label or the end."""
    text = _MARKUP.sub("", text)
    found = {key: pattern.search(text) for key, pattern in _SCORE.items()}
    if not all(found.values()):
        return None
    scores = {key: int(found[key].group("score")) for key in POINTS}
    reason = ""
    label = _REASON.search(text)
    if label:
        later = [m.start("label") for p in _SCORE.values() for m in p.finditer(text, label.end())]
        reason = " ".join(text[label.end():min(later, default=len(text))].split()).strip("\"',;|{}[ ")
    return scores, reason


def overall(scores):
    """The conversation's score: the lowest of the three, as a conversation is only as good as its worst
    part (a wrong answer is wrong training data however good the follow-up; a mean would hide it)."""
    return min(scores.values())


class JudgeStage(MessageStage):
    """Write each judged record: score >= min_score to out_file as the record plus "judge", the rest to
    rejected_file as {"id", "reason", "text", ...}: "low_score" (with score, scores, judge_reason) or
    "unparsed". Resume as MessageStage: ids in either file are done; a failed request (None) is retried."""

    def __init__(self, records, min_score, out_file, rejected_file, overwrite):
        super().__init__(records, None, None, out_file, rejected_file, overwrite)
        self.min_score, self.scores = min_score, []

    def verdict(self, job, reply):
        """One judgement (a Reply) -> (the record plus "judge", None) or (None, the reject)."""
        text = reply.text
        parsed = parse_judgement(text)
        if parsed is None:
            return None, {"id": job["id"], "reason": "unparsed", "text": text}
        scores, reason = parsed
        score = overall(scores)
        self.scores.append(score)
        if score >= self.min_score:
            return dict(self.by_id[job["id"]], judge={"scores": scores, "score": score, "reason": reason}), None
        return None, {"id": job["id"], "reason": "low_score", "score": score, "scores": scores,
                      "judge_reason": reason, "text": text}

    def finish(self, stage):
        """MessageStage's summary line, with the mean score."""
        mean = f"{sum(self.scores) / len(self.scores):.2f}" if self.scores else "-"
        super().finish(stage, "conversations", extra=f"mean score {mean} of {len(self.scores):,} judged, ")
