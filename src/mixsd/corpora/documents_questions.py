"""Question/answer pairs about passages for `mixsd corpus documents` (mixsd.corpora.documents): the
model that writes them (`QAWriter`, greedy, batched) and the pure filters that say why a pair is dropped.
The filters and their names are listed in mixsd.corpora.documents' docstring."""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from tqdm.auto import tqdm

from mixsd.core.answers import entity_match, squad_normalize
from mixsd.core.files import sha256_text
from mixsd.corpora.documents_passages import Passage
from mixsd.method.prompts import answer_end, encode_prompt, pad_token_id

# The question starts tried per passage (in a seeded order): they steer a small model towards different
# facts of the passage, which greedy decoding of one prompt would not.
QUESTION_STARTS = ("What", "Who", "When", "Where", "Which", "How many", "In what year", "Why", "How")
DROP_REASONS = (
    "no_question",
    "duplicate_question",
    "refers_to_passage",
    "copies_the_example",
    "names_nothing_in_passage",
    "gold_question",
    "no_answer",
    "answer_too_long",
    "answer_not_in_passage",
    "answer_in_question",
    "over_limit",
)
EXAMPLE_PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)
QA_INSTRUCTION = (
    "Write a quiz question about the passage and its short answer, copied exactly from the passage. "
    "The question must name what it is about, so that it makes sense without the passage.\n\n"
    "Example:\n"
    f"Passage: {EXAMPLE_PASSAGE}\n"
    "Question: Who is the Eiffel Tower named after?\n"
    "Answer: Gustave Eiffel\n\n"
    "Now the passage:\n"
    "Passage: {passage}"
)
_REFERS = re.compile(
    r"\b(the|this|that|above|given)\s+(passage|text|article|paragraph|excerpt|document|story|reading|"
    r"author|writer|narrator)\b|\baccording to\b|\bmentioned\s+(above|here|in)\b|\bthe above\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z0-9]+")
# Words that name nothing: a question sharing only these with its passage does not say what it asks about.
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers him his how i if in into is it its itself just me more most my no nor not
    now of off on once only or other our out over own same she should so some such than that the their
    them then there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your first one two many much year years called named
    known used""".split()  # noqa: SIM905 (a word list reads better as text)
)


# ---------------------------------------------------------------------------------------------------
# The filters (pure): why a generated pair is dropped, or None to keep it
# ---------------------------------------------------------------------------------------------------
def content_words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOPWORDS and len(w) > 1}


# the instruction example's names and numbers (capitalized words and digits that are content words)
EXAMPLE_NAMES = content_words(" ".join(re.findall(r"\b(?:[A-Z]\w+|\d+)\b", EXAMPLE_PASSAGE)))


def find_span(answer: str, passage: str) -> str | None:
    """The passage's own text of `answer` (case and spacing aside; surrounding quotes and a final full stop
    of the answer ignored), or None when the answer is no span of the passage."""
    bare = answer.strip().strip("\"'`“”‘’").strip()
    forms = [bare.rstrip(".,;:!").strip(), bare, answer.strip()]
    for form in dict.fromkeys(f for f in forms if f):
        words = form.split()
        pattern = r"\s+".join(re.escape(w) for w in words)
        if re.match(r"\w", form):
            pattern = r"(?<!\w)" + pattern
        if re.search(r"\w$", form):
            pattern += r"(?!\w)"
        found = re.search(pattern, passage, re.IGNORECASE)
        if found:
            return found.group(0)
    return None


def question_problem(
    question: str | None, passage: str, min_shared: int, seen: set[str], gold: set[str]
) -> str | None:
    """Why a generated question is unusable (a DROP_REASONS name), or None."""
    if not question or not question.endswith("?") or len(question) < 8:
        return "no_question"
    key = squad_normalize(question)
    if key in seen:
        return "duplicate_question"
    if _REFERS.search(question):
        return "refers_to_passage"
    # a small model carries the example's names into questions about other passages ("In what year did the
    # Eiffel Tower become a nuclear power plant?", SmolLM2-135M on SQuAD): such a question is invented
    if content_words(question) & (EXAMPLE_NAMES - content_words(passage)):
        return "copies_the_example"
    if len(content_words(question) & content_words(passage)) < max(min_shared, 1 if min_shared else 0):
        return "names_nothing_in_passage"
    if key in gold:
        return "gold_question"
    return None


def answer_problem(
    question: str, answer: str | None, passage: str, max_words: int
) -> tuple[str | None, str | None]:
    """(why the answer is unusable or None, the passage's span of it)."""
    if answer is None or not answer.strip().strip("\"'.").strip():
        return "no_answer", None
    if len(answer.split()) > max_words:
        return "answer_too_long", None
    span = find_span(answer, passage)
    if span is None:
        return "answer_not_in_passage", None
    if entity_match(question, span):
        return "answer_in_question", span
    return None, span


# ---------------------------------------------------------------------------------------------------
# Writing the pairs with a model
# ---------------------------------------------------------------------------------------------------
def _starts(seed: int, pid: str, count: int) -> list[str]:
    order = list(QUESTION_STARTS)
    random.Random(int(sha256_text(f"{seed}\x00{pid}")[:16], 16)).shuffle(order)
    return order[:count]


def _first_line(text: str) -> tuple[str, bool]:
    """The text up to its first line break (not stripped: it may continue a question start), and whether
    there was one."""
    head, newline, _ = text.partition("\n")
    return head.rstrip(), bool(newline)


_ANSWER_PREFIX = re.compile(r"^\s*(the\s+)?answer(\s+is)?\s*:?\s*", re.IGNORECASE)


def clean_answer(text: str) -> str | None:
    """A written answer without a leading "The answer is:" / "Answer:" (small models repeat it)."""
    text = _ANSWER_PREFIX.sub("", text).strip()
    return text or None


class QAWriter:
    """Greedy question, then answer, for a list of (passage, question start) prompts, batched."""

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int):
        from mixsd.core.models import (
            context_length,  # here: models loads torch, a corpus from files needs none
        )

        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.end = answer_end(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer)
        self.limit = context_length(model)

    def _line_stop(self, tokens: list[int]) -> int | None:
        return len(tokens) if "\n" in self.tokenizer.decode(tokens) else None

    def _complete(self, prompts: list[list[int]], what: str) -> list[tuple[str, bool]]:
        """Each prompt's greedy continuation up to its first line break: (text, whether it ended there)."""
        # torch and generation (which loads it) only when a model writes questions
        import torch

        from mixsd.method.generation import greedy_generate

        out: list[tuple[str, bool]] = [("", False)] * len(prompts)
        fits = [
            i for i, p in enumerate(prompts) if not self.limit or len(p) + self.max_new_tokens <= self.limit
        ]
        with torch.inference_mode(), tqdm(total=len(fits), desc=what, unit=what[:-1], leave=False) as bar:
            for k, tokens, finish in greedy_generate(
                self.model,
                [prompts[i] for i in fits],
                stop_ids=self.end.stop_ids,
                pad_id=self.pad_id,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                on_row=lambda _: bar.update(),
                text_stop=self._line_stop,
            ):
                text, ended = _first_line(self.tokenizer.decode(tokens, skip_special_tokens=True))
                out[fits[k]] = (text, ended or finish == "stop")
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def questions(self, jobs: list[tuple[Passage, str]]) -> list[tuple[list[int], str | None]]:
        """(the conversation so far, the question or None) for each (passage, question start)."""

        bases = {}
        prompts = []
        for passage, start in jobs:
            if passage.id not in bases:
                bases[passage.id] = encode_prompt(self.tokenizer, QA_INSTRUCTION.format(passage=passage.text))
            prompts.append(bases[passage.id] + self.encode(f"Question: {start}"))
        done = []
        for (passage, start), (text, ended) in zip(jobs, self._complete(prompts, "questions"), strict=True):
            question = " ".join(f"{start}{text}".split()) if ended else None
            done.append((bases[passage.id], question))
        return done

    def answers(self, jobs: list[tuple[list[int], str]]) -> list[str | None]:
        """The answer the model writes after its question, in the same conversation."""
        prompts = [base + self.encode(f"Question: {question}\nAnswer:") for base, question in jobs]
        return [clean_answer(text) for text, _ in self._complete(prompts, "answers")]


def write_pairs(
    passages: list[Passage],
    writer: QAWriter,
    gold_questions: dict[str, set[str]],
    *,
    seed: int,
    candidates: int,
    questions: int,
    min_shared_words: int,
    max_answer_words: int,
) -> list[dict[str, Any]]:
    """Every candidate pair of every passage, in order, each with `kept` and, when dropped, `reason`:
    `candidates` question starts per passage (seeded order), at most `questions` kept per passage."""
    jobs = [(p, start) for p in passages for start in _starts(seed, p.id, candidates)]
    written = writer.questions(jobs)
    written_pairs: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {}
    for (passage, start), (_, question) in zip(jobs, written, strict=True):
        known = seen.setdefault(passage.id, set())
        reason = question_problem(
            question, passage.text, min_shared_words, known, gold_questions.get(passage.id, set())
        )
        if question is not None:
            known.add(squad_normalize(question))
        written_pairs.append(
            {"passage": passage.id, "start": start, "question": question, "answer": None, "reason": reason}
        )
    asked = [i for i, c in enumerate(written_pairs) if c["reason"] is None]
    answers = writer.answers([(written[i][0], written_pairs[i]["question"]) for i in asked])
    by_id = {p.id: p for p in passages}
    kept: Counter[str] = Counter()
    for i, answer in zip(asked, answers, strict=True):
        candidate = written_pairs[i]
        candidate["answer"] = answer
        reason, span = answer_problem(
            candidate["question"], answer, by_id[candidate["passage"]].text, max_answer_words
        )
        if reason is None and kept[candidate["passage"]] >= questions:
            reason = "over_limit"
        candidate["reason"], candidate["span"] = reason, span
        if reason is None:
            kept[candidate["passage"]] += 1
    for candidate in written_pairs:
        candidate["kept"] = candidate["reason"] is None
    return written_pairs
