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


# the instruction registry of google-research/instruction_following_eval (IFEval's 25 kinds)
IFEVAL_KINDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences",
    "length_constraints:number_paragraphs", "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word", "detectable_content:number_placeholders",
    "detectable_content:postscript", "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title",
    "combination:two_responses", "combination:repeat_prompt", "startend:end_checker",
    "change_case:capital_word_frequency", "change_case:english_capital", "change_case:english_lowercase",
    "punctuation:no_comma", "startend:quotation",
}


def test_registry_is_ifevals():
    assert len(IFEVAL_KINDS) == 25
    assert set(CHECKERS) == IFEVAL_KINDS


def _strict(iid, kwargs, response):
    return check_instructions({"instruction_id_list": [iid], "kwargs": [kwargs]}, response)["strict"][0]


# relation semantics at the threshold: "less than" is count < n, "at least" is count >= n
@pytest.mark.parametrize("iid,kwargs,n_key,rel_key,at_n", [
    ("length_constraints:number_words", {}, "num_words", "relation", "w1 w2 w3"),
    ("length_constraints:number_sentences", {}, "num_sentences", "relation", "One. Two. Three."),
    ("keywords:frequency", {"keyword": "cat"}, "frequency", "relation", "cat, Cat and CAT"),
    ("keywords:letter_frequency", {"letter": "q"}, "let_frequency", "let_relation", "Qaq qa"),
    ("change_case:capital_word_frequency", {}, "capital_frequency", "capital_relation", "ONE two THREE FOUR five"),
])
def test_relations_at_the_threshold(iid, kwargs, n_key, rel_key, at_n):
    for n, less, atleast in ((3, False, True), (4, True, False), (2, False, True)):
        assert _strict(iid, dict(kwargs, **{n_key: n, rel_key: "less than"}), at_n) is less, (n, "less than")
        assert _strict(iid, dict(kwargs, **{n_key: n, rel_key: "at least"}), at_n) is atleast, (n, "at least")


def test_counting_rules_as_ifeval():
    words = "length_constraints:number_words"
    # words are \w+ runs: "don't" is two, "state-of-the-art" four, "3.14" two
    assert _strict(words, {"num_words": 8, "relation": "at least"}, "don't state-of-the-art 3.14")
    assert not _strict(words, {"num_words": 9, "relation": "at least"}, "don't state-of-the-art 3.14")
    caps = "change_case:capital_word_frequency"
    # as NLTK's word_tokenize: a hyphenated word is one token, a contraction two
    assert _strict(caps, {"capital_frequency": 2, "capital_relation": "less than"}, "a STATE-OF-THE-ART idea")
    assert _strict(caps, {"capital_frequency": 2, "capital_relation": "at least"}, "I DON'T")
    # keywords and letters: case-insensitive substrings (IFEval's re.search / Counter)
    assert _strict("keywords:frequency", {"keyword": " cat ", "frequency": 2, "relation": "at least"}, "Cats cat")
    assert _strict("keywords:letter_frequency", {"letter": " A", "let_frequency": 3, "let_relation": "at least"},
                   "Banana")
    assert _strict("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "Cats are fine")  # whole words only
    # paragraphs "***": empty ones only at the ends; sections: the splitter then a number
    assert _strict("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA\n***\nB\n***")
    assert not _strict("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB")
    assert _strict("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
                   "SECTION 1 a SECTION 2 b")
    # bullets: "* " or "-" lines, exactly; "**bold**" lines are not bullets
    assert _strict("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Title**\n* a\n- b")
    # highlights: *x* and **x** each count once
    assert _strict("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**")
    assert not _strict("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** text")
    # postscript markers
    assert _strict("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\n\nP.P.S. more")
    assert not _strict("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\n\nP.S. more")


def test_nth_paragraph_first_word_as_ifeval():
    iid = "length_constraints:nth_paragraph_first_word"
    kw = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}
    assert _strict(iid, kw, 'First.\n\n"Then," he said.')      # leading quote and punctuation dropped
    assert not _strict(iid, kw, "First.\n\n**Then** more.")       # markdown is part of the word (strict)
    rec = {"instruction_id_list": [iid], "kwargs": [kw]}
    assert check_instructions(rec, "First.\n\n**Then** more.")["loose"] == [True]  # '*' removed
    assert not _strict(iid, kw, "First.\n\nThen.\n\nThird.")         # three paragraphs
    # the count leaves empty paragraphs out, but the nth is taken from the raw split
    assert not _strict(iid, dict(kw, nth_paragraph=1, first_word="first"), "\n\nFirst.\n\nThen.")
    assert _strict(iid, kw, "First.\n\nThen.\n\n")


def test_language_checks_follow_ifeval_on_undetectable_text():
    pytest.importorskip("langdetect")
    # IFEval counts text langdetect cannot classify as following the language instruction
    assert _strict("language:response_language", {"language": "fr"}, "12345 !!!")
    assert not _strict("language:response_language", {"language": "fr"},
                       "This is clearly an English sentence about the weather today.")
    assert not _strict("change_case:english_lowercase", {},
                       "ceci est clairement une phrase en français sur le temps qu'il fait aujourd'hui.")


@pytest.mark.parametrize("response", [
    "Sure, here it is:\nno commas here",       # first line removed
    "no commas here\nHope this helps, bye!",  # last line removed
    "Sure, here:\nno commas here\nBye, bye",  # both removed
])
def test_loose_variants_drop_first_last_or_both_lines(response):
    rec = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    res = check_instructions(rec, response)
    assert res["strict"] == [False] and res["loose"] == [True]


def test_loose_variants_remove_asterisks_and_need_a_nonempty_variant():
    rec = {"instruction_id_list": ["startend:quotation"], "kwargs": [{}]}
    assert check_instructions(rec, '**"Quoted"**') == {"ids": ["startend:quotation"], "strict": [False],
                                                       "loose": [True], "skipped": []}
    rec = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert check_instructions(rec, "a, b")["loose"] == [False]  # the only line: its removal leaves nothing
    assert check_instructions(rec, "a, b\nc, d")["loose"] == [False]
