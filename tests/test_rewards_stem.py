"""STEM multiple-choice verifier."""

import pytest

from megaprorl.rewards import RewardConfig, score_one

CFG = RewardConfig()
REC = {"domain": "stem", "answer": "C", "choices": ["iron", "copper", "gold", "zinc"]}


def r(resp, rec=REC):
    return score_one(rec, resp, CFG)


@pytest.mark.parametrize("resp", [
    "\\boxed{C}",
    "The answer is (C).",
    "Answer: C",
    "<answer>C</answer>",
    "**Final answer: C**",
    "After checking each option, the correct option is C because gold is inert.",
    "Reasoning ...\n(C)",
    "\\boxed{\\text{C}}",
    "\\boxed{gold}",
])
def test_correct(resp):
    res = r(resp)
    assert res.error is None and res.reward == 1.0, res


def test_answer_buried_in_reasoning():
    resp = ("Let's consider A: iron rusts, so A is out. B: copper forms a patina, so B is unlikely. "
            "D: zinc corrodes. One might think the answer is B at first glance, but reconsidering, "
            "the answer is C. Double-checking with the reactivity series confirms it.")
    assert r(resp).reward == 1.0
    resp2 = resp.replace("the answer is C", "the answer is D")
    assert r(resp2).reward == 0.0


@pytest.mark.parametrize("resp", [
    "The answer is (B).",
    "\\boxed{D}",
    "I am not sure.",
    "",
    "The answer is a metal.",  # article, not a label
])
def test_wrong_or_missing(resp):
    assert r(resp).reward == 0.0


@pytest.mark.parametrize("resp", [
    "The answer is A or C",
    "\\boxed{AC}",
    "\\boxed{A, B, C, D}",
    "Answer: A, B, C and D",
    "<answer>C or D</answer>",
])
def test_hedging_scores_zero(resp):
    res = r(resp)
    assert res.reward == 0.0
    assert res.parts.get("ambiguous") or not res.parts.get("extracted")


def test_index_answer_and_dict_choices():
    assert r("The answer is B", {"domain": "stem", "answer": 1, "choices": ["x", "y"]}).reward == 1.0
    assert r("\\boxed{B}", {"domain": "stem", "answer": "b", "choices": {"A": "x", "B": "y"}}).reward == 1.0


def test_malformed_records():
    assert score_one({"domain": "stem"}, "\\boxed{A}", CFG).error
    assert score_one({"domain": "stem", "answer": "Q", "choices": ["a", "b"]}, "\\boxed{A}", CFG).error
    assert score_one({"domain": "stem", "answer": 7, "choices": ["a", "b"]}, "\\boxed{A}", CFG).error
