"""Logic puzzles: Reasoning Gym's own scorer."""

import pytest

from megaprorl.data.sources import ReasoningGymSource
from megaprorl.rewards import RewardConfig, score_one

CFG = RewardConfig()


@pytest.mark.parametrize("task", ["leg_counting", "basic_arithmetic", "word_sorting", "letter_counting",
                                  "spell_backward"])
def test_correct_and_wrong(task):
    src = ReasoningGymSource(task, size=5, seed=3)
    for rec in src.sample(3):
        gold = rec["entry"]["answer"]
        good = score_one(rec, f"Thinking...\n<answer>{gold}</answer>", CFG)
        assert good.error is None and good.reward == 1.0, (task, gold, good)
        bad = score_one(rec, "<answer>definitely not it 123</answer>", CFG)
        assert bad.error is None and bad.reward < 1.0


def test_last_answer_tag_and_boxed_fallback():
    rec = ReasoningGymSource("leg_counting", size=2, seed=0).sample(1)[0]
    gold = rec["entry"]["answer"]
    assert score_one(rec, f"<answer>0</answer> wait, <answer>{gold}</answer>", CFG).reward == 1.0
    assert score_one(rec, f"so \\boxed{{{gold}}}", CFG).reward == 1.0
    assert score_one(rec, f"the answer is {gold}", CFG).reward == 0.0  # no tag: not extracted


def test_malformed():
    assert score_one({"domain": "logic", "entry": {"answer": "1"}}, "<answer>1</answer>", CFG).error
    res = score_one({"domain": "logic", "task": "no_such_task_xyz", "entry": {"answer": "1", "metadata": {}}},
                    "<answer>1</answer>", CFG)
    assert res.reward == 0.0 and "no_such_task_xyz" in res.error
    rec = ReasoningGymSource("leg_counting", size=2, seed=0).sample(1)[0]
    assert score_one(rec, "", CFG).reward == 0.0
    assert score_one(rec, "<answer>" + "9" * 10000 + "</answer>", CFG).reward == 0.0
