"""The error taxonomy of wrong answers (paper §4): format, leakage, collapse or genuine, in that priority.
Pure: `mixsd eval` classifies each wrong answer with it; the forgetting analysis reuses its leakage test.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mixsd.core.answers import last_boxed, normalize

ERROR_TYPES = ("format", "leakage", "collapse", "genuine")
_MARKER = re.compile(r"\\boxed\{|answer\s+is", re.IGNORECASE)


@dataclass(frozen=True)
class Taxonomy:
    """Thresholds of the error taxonomy (paper §4, priority order format > leakage > collapse > genuine)."""

    entities: frozenset[str] = frozenset()  # normalized injected entity names
    collapse_max_words: int = 10
    require_marker: bool = False
    min_entity_chars: int = 3

    @staticmethod
    def entity_set(checks: Iterable[str], min_chars: int = 3) -> frozenset[str]:
        """Normalized entity names from answer checks; numbers are no entities (kgfunc answers)."""
        names = (normalize(c) for c in checks)
        return frozenset(n for n in names if len(n) >= min_chars and not re.fullmatch(r"[-+.\d\s]+", n))

    def leaked(self, output: str, prompt: str, gold: str) -> list[str]:
        """Injected entities the output names that are neither in the prompt nor the gold answer."""
        text, asked, gold = normalize(output), normalize(prompt), normalize(gold)
        found = []
        for entity in sorted(self.entities):
            if entity == gold or contains_words(asked, entity):
                continue
            if contains_words(text, entity):
                found.append(entity)
        return found

    def classify(self, output: str, prompt: str, gold: str, finish: str) -> tuple[str, list[str]]:
        """Error type of a wrong answer, and the leaked entities (for leakage)."""
        has_marker = last_boxed(output) is not None or _MARKER.search(output) is not None
        truncated = finish in ("length", "prompt_too_long")
        if not output.strip() or (truncated and not has_marker) or (self.require_marker and not has_marker):
            return "format", []
        leaked = self.leaked(output, prompt, gold)
        if leaked:
            return "leakage", leaked
        if len(output.split()) <= self.collapse_max_words:
            return "collapse", []
        return "genuine", []


def contains_words(haystack: str, needle: str) -> bool:
    """Does normalized `haystack` contain normalized `needle` as whole words?"""
    return re.search(r"(?<![\w])" + re.escape(needle) + r"(?![\w])", haystack) is not None
