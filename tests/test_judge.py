"""pipeline/judge.py: reading a judge's reply into scores and a reason, or nothing.
"""

import pytest

from pipeline.judge import parse_judgement


S = {"answer": 4, "follow_up": 5, "second_answer": 3}


@pytest.mark.parametrize("reply, parsed", [
    ("answer: 4\nfollow-up: 5\nsecond answer: 3\nreason: Right, but the second answer drifts.",
     (S, "Right, but the second answer drifts.")),
    ("**Answer:** 4/5\n**Follow-up question:** 5\n**Second answer:** 3\n**Reason:** fine.", (S, "fine.")),
    ("Sure! Here is my judgement:\n\n1. Answer (right and simple): 4\n2. Follow up: 5 out of 5\n3. Answer 2: 3\n\n"
     "Reason:\nThe riddle is solved.\nThe follow-up is a child's.",
     (S, "The riddle is solved. The follow-up is a child's.")),
    ('{"answer": 4, "follow-up": 5, "second answer": 3, "reason": "all on topic"}', (S, "all on topic")),
    ("ANSWER: 4, FOLLOW-UP: 5, SECOND ANSWER: 3. REASON: ok", (S, "ok")),
    ("### Answer: 4\n- Follow-up answer: 3\n- Child's question: 5", (S, "")),  # no reason: ""
    ("Reason: the follow-up is fine.\nanswer: 4\nfollow_up: 5\nsecond_answer: 3", (S, "the follow-up is fine.")),
    ("answer: `4`\nfollow-up score: [5]\nsecond answer = 3.0\nreason: x\nanswer: 1", (S, "x")),  # the first counts
    ("Answer: 2\nFollow-up: 1\nSecond answer: 5\nReason: wrong answer.",
     ({"answer": 2, "follow_up": 1, "second_answer": 5}, "wrong answer.")),
])
def test_parse_judgement(reply, parsed):
    assert parse_judgement(reply) == parsed


@pytest.mark.parametrize("reply", [
    "", "The answer to the riddle is a piano.",
    "answer: N\nfollow-up: N\nsecond answer: N\nreason: one short sentence",  # the format echoed
    "answer: 4\nfollow-up: 5\nreason: the second answer is missing",
    "answer: 6\nfollow-up: 5\nsecond answer: 3", "answer: 0\nfollow-up: 5\nsecond answer: 3",
    "answer: 10\nfollow-up: 5\nsecond answer: 3", "answer: 4.5\nfollow-up: 5\nsecond answer: 3",
    "Assistant's answer: 4 legs\nfollow-up: 5\nsecond answer: 3",  # an echoed transcript line is no score
])
def test_unparsable_judgements(reply):
    assert parse_judgement(reply) is None
