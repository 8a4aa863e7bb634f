"""IFEval-style instructions: each kind satisfied and violated, strict vs loose, malformed records."""

import pytest

from megaprorl.rewards import RewardConfig, score_one
from megaprorl.rewards.ifeval import CHECKERS, check_instructions

CFG = RewardConfig()

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", "An apple only."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     "cat cat cat", "cat cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A good day.", "A Bad day."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "zigzag", "zag"),
    ("language:response_language", {"language": "en"},
     "This is clearly an English sentence about the weather today.",
     "Ceci est clairement une phrase en français sur le temps qu'il fait aujourd'hui."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", "One. Two. Three. Four."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Para one.\n***\nPara two.", "Just one."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First para.\n\nThen the second.", "First para.\n\nAfter that."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
     "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. bye", "Hello. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one*"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title\ntext"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", "Hi!"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY nice", "This is nice"),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITAL LETTERS OF THE ENGLISH LANGUAGE.",
     "This is not all capitals."),
    ("change_case:english_lowercase", {}, "this is all in lowercase letters of the english language.",
     "This is Not lowercase."),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
    ("startend:quotation", {}, '"Quoted text."', "Not quoted."),
]


def test_every_checker_has_a_case():
    assert {c[0] for c in CASES} == set(CHECKERS)


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction(iid, kwargs, good, bad):
    if iid == "language:response_language":
        pytest.importorskip("langdetect")
    rec = {"domain": "ifeval", "prompt": "p", "instruction_id_list": [iid], "kwargs": [kwargs]}
    g = score_one(rec, good, CFG)
    b = score_one(rec, bad, CFG)
    assert g.error is None and g.reward == 1.0, (g, good)
    assert b.error is None and b.reward == 0.0, (b, bad)


def test_fraction_satisfied_and_hf_null_kwargs():
    rec = {"domain": "ifeval", "prompt": "p",
           "instruction_id_list": ["punctuation:no_comma", "detectable_format:title", "startend:quotation"],
           "kwargs": [{"num_words": None}, {}, {"end_phrase": None}]}
    res = score_one(rec, "<<T>> no comma here", CFG)
    assert res.reward == pytest.approx(2 / 3)
    assert res.parts["followed"] == [True, True, False]


def test_strict_vs_loose():
    rec = {"domain": "ifeval", "prompt": "p", "instruction_id_list": ["startend:end_checker"],
           "kwargs": [{"end_phrase": "Is there anything else?"}]}
    resp = "Sure.\nIs there anything else?\nHope this helps!"
    assert score_one(rec, resp, CFG).reward == 0.0
    assert score_one(rec, resp, RewardConfig(ifeval_mode="loose")).reward == 1.0
    assert score_one(dict(rec, ifeval_mode="loose"), resp, CFG).reward == 1.0
    res = check_instructions({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "**bold**, text")
    assert res["strict"] == [False]


def test_malformed_records_and_empty_response():
    assert score_one({"domain": "ifeval", "instruction_id_list": ["nope:nope"], "kwargs": [{}]}, "x", CFG).error
    assert score_one({"domain": "ifeval", "instruction_id_list": [], "kwargs": []}, "x", CFG).error
    assert score_one({"domain": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]},
                     "x", CFG).error
    res = score_one({"domain": "ifeval", "instruction_id_list": ["length_constraints:number_words"],
                     "kwargs": [{}]}, "x", CFG)
    assert res.error and "num_words" in res.error
    # an empty response follows nothing, not even "no comma"
    assert score_one({"domain": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
                     "", CFG).reward == 0.0


def test_adversarial_json_and_kwargs_as_text():
    rec = {"domain": "ifeval", "instruction_id_list": ["detectable_format:json_format"], "kwargs": "[{}]"}
    assert score_one(rec, "[" * 5000, CFG).reward == 0.0
    assert score_one(rec, '{"ok": true}', CFG).reward == 1.0
