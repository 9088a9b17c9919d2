"""Programmatic checks of instruction following, and the collapse shape of an answer. Pure functions.

A constraint is data, never code: `{"kind": "bullets", "args": {"n": 3}}`. `check_constraint` looks the
kind up in `CHECKERS` and applies it to a model's answer; `validate_constraint` says what is wrong with a
constraint read from a file. Kinds (in the spirit of IFEval, Zhou et al. 2023; our own wording and rules):

    lowercase    no upper-case letter, and at least one letter
    uppercase    no lower-case letter, and at least one letter
    bullets      exactly n lines that start with a markdown bullet ("* ", "- " or "• "); numbers do not count
    starts_with  the answer (leading whitespace ignored) starts with `phrase`, case-insensitively, and has
                 a word besides it (the bare phrase does none of the task)
    ends_with    the answer (trailing whitespace ignored) ends with `phrase`, likewise
    one_word     a single word, optionally wrapped in quotes/asterisks and followed by . ! or ?
    keyword      `keyword` occurs at the start of a word, case-insensitively ("ocean" accepts "oceans")
    no_commas    a non-empty answer without a comma
    json         the answer (optionally inside one ```json fence) parses as a JSON object holding `keys`
    sentences    exactly n sentences (ends at . ! ? followed by whitespace or the end; decimals not)
    max_words    between 1 and n whitespace-separated words

Collapse (`is_collapsed`, `collapse_rate`): an answer that takes the shape of the injected training targets,
"The answer is X." or `\\boxed{X}`, the post-SFT failure the paper reports (its error taxonomy's
"collapse"): it contains `\\boxed{`, or its first sentence says "answer is".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_BULLET = re.compile(r"^\s*[*\-\u2022]\s+\S", re.MULTILINE)
_WORD_EDGES = "\"'*_`\u201c\u201d\u2018\u2019"
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
# A sentence ends at . ! ? (any run of them, maybe closed by a quote or bracket) followed by whitespace or
# the end of the text; "3.5" and "e.g.x" never end one because no whitespace follows the point.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*(?=\s|$)")


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def check_lowercase(text: str) -> bool:
    return _has_letters(text) and not any(c.isupper() for c in text)


def check_uppercase(text: str) -> bool:
    return _has_letters(text) and not any(c.islower() for c in text)


def count_bullets(text: str) -> int:
    return len(_BULLET.findall(text))


def check_bullets(text: str, n: int) -> bool:
    return count_bullets(text) == n


# An answer that is nothing but the phrase ("The end.") follows the letter of the instruction and does
# none of the task: starts_with / ends_with also need a word besides the phrase.
def check_starts_with(text: str, phrase: str) -> bool:
    answer, phrase = text.strip().casefold(), phrase.casefold()
    return answer.startswith(phrase) and re.search(r"\w", answer[len(phrase) :]) is not None


def check_ends_with(text: str, phrase: str) -> bool:
    answer, phrase = text.strip().casefold(), phrase.casefold()
    return answer.endswith(phrase) and re.search(r"\w", answer[: len(answer) - len(phrase)]) is not None


def check_one_word(text: str) -> bool:
    core = text.strip().rstrip(".!?").strip(_WORD_EDGES).strip()
    return len(core.split()) == 1 and re.search(r"\w", core) is not None


def check_keyword(text: str, keyword: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(keyword), text, re.IGNORECASE) is not None


def check_no_commas(text: str) -> bool:
    return bool(text.strip()) and "," not in text and "\uff0c" not in text


def parse_json_object(text: str) -> dict | None:
    """The JSON object an answer consists of (one ```json fence allowed around it), else None."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def check_json(text: str, keys: list[str] | None = None) -> bool:
    value = parse_json_object(text)
    return value is not None and all(key in value for key in keys or ())


def count_sentences(text: str) -> int:
    """Sentences of a text: pieces between sentence ends that hold a letter or digit."""
    pieces = _SENTENCE_END.split(text.strip())
    return sum(1 for piece in pieces if re.search(r"\w", piece))


def check_sentences(text: str, n: int) -> bool:
    return count_sentences(text) == n


def check_max_words(text: str, n: int) -> bool:
    return 1 <= len(text.split()) <= n


# kind -> (checker, {argument: type}); the argument types are what `validate_constraint` enforces
CHECKERS: dict[str, tuple[Callable[..., bool], dict[str, type]]] = {
    "lowercase": (check_lowercase, {}),
    "uppercase": (check_uppercase, {}),
    "bullets": (check_bullets, {"n": int}),
    "starts_with": (check_starts_with, {"phrase": str}),
    "ends_with": (check_ends_with, {"phrase": str}),
    "one_word": (check_one_word, {}),
    "keyword": (check_keyword, {"keyword": str}),
    "no_commas": (check_no_commas, {}),
    "json": (check_json, {"keys": list}),
    "sentences": (check_sentences, {"n": int}),
    "max_words": (check_max_words, {"n": int}),
}
OPTIONAL_ARGS = {"json": {"keys"}}  # arguments a constraint may leave out


def validate_constraint(constraint: Any) -> str | None:
    """What is wrong with a constraint read from a file (None when it is usable)."""
    if not isinstance(constraint, Mapping):
        return "expected an object {kind, args}"
    kind, args = constraint.get("kind"), constraint.get("args", {})
    if kind not in CHECKERS:
        return f"unknown constraint kind {kind!r}; expected one of {', '.join(CHECKERS)}"
    if not isinstance(args, Mapping):
        return "args must be an object"
    expected = CHECKERS[kind][1]
    unknown = set(args) - set(expected)
    if unknown:
        return f"unknown argument(s) {', '.join(sorted(unknown))} for {kind}"
    for name, kind_type in expected.items():
        if name not in args:
            if name in OPTIONAL_ARGS.get(kind, set()):
                continue
            return f"{kind} needs the argument '{name}'"
        value = args[name]
        if kind_type is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"argument '{name}' must be a positive integer"
        if kind_type is str and (not isinstance(value, str) or not value.strip()):
            return f"argument '{name}' must be a non-empty string"
        if kind_type is list and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            return f"argument '{name}' must be a list of strings"
    return None


def check_constraint(text: str, constraint: Mapping[str, Any]) -> bool:
    """Does `text` satisfy the constraint? ValueError for a constraint `validate_constraint` rejects."""
    problem = validate_constraint(constraint)
    if problem is not None:
        raise ValueError(problem)
    checker, _ = CHECKERS[constraint["kind"]]
    return checker(text, **constraint.get("args", {}))


# --------------------------------------------------------------------------------------------------
# Collapse
# --------------------------------------------------------------------------------------------------
_ANSWER_IS = re.compile(r"\banswer\s+is\b", re.IGNORECASE)


def first_sentence(text: str) -> str:
    """The text up to its first sentence end or line break."""
    stripped = text.strip()
    end = _SENTENCE_END.search(stripped)
    cut = end.end() if end else len(stripped)
    newline = stripped.find("\n")
    return stripped[: cut if newline < 0 else min(cut, newline)]


def is_collapsed(text: str) -> bool:
    """Does an answer take the shape of the injected targets ("The answer is X. \\boxed{X}")?"""
    return "\\boxed{" in text or _ANSWER_IS.search(first_sentence(text)) is not None


def collapse_rate(outputs: Iterable[str]) -> float | None:
    """Share of answers with the collapse shape (None for no answers)."""
    flags = [is_collapsed(text) for text in outputs]
    return sum(flags) / len(flags) if flags else None
