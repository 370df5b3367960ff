"""The gold judgement of ShapesWorld answers on hand-written answers: every question kind, both styles, wrong
answers and garbage; ``grade`` keeps its 1 / 0.5 / 0 values through it."""

from __future__ import annotations

import pytest

from vlrm_rlhf.worlds.gold import Gold, gold_dict, grade, judge
from vlrm_rlhf.worlds.shapes import Obj, Scene, questions

SCENE = Scene(Obj("red", "circle"), Obj("blue", "square"))
QS = {(q.kind, q.question): q for q in questions(SCENE)}

CASES = [  # (kind, question, answer text, correct, style)
    ("colour", "what colour is the circle ?", "the answer is red .", True, True),
    ("colour", "what colour is the circle ?", "uh , maybe red ?", True, False),
    ("colour", "what colour is the circle ?", "the answer is blue .", False, True),
    ("colour", "what colour is the circle ?", "uh , maybe green ?", False, False),
    ("kind", "which shape is blue ?", "the answer is square .", True, True),
    ("kind", "which shape is blue ?", "uh , maybe square ?", True, False),
    ("kind", "which shape is blue ?", "the answer is triangle .", False, True),
    ("count", "how many shapes are there ?", "the answer is two .", True, True),
    ("count", "how many shapes are there ?", "uh , maybe two ?", True, False),
    ("count", "how many shapes are there ?", "the answer is one .", False, True),
    ("side", "what is on the left ?", "the answer is a red circle .", True, True),
    ("side", "what is on the right ?", "uh , maybe a blue square ?", True, False),
    ("side", "what is on the left ?", "the answer is a blue square .", False, True),
    ("side", "what is on the right ?", "uh , maybe no shape there ?", False, False),
    # trailing end-of-sequence marker, as a decoded completion may carry it
    ("colour", "what colour is the square ?", "the answer is blue . <eos>", True, True),
]
GARBAGE = ["", "red", "the answer is", "the answer is red", "answer is red .", "uh , maybe red .",
           "the answer is red ?", "? ? ? ? ?", "the answer is red . extra"]


@pytest.mark.parametrize(("kind", "question", "text", "correct", "style"), CASES)
def test_judge_hand_written(kind, question, text, correct, style):
    qa = QS[(kind, question)]
    g = judge(qa, text)
    assert (g.correct, g.style, g.both) == (correct, style, correct and style)
    assert grade(qa, text) == (1.0 if correct and style else 0.5 if correct else 0.0)
    assert gold_dict(qa, text) == {"correct": float(correct), "style": float(style), "both": float(correct and style),
                                   "quality": grade(qa, text)}


@pytest.mark.parametrize("text", GARBAGE)
def test_garbage_is_neither_correct_nor_in_style(text):
    qa = QS[("colour", "what colour is the circle ?")]
    g = judge(qa, text)
    assert g == Gold(correct=False, style=False) and grade(qa, text) == 0.0


def test_every_kind_covered():
    assert {k for k, *_ in CASES} == {q.kind for q in questions(SCENE)}
    one = Scene(None, Obj("green", "triangle"))
    left = next(q for q in questions(one) if q.question == "what is on the left ?")
    assert judge(left, "the answer is no shape there .").both
    assert not judge(left, "the answer is a green triangle .").correct
