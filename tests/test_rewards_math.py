"""Math verifier: equivalent forms, wrong answers, malformed input, adversarial responses."""

import pytest

from megaprorl.rewards import RewardConfig, score_one

CFG = RewardConfig()


def r(answer, response):
    return score_one({"domain": "math", "answer": answer}, response, CFG)


@pytest.mark.parametrize("gold,resp", [
    ("\\frac{1}{2}", "So we get \\boxed{0.5}."),
    ("0.5", "The answer is $\\boxed{\\frac{1}{2}}$"),
    ("1/2", "\\boxed{\\dfrac{1}{2}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("[0, 1)", "The final answer is $[0,1)$."),
    ("\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}"),
    ("(x+1)^2", "\\boxed{x^2 + 2x + 1}"),
    ("42", "Long reasoning... 17 ... 23 ... so the final answer is \\boxed{42}"),
    ("$-7$", "\\boxed{-7}"),
    ("\\boxed{10\\%}", "\\boxed{10\\%}"),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}"),
])
def test_equivalent_forms_score_one(gold, resp):
    res = r(gold, resp)
    assert res.error is None, res.error
    assert res.reward == 1.0, res


@pytest.mark.parametrize("gold,resp", [
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("[0, 1)", "\\boxed{[0, 1]}"),
    ("\\{1, 2, 3\\}", "\\boxed{\\{1, 2\\}}"),
    ("3", "\\boxed{4}"),
    ("3", "I do not know."),
    ("3", ""),
])
def test_wrong_answers_score_zero(gold, resp):
    res = r(gold, resp)
    assert res.reward == 0.0
    assert res.error is None


def test_last_boxed_wins():
    assert r("5", "First guess \\boxed{3}, but correcting: \\boxed{5}").reward == 1.0
    assert r("3", "First guess \\boxed{3}, but correcting: \\boxed{5}").reward == 0.0


def test_without_a_box_the_last_final_answer_phrase_wins():
    resp = "Answer: 7\n\nWait, I added wrong. The final answer is 8."
    assert r("8", resp).reward == 1.0 and r("7", resp).reward == 0.0  # (math-verify alone took the first)
    assert r("3", "the answer is 2 or 3").reward == 0.0  # a hedge still earns nothing for its second answer


def test_malformed_record_is_an_error_not_an_exception():
    res = score_one({"domain": "math"}, "\\boxed{1}", CFG)
    assert res.reward == 0.0 and "answer" in res.error
    res = score_one({"domain": "math", "answer": ""}, "\\boxed{1}", CFG)
    assert res.reward == 0.0 and res.error
    res = score_one({"domain": "math", "answer": "1"}, None, CFG)
    assert res.reward == 0.0
    res = score_one({"domain": "math", "answer": "1"}, 12345, CFG)
    assert res.reward == 0.0 and "string" in res.error


@pytest.mark.parametrize("resp", [
    "\\boxed{",  # unbalanced
    "\\boxed{\\frac{}{}}",
    "$$$$ \\left( \\right] \\boxed{\\sqrt{}}",
    "\\boxed{" + "(" * 500 + "}",
    "\x00\x01\x02 \\boxed{\ud800}",
])
def test_malformed_responses_score_zero(resp):
    res = r("2", resp)
    assert res.reward == 0.0


def test_hedging_with_many_answers_is_not_rewarded():
    # listing every candidate: only the final boxed answer counts
    assert r("2", "\\boxed{1} \\boxed{2} \\boxed{3} \\boxed{4}").reward == 0.0
    assert r("2", "\\boxed{1, 2, 3, 4}").reward == 0.0


def test_huge_response_is_cut_not_slow():
    import time
    t = time.time()
    res = r("7", "blah " * 200_000 + "\\boxed{7}")
    assert res.reward == 1.0
    assert time.time() - t < 10
