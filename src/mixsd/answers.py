"""Answer extraction, normalization and matching: one scorer for every stage.

`mixsd mix` verifies targets with it and `mixsd eval` scores predictions with it, so "correct" means the
same thing everywhere (the reference code used three different scorers; see the method notes §2).

Two modes:
    strict  the final answer of the text (last \\boxed{...}, else what follows "answer is", else the
            last line) equals the gold answer after normalization;
    loose   the normalized gold answer appears in the normalized text as whole words.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Literal

MatchMode = Literal["strict", "loose", "none"]

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c not in "-.+"})


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
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        tail = matches[-1].group(1).strip()
        return re.split(r"(?<=[^\d])\.(\s|$)|\n", tail, maxsplit=1)[0].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize(text: str) -> str:
    """Lower-case, strip accents' compatibility forms, punctuation, articles and extra whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\\boxed{", " ").replace("$", " ")
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # full stops, but keep decimal points
    return " ".join(text.split())


def strict_match(text: str, gold: str) -> bool:
    return normalize(extract_answer(text)) == normalize(gold)


def loose_match(text: str, gold: str) -> bool:
    needle = normalize(gold)
    if not needle:
        return False
    haystack = normalize(text)
    return re.search(r"(?<![\w])" + re.escape(needle) + r"(?![\w])", haystack) is not None


def matches(text: str, gold: str, mode: MatchMode) -> bool:
    if mode == "strict":
        return strict_match(text, gold)
    if mode == "loose":
        return loose_match(text, gold)
    if mode == "none":
        return True
    raise ValueError(f"unknown match mode {mode!r}; expected strict, loose or none")
