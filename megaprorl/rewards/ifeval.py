"""IFEval-style verifiable instructions (reward = fraction of instructions followed).

Record fields (the google/IFEval layout): ``instruction_id_list`` (e.g.
``["punctuation:no_comma", "length_constraints:number_words"]``) and ``kwargs`` (a list of dicts,
one per instruction; ``None`` values are ignored), plus ``prompt`` (needed only by
``combination:repeat_prompt`` when its ``prompt_to_repeat`` is absent). Optional
``ifeval_mode``: ``"strict"`` or ``"loose"`` overrides the config.

Strict: the instruction holds for the response as is. Loose (as in IFEval): it holds for any of
the response variants with the first line, the last line or both removed, each with and without
``*`` characters. The checkers re-implement the 25 IFEval instruction kinds of
google-research/instruction_following_eval (``instructions.py``) with the same semantics, except
that NLTK (whose punkt data is downloaded at run time) is not used: words are ``\\w+`` runs (as
IFEval's ``count_words``), sentences split at ``.!?`` (abbreviation aware; IFEval uses punkt),
and ``change_case:capital_word_frequency`` tokenizes hyphenated and dotted words as one (as
NLTK's ``word_tokenize``). Keywords, forbidden words, section splitters and postscript markers
are matched literally (IFEval uses them as regular expressions: the same for plain words).
``language:response_language`` and the English check of ``change_case:english_*`` use
``langdetect`` when installed (text langdetect cannot classify counts as followed, as in IFEval);
without it the language instruction is skipped (left out of the fraction, listed in
``parts["skipped"]``) and the English check of ``change_case:*`` is not made.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from .base import RewardConfig, register_verifier

_RELATIONS = ("less than", "at least")


def _rel(count: int, n: int, relation: str) -> bool:
    relation = (relation or "at least").strip().lower()
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"unknown relation {relation!r} (expected one of {_RELATIONS})")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_ABBREV = r"(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co|No|Fig|approx|U\.S)"


def split_sentences(text: str) -> List[str]:
    t = " " + text.replace("\n", " ") + " "
    t = re.sub(r"\b(" + _ABBREV + r")\.", lambda m: m.group(1).replace(".", "<prd>") + "<prd>", t)
    t = re.sub(r"(\d)\.(\d)", r"\1<prd>\2", t)
    t = re.sub(r"\b([A-Z])\.(?=\s*[A-Z]\.)", r"\1<prd>", t)
    t = re.sub(r"([.!?]+[\"”')\]]*)\s+", r"\1<stop>", t)
    out = [s.replace("<prd>", ".").strip() for s in t.split("<stop>")]
    return [s for s in out if s and re.search(r"\w", s)]


UNDETECTABLE = "?"


def _langdetect(text: str) -> Optional[str]:
    """ISO 639-1 code of ``text``; None without langdetect; UNDETECTABLE when langdetect cannot
    tell (no features: digits, symbols), which IFEval counts as the instruction followed."""
    try:
        import langdetect
        from langdetect import DetectorFactory
    except ImportError:
        return None
    DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except Exception:  # noqa: BLE001 - LangDetectException on text without features
        return UNDETECTABLE


class Skip(Exception):
    """The instruction cannot be checked here (missing optional dependency)."""


def _kw(kwargs: Dict[str, Any], name: str, default: Any = None, required: bool = True) -> Any:
    v = kwargs.get(name)
    if v is None:
        if required and default is None:
            raise ValueError(f"missing argument {name!r}")
        return default
    return v


# ----------------------------------------------------------------------------------- checkers
def c_keywords_existence(r: str, kw: Dict[str, Any]) -> bool:
    return all(re.search(re.escape(str(k)), r, flags=re.IGNORECASE) for k in _kw(kw, "keywords"))


def c_keywords_frequency(r: str, kw: Dict[str, Any]) -> bool:
    k = str(_kw(kw, "keyword")).strip()
    n = len(re.findall(re.escape(k), r, flags=re.IGNORECASE))
    return _rel(n, int(_kw(kw, "frequency")), _kw(kw, "relation", "at least"))


def c_forbidden_words(r: str, kw: Dict[str, Any]) -> bool:
    return not any(re.search(r"\b" + re.escape(str(w)) + r"\b", r, flags=re.IGNORECASE)
                   for w in _kw(kw, "forbidden_words"))


def c_letter_frequency(r: str, kw: Dict[str, Any]) -> bool:
    letter = str(_kw(kw, "letter")).strip().lower()
    if len(letter) != 1:
        raise ValueError(f"'letter' must be a single character, got {letter!r}")
    n = r.lower().count(letter)
    return _rel(n, int(_kw(kw, "let_frequency")), _kw(kw, "let_relation", "at least"))


def c_response_language(r: str, kw: Dict[str, Any]) -> bool:
    lang = _langdetect(r)
    if lang is None:
        raise Skip("langdetect not installed")
    return lang == UNDETECTABLE or lang == str(_kw(kw, "language"))


def c_number_sentences(r: str, kw: Dict[str, Any]) -> bool:
    return _rel(len(split_sentences(r)), int(_kw(kw, "num_sentences")), _kw(kw, "relation", "at least"))


def c_number_paragraphs(r: str, kw: Dict[str, Any]) -> bool:
    paras = re.split(r"\s?\*\*\*\s?", r)
    n = len(paras)
    for i, p in enumerate(paras):
        if not p.strip():
            if i == 0 or i == len(paras) - 1:
                n -= 1
            else:
                return False
    return n == int(_kw(kw, "num_paragraphs"))


def c_number_words(r: str, kw: Dict[str, Any]) -> bool:
    return _rel(count_words(r), int(_kw(kw, "num_words")), _kw(kw, "relation", "at least"))


def c_nth_paragraph_first_word(r: str, kw: Dict[str, Any]) -> bool:
    # as IFEval: paragraphs split at "\n\n", the count leaves out empty ones but the nth is taken
    # from the raw split (an empty one there fails); the first word is the paragraph's first
    # whitespace token without leading quotes, cut at the first . , ? ! ' or "
    paras = r.split("\n\n")
    num = int(_kw(kw, "num_paragraphs"))
    nth = int(_kw(kw, "nth_paragraph"))
    expected = str(_kw(kw, "first_word")).lower()
    count = sum(1 for p in paras if p.strip())
    if not 1 <= nth <= count:
        return False
    p = paras[nth - 1].strip()
    if not p:
        return False
    word = p.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in '.,?!\'"':
            break
        first += ch.lower()
    return count == num and first == expected


def c_placeholders(r: str, kw: Dict[str, Any]) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= int(_kw(kw, "num_placeholders", 1))


def c_postscript(r: str, kw: Dict[str, Any]) -> bool:
    marker = str(_kw(kw, "postscript_marker", "P.S.")).strip()
    low = r.lower()
    if marker == "P.P.S":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pat, low, flags=re.MULTILINE))


def c_bullet_lists(r: str, kw: Dict[str, Any]) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(_kw(kw, "num_bullets"))


def c_constrained_response(r: str, kw: Dict[str, Any]) -> bool:
    r = r.strip()
    return any(o in r for o in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def c_highlighted_sections(r: str, kw: Dict[str, Any]) -> bool:
    n = 0
    for h in re.findall(r"\*[^\n\*]*\*", r):
        if h.strip("*").strip():
            n += 1
    for h in re.findall(r"\*\*[^\n\*]*\*\*", r):
        if h.removeprefix("**").removesuffix("**").strip():
            n += 1
    return n >= int(_kw(kw, "num_highlights", 1))


def c_multiple_sections(r: str, kw: Dict[str, Any]) -> bool:
    splitter = str(_kw(kw, "section_spliter", "Section")).strip()
    sections = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", r)
    return len(sections) - 1 >= int(_kw(kw, "num_sections"))


def c_json_format(r: str, kw: Dict[str, Any]) -> bool:
    v = r.strip()
    for p in ("```json", "```Json", "```JSON", "```"):  # chained, as IFEval
        v = v.removeprefix(p)
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def c_title(r: str, kw: Dict[str, Any]) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def c_two_responses(r: str, kw: Dict[str, Any]) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i != 0 and i != len(parts) - 1:
                return False
        else:
            valid.append(p.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def c_repeat_prompt(r: str, kw: Dict[str, Any]) -> bool:
    p = str(_kw(kw, "prompt_to_repeat"))
    return r.strip().lower().startswith(p.strip().lower())


def c_end_checker(r: str, kw: Dict[str, Any]) -> bool:
    end = str(_kw(kw, "end_phrase")).strip().lower()
    return r.strip().strip('"').lower().endswith(end)


_CAPS_TOKEN_RE = re.compile(r"\w+(?:[-.]\w+)*")


def c_capital_word_frequency(r: str, kw: Dict[str, Any]) -> bool:
    # IFEval counts NLTK word_tokenize tokens that are all caps: hyphenated/dotted words are one
    # token ("STATE-OF-THE-ART", "U.S"), contractions two ("DO" "N'T")
    n = sum(1 for w in _CAPS_TOKEN_RE.findall(r) if w.isupper())
    return _rel(n, int(_kw(kw, "capital_frequency")), _kw(kw, "capital_relation", "at least"))


def _english(r: str) -> bool:
    lang = _langdetect(r)
    return lang is None or lang in ("en", UNDETECTABLE)


def c_english_capital(r: str, kw: Dict[str, Any]) -> bool:
    return r.isupper() and _english(r)


def c_english_lowercase(r: str, kw: Dict[str, Any]) -> bool:
    return r.islower() and _english(r)


def c_no_comma(r: str, kw: Dict[str, Any]) -> bool:
    return "," not in r


def c_quotation(r: str, kw: Dict[str, Any]) -> bool:
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


CHECKERS: Dict[str, Callable[[str, Dict[str, Any]], bool]] = {
    "keywords:existence": c_keywords_existence,
    "keywords:frequency": c_keywords_frequency,
    "keywords:forbidden_words": c_forbidden_words,
    "keywords:letter_frequency": c_letter_frequency,
    "language:response_language": c_response_language,
    "length_constraints:number_sentences": c_number_sentences,
    "length_constraints:number_paragraphs": c_number_paragraphs,
    "length_constraints:number_words": c_number_words,
    "length_constraints:nth_paragraph_first_word": c_nth_paragraph_first_word,
    "detectable_content:number_placeholders": c_placeholders,
    "detectable_content:postscript": c_postscript,
    "detectable_format:number_bullet_lists": c_bullet_lists,
    "detectable_format:constrained_response": c_constrained_response,
    "detectable_format:number_highlighted_sections": c_highlighted_sections,
    "detectable_format:multiple_sections": c_multiple_sections,
    "detectable_format:json_format": c_json_format,
    "detectable_format:title": c_title,
    "combination:two_responses": c_two_responses,
    "combination:repeat_prompt": c_repeat_prompt,
    "startend:end_checker": c_end_checker,
    "change_case:capital_word_frequency": c_capital_word_frequency,
    "change_case:english_capital": c_english_capital,
    "change_case:english_lowercase": c_english_lowercase,
    "punctuation:no_comma": c_no_comma,
    "startend:quotation": c_quotation,
}


def loose_variants(response: str) -> List[str]:
    lines = response.split("\n")
    first_removed = "\n".join(lines[1:]).strip()
    last_removed = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    base = [response, first_removed, last_removed, both]
    return base + [v.replace("*", "") for v in base]


def check_instructions(record: Dict[str, Any], response: str) -> Dict[str, Any]:
    """Per-instruction strict and loose results: dict(ids, strict, loose, skipped)."""
    ids = record.get("instruction_id_list")
    if not isinstance(ids, list) or not ids:
        raise KeyError("ifeval record needs a non-empty 'instruction_id_list'")
    kwargs_list = record.get("kwargs") or [{} for _ in ids]
    if isinstance(kwargs_list, str):
        kwargs_list = json.loads(kwargs_list)
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise ValueError("ifeval record 'kwargs' must be a list as long as 'instruction_id_list'")
    strict: List[Optional[bool]] = []
    loose: List[Optional[bool]] = []
    skipped: List[str] = []
    variants = loose_variants(response)
    for iid, kw in zip(ids, kwargs_list):
        fn = CHECKERS.get(iid)
        if fn is None:
            raise KeyError(f"unknown IFEval instruction {iid!r}")
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        if iid == "combination:repeat_prompt" and "prompt_to_repeat" not in kw:
            kw["prompt_to_repeat"] = record.get("prompt", "")
        try:
            s = bool(response.strip()) and fn(response, kw)
            lo = s or any(v.strip() and fn(v, kw) for v in variants[1:])
        except Skip as e:
            skipped.append(f"{iid}: {e}")
            strict.append(None)
            loose.append(None)
            continue
        except ValueError as e:
            raise ValueError(f"instruction {iid!r}: {e}") from None
        strict.append(bool(s))
        loose.append(bool(lo))
    return {"ids": ids, "strict": strict, "loose": loose, "skipped": skipped}


def _frac(xs: List[Optional[bool]]) -> float:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else 0.0


def verify_ifeval(record: Dict[str, Any], response: str, cfg: RewardConfig) -> Tuple[float, Dict[str, Any]]:
    mode = (record.get("ifeval_mode") or cfg.ifeval_mode or "strict").lower()
    if mode not in ("strict", "loose"):
        raise ValueError(f"ifeval_mode must be 'strict' or 'loose', got {mode!r}")
    res = check_instructions(record, response)
    parts: Dict[str, Any] = {
        "mode": mode,
        "strict": _frac(res["strict"]),
        "loose": _frac(res["loose"]),
        "followed": res[mode],
    }
    if res["skipped"]:
        parts["skipped"] = res["skipped"]
        if all(x is None for x in res[mode]):
            raise RuntimeError("no instruction could be checked: " + "; ".join(res["skipped"]))
    return parts[mode], parts


register_verifier("ifeval", verify_ifeval)
