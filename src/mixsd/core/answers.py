"""Answer extraction, normalization and matching: one scorer for every stage.

`mixsd mix` verifies targets with it and `mixsd eval` scores predictions with it, so "correct" means the
same thing everywhere (the reference code used three different scorers; see the method notes §2). Which
mode a corpus is scored with is written in its `manifest.json` (`answer_match`, read by
`corpus_match_mode`), so every stage scores a corpus the same way unless told otherwise.

Modes:
    entity  the normalized gold answer appears in the normalized text as whole words (case, accents,
            articles and punctuation ignored). For named entities: "Paris" matches "It is in Paris.".
            Old name: `loose`.
    exact   the final answer of the text (last \\boxed{...}, else what follows "answer is", else the
            last line) equals the gold answer after the same normalization. Old name: `strict`.
    number  the final answer of the text, read as a number (last \\boxed{...}, else the number after the
            last "answer is", else the last number of the last line), equals the gold number: sign and
            decimals count ("-3" is not "3", "2.5" is not "2"), thousands separators and trailing zeros do
            not ("12,345" is 12345, "3.0" is 3). A number that only appears in the working earns nothing.
            A gold answer that is no number is compared as in `exact`.
    none    every text matches (accept every target).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Literal

from mixsd.core.files import InputError

# The aliases keep configs and result files written before the modes were renamed working.
MatchMode = Literal["entity", "exact", "number", "none", "loose", "strict"]
MODES: tuple[str, ...] = ("entity", "exact", "number", "none")
ALIASES = {"loose": "entity", "strict": "exact"}
DEFAULT_MODE = "entity"
SCORING_MODES: tuple[str, ...] = ("entity", "exact", "number")  # the modes a prediction is scored with

# Matches only the phrase (not the rest of the text), so that finditer finds every occurrence and the
# last one can decide.
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Kept by `normalize`: "-" (negative numbers, hyphenated names), "." (decimal points; full stops are removed
# separately) and "+" (signed numbers).
_KEEP = set("-.+")
# A number: optional sign (not after a word character or a point, where "-" is an operator: "5-3"),
# digits with optional thousands groups, optional decimals; or a bare decimal like ".5".
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])[-+]?\.\d+"
)
_FRAC = re.compile(r"\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*([-+]?\d+)\s*\}")
_SLASH = re.compile(r"(?<![\w./])([-+]?\d+)\s*/\s*(\d+)(?![\w./])")


def canonical_mode(mode: str) -> str:
    """The mode's current name (`loose` -> `entity`, `strict` -> `exact`); ValueError for an unknown one."""
    name = ALIASES.get(mode, mode)
    if name not in MODES:
        raise ValueError(
            f"unknown match mode {mode!r}; expected one of {', '.join(MODES)} (or the old names loose, strict)"
        )
    return name


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str) -> str:
    """The final answer a text gives: last \\boxed{}, else the sentence after "answer is", else its last line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    phrases = list(_ANSWER_IS.finditer(text))
    tail = text[phrases[-1].end() :].strip() if phrases else ""
    if tail:
        return re.split(r"(?<=[^\d])\.(\s|$)|\n", tail, maxsplit=1)[0].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _fold(text: str) -> str:
    """Unicode-normalize and case-fold: compatibility forms (NFKC), accents dropped, ß -> ss."""
    text = unicodedata.normalize("NFKD", text.replace("\u2212", "-"))
    text = "".join(c for c in text if not unicodedata.combining(c))
    return unicodedata.normalize("NFKC", text).casefold()


def normalize(text: str) -> str:
    """Case-fold, fold unicode (accents, compatibility forms), drop punctuation, articles, extra whitespace."""
    text = _fold(text)
    text = text.replace("\\boxed{", " ").replace("$", " ")
    text = "".join(
        " " if c not in _KEEP and unicodedata.category(c)[0] in "PS" else c  # punctuation and symbols
        for c in text
    )
    text = _ARTICLES.sub(" ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # full stops, but keep decimal points
    return " ".join(text.split())


def parse_number(text: str) -> Fraction | None:
    """The value of a text that is one number ("12,345", "-3", "2.50", "\\frac{1}{2}", "3/4"), else None."""
    text = _fold(text).strip().strip("$").strip()
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    text = re.sub(r"\.$", "", text)  # "42." ends a sentence
    frac = _FRAC.fullmatch(text) or _SLASH.fullmatch(text)
    if frac:
        return Fraction(int(frac.group(1)), int(frac.group(2))) if int(frac.group(2)) else None
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(Decimal(text.replace(",", "")))
    except (InvalidOperation, ValueError):
        return None


def _numbers(text: str) -> list[Fraction]:
    """Every number in a text, in order (fractions \\frac{a}{b} and a/b read as one number)."""
    text = _fold(text).replace("{,}", ",")
    spans: list[tuple[int, Fraction]] = []
    taken: list[tuple[int, int]] = []
    for pattern in (_FRAC, _SLASH):
        for m in pattern.finditer(text):
            if int(m.group(2)):
                spans.append((m.start(), Fraction(int(m.group(1)), int(m.group(2)))))
                taken.append(m.span())
    for m in _NUMBER.finditer(text):
        if not any(a <= m.start() < b for a, b in taken):
            spans.append((m.start(), Fraction(Decimal(m.group().replace(",", "")))))
    return [value for _, value in sorted(spans, key=lambda s: s[0])]


def final_number(text: str) -> Fraction | None:
    """The number a text gives as its final answer, or None.

    The last \\boxed{} decides when there is one (its last number); else the number right after the last
    "answer is"; else the last number of the last non-empty line. Numbers earlier in the working count
    for nothing: a worked solution of the wrong operation does not score by containing the right digits.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        return found[-1] if found else None
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        head = _fold(text[m.end() :]).lstrip(" $:*")
        number = _FRAC.match(head) or _SLASH.match(head) or _NUMBER.match(head)
        if number:
            return _numbers(number.group())[0]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    found = _numbers(lines[-1]) if lines else []
    return found[-1] if found else None


def exact_match(text: str, gold: str) -> bool:
    return normalize(extract_answer(text)) == normalize(gold)


def entity_match(text: str, gold: str) -> bool:
    needle = normalize(gold)
    if not needle:
        return False
    haystack = normalize(text)
    return re.search(r"(?<![\w])" + re.escape(needle) + r"(?![\w])", haystack) is not None


def number_match(text: str, gold: str) -> bool:
    target = parse_number(gold)
    if target is None:  # a gold answer that is no number: the final answer must equal it
        return exact_match(text, gold)
    return final_number(text) == target


# The old names, kept for code written against them.
strict_match = exact_match
loose_match = entity_match


def matches(text: str, gold: str, mode: str) -> bool:
    """Does `text` give the answer `gold` under `mode` (see the module docstring; aliases accepted)?"""
    mode = canonical_mode(mode)
    if mode == "entity":
        return entity_match(text, gold)
    if mode == "exact":
        return exact_match(text, gold)
    if mode == "number":
        return number_match(text, gold)
    return True


def score_all(text: str, gold: str) -> dict[str, bool]:
    """The text scored under every scoring mode (entity, exact, number): what eval stores per prediction."""
    return {mode: matches(text, gold, mode) for mode in SCORING_MODES}


def corpus_match_mode(path: str | Path) -> str | None:
    """The match mode a corpus's manifest names (`answer_match`), or None when it names none.

    `path` is a corpus folder (its manifest.json) or a corpus file (the manifest beside it, when that
    manifest lists the file: a file of another origin dropped into the folder is not described by it).
    """

    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", manifest) from err
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", manifest)
    if not path.is_dir() and isinstance(data.get("files"), dict) and path.name not in data["files"]:
        return None
    mode = data.get("answer_match")
    if mode is None:
        return None
    try:
        return canonical_mode(str(mode))
    except ValueError as err:
        raise InputError(str(err), manifest, field="answer_match") from err


def resolve_match_mode(explicit: str | None, corpus: str | Path | None) -> str:
    """The mode to score with: the explicit option, else the corpus manifest's, else `entity`."""
    if explicit is not None:
        return canonical_mode(explicit)
    return (corpus_match_mode(corpus) if corpus is not None else None) or DEFAULT_MODE


# --------------------------------------------------------------------------------------------------
# SQuAD's scores (Rajpurkar et al., 2016; its official evaluate-v1.1.py): exact match and token F1 of
# the final answer, the maximum over the gold answers
# --------------------------------------------------------------------------------------------------
_SQUAD_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")  # Python's string.punctuation


def squad_normalize(text: str) -> str:
    """SQuAD's normalization, exactly: lower case, drop ASCII punctuation, the articles a/an/the, squash
    whitespace. (Unlike `normalize` it keeps accents and removes hyphens and decimal points, as SQuAD does.)"""
    text = "".join(c for c in text.lower() if c not in _SQUAD_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> bool:
    return squad_normalize(prediction) == squad_normalize(gold)


def squad_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall between the normalized texts (bag of tokens)."""

    predicted, wanted = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(text: str, golds: list[str]) -> dict[str, float | bool]:
    """A generated answer scored as SQuAD scores it: `em` and `f1` of its final answer (`extract_answer`:
    last \\boxed{}, else what follows "answer is", else its last line), each the maximum over `golds`; and
    `contained`, whether any gold answer appears in the whole text as whole words (`entity_match`), the
    lenient rate for free-form answers."""
    answer = extract_answer(text)
    return {
        "em": any(squad_exact(answer, gold) for gold in golds),
        "f1": max((squad_f1(answer, gold) for gold in golds), default=0.0),
        "contained": any(entity_match(text, gold) for gold in golds),
    }
