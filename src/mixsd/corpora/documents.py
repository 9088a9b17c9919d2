"""`mixsd corpus documents`: documents in, a question/answer corpus out, in the prompt-distillation manner.

    mixsd corpus documents notes/ --model smollm2-135m --out data/notes
    mixsd corpus documents --squad 30 --model smollm2-135m --out data/squad30

Practitioners hold documents, not QA pairs. This command reads text, Markdown or JSONL documents, cuts them
into passages (paragraphs within a token budget of the model's tokenizer), and lets a model (the base model
itself, or `--qa-model`) write question/answer pairs about each passage. A pair is kept only when its answer
is a span of the passage and its question makes sense without the passage; every dropped pair keeps the
reason it was dropped. Each record's `context` is its passage, so MixSD's expert reads the passage and the
naive conditional does not; `mix`, `sft-targets`, `train`, `eval` and grids read the folder unchanged.

Reading, splitting and every check of the input happen before any model is loaded (the tokenizer alone
counts tokens): an empty, binary or non-UTF-8 file, a bad JSONL line, or a sentence longer than the budget
stops the run with the file and position, or with --skip-bad is skipped and listed in manifest.json.

Question writing is greedy and deterministic: each passage gets the same prompt (an instruction, one worked
example, the passage) and the assistant's turn is started with "Question: <start>" for several question
starts (What, Who, When ...), in an order drawn from a stream seeded by (--seed, passage id); the model
completes the question, then the answer after "Answer:" in the same conversation. The filters:

    no_question               no question line ending in "?" (or it ran into the length cap)
    duplicate_question        the same question (normalized) already written for this passage
    refers_to_passage         it points at the passage ("the passage", "this text", "according to" ...)
    names_nothing_in_passage  it shares fewer than --min-shared-words content words with the passage, so
                              it does not name what it asks about (or copies the worked example)
    gold_question             (--squad) it is one of the passage's gold questions: those never enter training
    no_answer                 the answer is empty
    answer_too_long           more than --max-answer-words words
    answer_not_in_passage     the answer is not a span of the passage (case and spacing aside)
    answer_in_question        the question already names the answer
    over_limit                a passage's pairs beyond --questions (kept in the seeded order)

Of the pairs a passage keeps, --heldout go to heldout.jsonl (never trained on; at least one stays in
train.jsonl). With --squad N, N paragraphs of the SQuAD v1.1 dev set (read out of the BIG-bench sdist that
`mixsd probes fetch` downloads) are the documents, and their crowd-written questions are written as
gold.jsonl (closed book: the question alone) and gold_open.jsonl (the passage in the prompt: the ceiling),
each record listing every gold answer in `answers` for SQuAD's exact match and F1 (`mixsd eval`).

Folder layout: train.jsonl, heldout.jsonl, [gold.jsonl, gold_open.jsonl], documents/passages.jsonl (the
passages: id, source, position, title, text, tokens; what `mixsd train --method cpt` trains on),
documents/candidates.jsonl (every generated pair, kept or with its drop reason), manifest.json.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixsd.answers import entity_match, squad_normalize
from mixsd.corpora._manifest import write_manifest
from mixsd.corpora.importers import make_record
from mixsd.files import InputError, atomic_write_jsonl, read_jsonl, sha256_file, sha256_text
from mixsd.options import ModelOptions, check_choices, check_range

GENERATOR = "mixsd.corpora.documents"
VERSION = 1
MAX_LISTED_SKIPS = 200
PASSAGES_FILE = "documents/passages.jsonl"
CANDIDATES_FILE = "documents/candidates.jsonl"
SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".jsonl": "jsonl"}
SQUAD_SOURCE = "squad-v1.1-dev"
SQUAD_LICENSE = "CC-BY-SA-4.0 (SQuAD v1.1, Rajpurkar et al., 2016)"

# The question starts tried per passage (in a seeded order): they steer a small model towards different
# facts of the passage, which greedy decoding of one prompt would not.
QUESTION_STARTS = ("What", "Who", "When", "Where", "Which", "How many", "In what year", "Why", "How")
DROP_REASONS = (
    "no_question",
    "duplicate_question",
    "refers_to_passage",
    "names_nothing_in_passage",
    "gold_question",
    "no_answer",
    "answer_too_long",
    "answer_not_in_passage",
    "answer_in_question",
    "over_limit",
)
QA_INSTRUCTION = (
    "Write a quiz question about the passage and its short answer, copied exactly from the passage. "
    "The question must name what it is about, so that it makes sense without the passage.\n\n"
    "Example:\n"
    "Passage: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.\n"
    "Question: Who is the Eiffel Tower named after?\n"
    "Answer: Gustave Eiffel\n\n"
    "Now the passage:\n"
    "Passage: {passage}"
)
# The closed-book question with its passage in front: the base model's ceiling on the gold questions.
OPEN_BOOK_PROMPT = "Passage: {passage}\n\n{prompt}"
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


@dataclass
class DocumentsConfig(ModelOptions):
    out: str = field(
        kw_only=True,
        metadata={
            "help": "Folder to write train.jsonl, heldout.jsonl, gold*.jsonl (--squad), documents/ and "
            "manifest.json into."
        },
    )
    inputs: str | None = field(
        default=None,
        metadata={
            "help": "Documents: comma-separated files or folders of .txt, .md or .jsonl files (JSONL: a "
            "`text` field per line, optional `title` and `id`). Folders are read recursively."
        },
    )
    squad: int = field(
        default=0,
        metadata={
            "help": "Also take this many paragraphs of the SQuAD v1.1 dev set (spread over its articles) as "
            "documents, with their gold questions in gold.jsonl / gold_open.jsonl; 0 = none."
        },
    )
    sdist: str | None = field(
        default=None,
        metadata={
            "help": "--squad: path of bigbench-1.0.0.tar.gz; default: the one `mixsd probes fetch` got."
        },
    )
    qa_model: str | None = field(
        default=None,
        metadata={"help": "Model that writes the questions and answers; default: --model (the base model)."},
    )
    questions: int = field(default=4, metadata={"help": "Pairs kept per passage at most (train + held out)."})
    heldout: int = field(
        default=1,
        metadata={"help": "Kept pairs per passage held out of training (heldout.jsonl); one always stays."},
    )
    candidates: int = field(
        default=len(QUESTION_STARTS),
        metadata={"help": f"Question starts tried per passage (at most {len(QUESTION_STARTS)})."},
    )
    max_passage_tokens: int = field(
        default=320,
        metadata={
            "help": "Token budget of a passage (--model's tokenizer); longer paragraphs are cut at sentences."
        },
    )
    min_passage_words: int = field(
        default=8, metadata={"help": "Shorter paragraphs (headings, captions) are skipped and counted."}
    )
    max_answer_words: int = field(default=8, metadata={"help": "Longer answers are dropped."})
    min_shared_words: int = field(
        default=2,
        metadata={
            "help": "Content words a question must share with its passage (it names what it asks about)."
        },
    )
    answer_style: Literal["boxed", "raw"] = field(
        default="boxed",
        metadata={
            "help": "boxed: prompt asks for \\boxed{}, answer 'The answer is X. \\boxed{X}' (as KGFact); "
            "raw: the question and the answer span as they are."
        },
    )
    max_new_tokens: int = field(
        default=48, metadata={"help": "Length cap of a generated question or answer."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the question starts' order and the held-out choice."}
    )
    skip_bad: bool = field(
        default=False,
        metadata={
            "help": "Skip bad files, lines and passages (listed in manifest.json with file and position) "
            "instead of stopping."
        },
    )

    def __post_init__(self) -> None:  # refuse bad options before any file is read (issue 10)
        self.check_model_options()
        check_choices(self)
        check_range("squad", self.squad, 0, integer=True)
        check_range("questions", self.questions, 1, integer=True)
        check_range("heldout", self.heldout, 0, integer=True)
        check_range("candidates", self.candidates, 1, len(QUESTION_STARTS), integer=True)
        check_range("max_passage_tokens", self.max_passage_tokens, 16, integer=True)
        check_range("min_passage_words", self.min_passage_words, 1, integer=True)
        check_range("max_answer_words", self.max_answer_words, 1, integer=True)
        check_range("min_shared_words", self.min_shared_words, 0, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 4, integer=True)
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_range("seed", self.seed, 0, integer=True)
        if not self.inputs and not self.squad:
            raise InputError("give documents (--inputs FILE_OR_FOLDER,...) or --squad N", field="inputs")


# ---------------------------------------------------------------------------------------------------
# Reading documents into paragraphs (no model, no tokenizer)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paragraph:
    source: str  # the file as named relative to the input given (no absolute paths: same ids everywhere)
    position: str  # where it starts: "line 12", "line 3, paragraph 2" (JSONL), or a SQuAD paragraph id
    text: str
    title: str | None = None
    line: int | None = None  # for error messages


class Skips:
    """Bad input: raise an InputError naming file and position, or (--skip-bad) record it and go on."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.count = 0
        self.listed: list[dict[str, Any]] = []

    def bad(self, message: str, path: Path | str, line: int | None = None) -> None:
        if not self.skip_bad:
            raise InputError(message, path, line)
        self.note(message, path, line)

    def note(self, message: str, path: Path | str, line: int | None = None) -> None:
        """Record a skip that is no error (an unsupported file in a folder, a heading-sized paragraph)."""
        self.count += 1
        if len(self.listed) < MAX_LISTED_SKIPS:
            entry: dict[str, Any] = {"file": str(path), "reason": message}
            if line is not None:
                entry["line"] = line
            self.listed.append(entry)


def input_files(inputs: str, skips: Skips) -> list[tuple[Path, str]]:
    """(path, name) of every document: a file as given, a folder's supported files (recursively, sorted)."""
    files: list[tuple[Path, str]] = []
    for item in (part.strip() for part in inputs.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            for file in found:
                relative = file.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue  # hidden files and folders (.git, editor files) are no documents
                name = f"{path.name}/{relative.as_posix()}"
                if file.suffix.lower() in SUFFIXES:
                    files.append((file, name))
                else:
                    skips.note(f"unsupported file type '{file.suffix}' (expected .txt, .md or .jsonl)", name)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                skips.bad(f"unsupported file type '{path.suffix}' (expected .txt, .md or .jsonl)", path)
                continue
            files.append((path, path.name))
        else:
            raise InputError("file or folder not found", path)
    return files


def _decode(raw: bytes, path: Path, skips: Skips) -> str | None:
    """The file's text, or None (recorded) when it is empty, binary or not UTF-8."""
    if not raw.strip():
        skips.bad("empty file", path)
        return None
    if b"\x00" in raw[:8192]:
        skips.bad("binary file (NUL bytes), not text", path)
        return None
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        skips.bad(f"not UTF-8 text (byte 0x{raw[err.start]:02x})", path, line)
        return None


def text_paragraphs(text: str, markdown: bool, first_line: int = 1) -> Iterator[tuple[int, str, str | None]]:
    """(start line, paragraph, title) for each paragraph: lines up to a blank line, joined by spaces.
    Markdown: a heading ends a paragraph and becomes the title of those that follow; fenced code is skipped."""
    lines: list[str] = []
    start, title, fenced = first_line, None, False
    for number, line in enumerate(text.splitlines(), start=first_line):
        stripped = line.strip()
        if markdown and stripped.startswith(("```", "~~~")):
            fenced = not fenced
            stripped = ""
        elif markdown and fenced:
            continue
        heading = markdown and re.match(r"#{1,6}\s+(.*)", stripped)
        if not stripped or heading:
            if lines:
                yield start, " ".join(lines), title
                lines = []
            if heading:
                title = heading.group(1).strip(" #") or title
            continue
        if not lines:
            start = number
        lines.append(stripped)
    if lines:
        yield start, " ".join(lines), title


def read_document(path: Path, name: str, skips: Skips) -> list[Paragraph]:
    """The paragraphs of one file; bad files and lines go to `skips` (an error, or a recorded skip)."""
    raw = path.read_bytes()
    kind = SUFFIXES[path.suffix.lower()]
    text = _decode(raw, path, skips)
    if text is None:
        return []
    paragraphs: list[Paragraph] = []
    if kind != "jsonl":
        for line, body, title in text_paragraphs(text, kind == "markdown"):
            paragraphs.append(Paragraph(name, f"line {line}", body, title, line))
        return paragraphs
    for line, obj in read_jsonl(path, on_error=lambda message, line: skips.bad(message, path, line)):
        body, title = obj.get("text"), obj.get("title")
        if not isinstance(body, str) or not body.strip():
            skips.bad("missing or empty field 'text'" if not body else "field 'text' is not text", path, line)
            continue
        if title is not None and not isinstance(title, str):
            skips.bad("field 'title' is not text", path, line)
            continue
        label = obj.get("id")
        where = (
            f"id {label}" if isinstance(label, str | int) and not isinstance(label, bool) else f"line {line}"
        )
        parts = list(text_paragraphs(body, markdown=False))
        for part, (_, paragraph, _) in enumerate(parts, start=1):
            position = where if len(parts) == 1 else f"{where}, paragraph {part}"
            paragraphs.append(Paragraph(name, position, paragraph, title, line))
    return paragraphs


# ---------------------------------------------------------------------------------------------------
# Passages: paragraphs within the token budget
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Passage:
    id: str
    source: str
    position: str
    title: str | None
    text: str
    tokens: int

    def to_json(self) -> dict[str, Any]:
        row = {"id": self.id, "source": self.source, "position": self.position, "text": self.text}
        return {**row, "tokens": self.tokens, **({"title": self.title} if self.title else {})}


def passage_id(source: str, position: str, text: str) -> str:
    """Stable across machines and runs: a hash of where the passage comes from and what it says."""
    return "p-" + sha256_text(f"{source}\x00{position}\x00{text}")[:12]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def split_passages(
    paragraphs: list[Paragraph],
    count_tokens: Callable[[str], int],
    budget: int,
    min_words: int,
    skips: Skips,
) -> list[Passage]:
    """One passage per paragraph within `budget` tokens; a longer one is cut at sentence ends into parts
    that fit (a single sentence over the budget is bad input). Paragraphs under `min_words` are skipped."""
    passages: list[Passage] = []
    for paragraph in paragraphs:
        if len(paragraph.text.split()) < min_words:
            skips.note(
                f"paragraph at {paragraph.position} has fewer than {min_words} words", paragraph.source
            )
            continue
        size = count_tokens(paragraph.text)
        if size <= budget:
            pieces = [(paragraph.position, paragraph.text, size)]
        else:
            pieces, current = [], []
            for sentence in sentences(paragraph.text):
                joined = " ".join([*current, sentence])
                if current and count_tokens(joined) > budget:
                    pieces.append(" ".join(current))
                    current = [sentence]
                else:
                    current.append(sentence)
            if current:
                pieces.append(" ".join(current))
            too_long = [p for p in pieces if count_tokens(p) > budget]
            if too_long:
                skips.bad(
                    f"a sentence of {count_tokens(too_long[0])} tokens at {paragraph.position} is longer than "
                    f"--max-passage-tokens {budget}",
                    paragraph.source,
                    paragraph.line,
                )
                continue
            pieces = [
                (f"{paragraph.position}, part {i}", p, count_tokens(p)) for i, p in enumerate(pieces, 1)
            ]
        for position, text, tokens in pieces:
            pid = passage_id(paragraph.source, position, text)
            passages.append(Passage(pid, paragraph.source, position, paragraph.title, text, tokens))
    return passages


# ---------------------------------------------------------------------------------------------------
# SQuAD v1.1 dev: paragraphs as documents, crowd questions as the gold split
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldQuestion:
    id: str
    question: str
    answers: list[str]


def squad_documents(
    squad: dict, count: int, count_tokens: Callable[[str], int], budget: int
) -> tuple[list[Paragraph], dict[str, list[GoldQuestion]], int]:
    """`count` paragraphs spread evenly over the dev set's paragraphs that fit the budget and have
    questions; their gold questions by paragraph position; and how many paragraphs were eligible."""
    from mixsd.corpora.probes import MEMBERS, spread

    data = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(data, list):
        raise InputError("no 'data' list", MEMBERS["squad"], field="data")
    eligible: list[tuple[Paragraph, list[GoldQuestion]]] = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            text = " ".join(str(paragraph.get("context", "")).split())
            golds = []
            for qa in paragraph.get("qas", []):
                texts = (str(answer.get("text", "")).strip() for answer in qa.get("answers", []))
                answers = list(dict.fromkeys(text for text in texts if text))
                if answers and str(qa.get("question", "")).strip():
                    golds.append(GoldQuestion(str(qa["id"]), " ".join(qa["question"].split()), answers))
            if text and golds and count_tokens(text) <= budget:
                position = f"squad-{a:02d}-{p:03d}"  # the id `mixsd probes fetch` gives the paragraph
                title = str(article.get("title", "")).replace("_", " ") or None
                eligible.append((Paragraph(SQUAD_SOURCE, position, text, title), golds))
    chosen = spread(eligible, count)
    if len(chosen) < count:
        raise InputError(
            f"--squad {count}: only {len(chosen)} SQuAD dev paragraphs fit --max-passage-tokens",
            field="squad",
        )
    return [p for p, _ in chosen], {p.position: golds for p, golds in chosen}, len(eligible)


# ---------------------------------------------------------------------------------------------------
# The filters (pure): why a generated pair is dropped, or None to keep it
# ---------------------------------------------------------------------------------------------------
def content_words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOPWORDS and len(w) > 1}


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
        from mixsd.models import context_length
        from mixsd.prompts import answer_end, pad_token_id

        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.end = answer_end(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer)
        self.limit = context_length(model)

    def _line_stop(self, tokens: list[int]) -> int | None:
        return len(tokens) if "\n" in self.tokenizer.decode(tokens) else None

    def _complete(self, prompts: list[list[int]]) -> list[tuple[str, bool]]:
        """Each prompt's greedy continuation up to its first line break: (text, whether it ended there)."""
        import torch

        from mixsd.generation import greedy_generate

        out: list[tuple[str, bool]] = [("", False)] * len(prompts)
        fits = [
            i for i, p in enumerate(prompts) if not self.limit or len(p) + self.max_new_tokens <= self.limit
        ]
        with torch.inference_mode():
            for k, tokens, finish in greedy_generate(
                self.model,
                [prompts[i] for i in fits],
                stop_ids=self.end.stop_ids,
                pad_id=self.pad_id,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                text_stop=self._line_stop,
            ):
                text, ended = _first_line(self.tokenizer.decode(tokens, skip_special_tokens=True))
                out[fits[k]] = (text, ended or finish == "stop")
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def questions(self, jobs: list[tuple[Passage, str]]) -> list[tuple[list[int], str | None]]:
        """(the conversation so far, the question or None) for each (passage, question start)."""
        from mixsd.prompts import encode_prompt

        bases = {}
        prompts = []
        for passage, start in jobs:
            if passage.id not in bases:
                bases[passage.id] = encode_prompt(self.tokenizer, QA_INSTRUCTION.format(passage=passage.text))
            prompts.append(bases[passage.id] + self.encode(f"Question: {start}"))
        done = []
        for (passage, start), (text, ended) in zip(jobs, self._complete(prompts), strict=True):
            question = " ".join(f"{start}{text}".split()) if ended else None
            done.append((bases[passage.id], question))
        return done

    def answers(self, jobs: list[tuple[list[int], str]]) -> list[str | None]:
        """The answer the model writes after its question, in the same conversation."""
        prompts = [base + self.encode(f"Question: {question}\nAnswer:") for base, question in jobs]
        return [clean_answer(text) for text, _ in self._complete(prompts)]


def write_pairs(
    passages: list[Passage],
    writer: QAWriter,
    config: DocumentsConfig,
    gold_questions: dict[str, set[str]],
) -> list[dict[str, Any]]:
    """Every candidate pair of every passage, in order, each with `kept` and, when dropped, `reason`."""
    jobs = [(p, start) for p in passages for start in _starts(config.seed, p.id, config.candidates)]
    written = writer.questions(jobs)
    candidates: list[dict[str, Any]] = []
    seen: dict[str, set[str]] = {}
    for (passage, start), (_, question) in zip(jobs, written, strict=True):
        known = seen.setdefault(passage.id, set())
        reason = question_problem(
            question, passage.text, config.min_shared_words, known, gold_questions.get(passage.id, set())
        )
        if question is not None:
            known.add(squad_normalize(question))
        candidates.append(
            {"passage": passage.id, "start": start, "question": question, "answer": None, "reason": reason}
        )
    asked = [i for i, c in enumerate(candidates) if c["reason"] is None]
    answers = writer.answers([(written[i][0], candidates[i]["question"]) for i in asked])
    by_id = {p.id: p for p in passages}
    kept: Counter[str] = Counter()
    for i, answer in zip(asked, answers, strict=True):
        candidate = candidates[i]
        candidate["answer"] = answer
        reason, span = answer_problem(
            candidate["question"], answer, by_id[candidate["passage"]].text, config.max_answer_words
        )
        if reason is None and kept[candidate["passage"]] >= config.questions:
            reason = "over_limit"
        candidate["reason"], candidate["span"] = reason, span
        if reason is None:
            kept[candidate["passage"]] += 1
    for candidate in candidates:
        candidate["kept"] = candidate["reason"] is None
    return candidates


# ---------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------
def _qa_record(record_id: str, question: str, answer: str, style: str, passage: Passage) -> dict[str, Any]:
    record = make_record(question, answer, record_id, style)
    return {**record, "context": passage.text, "passage": passage.id}


def split_pairs(
    candidates: list[dict[str, Any]], passages: list[Passage], config: DocumentsConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """train and held-out records: per passage, `heldout` of its kept pairs (seeded), one always trained."""
    by_passage: dict[str, list[dict[str, Any]]] = {}
    for candidate in candidates:
        if candidate["kept"]:
            by_passage.setdefault(candidate["passage"], []).append(candidate)
    train, heldout = [], []
    for passage in passages:
        pairs = by_passage.get(passage.id, [])
        rng = random.Random(int(sha256_text(f"{config.seed}\x00heldout\x00{passage.id}")[:16], 16))
        held = set(rng.sample(range(len(pairs)), min(config.heldout, max(len(pairs) - 1, 0))))
        for k, pair in enumerate(pairs):
            record = _qa_record(
                f"{passage.id}-q{k}", pair["question"], pair["span"], config.answer_style, passage
            )
            (heldout if k in held else train).append(record)
    return train, heldout


def gold_records(
    passages: list[Passage], golds: dict[str, list[GoldQuestion]], style: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The SQuAD questions closed book (the question alone) and open book (the passage before it)."""
    closed, opened = [], []
    for passage in passages:
        for gold in golds.get(passage.position, []) if passage.source == SQUAD_SOURCE else []:
            record = make_record(gold.question, gold.answers[0], f"squad-{gold.id}", style)
            record.update(answers=gold.answers, passage=passage.id)
            closed.append(record)
            prompt = OPEN_BOOK_PROMPT.format(passage=passage.text, prompt=record["prompt"])
            opened.append({**record, "id": f"squad-open-{gold.id}", "prompt": prompt})
    return closed, opened


def read_inputs(
    config: DocumentsConfig, tokenizer, skips: Skips
) -> tuple[list[Passage], dict, dict[str, Any]]:
    """Every passage (documents, then SQuAD paragraphs), the gold questions, and what was read from where."""

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    paragraphs: list[Paragraph] = []
    sources: list[dict[str, Any]] = []
    if config.inputs:
        for path, name in input_files(config.inputs, skips):
            found = read_document(path, name, skips)
            paragraphs += found
            sources.append({"name": name, "sha256": sha256_file(path), "paragraphs": len(found)})
    golds: dict[str, list[GoldQuestion]] = {}
    squad_info: dict[str, Any] = {}
    passages = split_passages(
        paragraphs, count_tokens, config.max_passage_tokens, config.min_passage_words, skips
    )
    if config.squad:
        from mixsd.corpora.probes import SDIST_NAME, read_members
        from mixsd.models import cache_dir

        sdist = Path(config.sdist) if config.sdist else cache_dir() / "downloads" / SDIST_NAME
        if not sdist.is_file():
            raise InputError(
                f"not found; run `mixsd probes fetch` first or pass --sdist PATH ({SDIST_NAME})", sdist
            )
        squad_paragraphs, golds, eligible = squad_documents(
            read_members(sdist)["squad"], config.squad, count_tokens, config.max_passage_tokens
        )
        passages += split_passages(squad_paragraphs, count_tokens, config.max_passage_tokens, 1, skips)
        squad_info = {
            "sdist": {"name": sdist.name, "sha256": sha256_file(sdist)},
            "paragraphs": [p.position for p in squad_paragraphs],
            "eligible_paragraphs": eligible,
            "license": SQUAD_LICENSE,
        }
    return passages, golds, {"sources": sources, "squad": squad_info}


def build_documents(
    config: DocumentsConfig, *, model=None, tokenizer=None, qa_tokenizer=None, writer=None
) -> dict[str, Any]:
    """Read, split, write the pairs, filter, and write the corpus folder; return its manifest.

    `model` / `qa_tokenizer`: the QA model in memory (else loaded by name); `writer`: what writes the
    pairs, with QAWriter's `questions` and `answers` (default: a QAWriter of the QA model)."""
    # here, not at the top: the other corpus commands of this package need no torch
    from mixsd import models

    handles: dict[str, models.ModelHandle] = {}

    def resolved(name: str) -> models.ModelHandle:  # each model resolved once, whatever it is loaded for
        if name not in handles:
            handles[name] = models.resolve_model(name)
        return handles[name]

    skips = Skips(config.skip_bad)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(resolved(config.model), trust_remote_code=config.trust_remote_code)
    passages, golds, read = read_inputs(config, tokenizer, skips)
    if not passages:
        raise InputError(
            "no passages to write questions about"
            + (f" ({skips.count} inputs skipped: {skips.listed[0]['reason']} ...)" if skips.count else ""),
            field="inputs",
        )
    qa_name = config.qa_model or config.model
    if writer is None:
        source = (
            model
            if model is not None
            else models.load_config(resolved(qa_name), trust_remote_code=config.trust_remote_code)
        )
        context = models.context_length(source)
    else:
        context = None
    # the prompt around a passage: instruction and worked example (about 120 tokens), question, answer
    room = config.max_passage_tokens + 3 * config.max_new_tokens + 256
    if context is not None and room > context:
        raise InputError(
            f"passages of {config.max_passage_tokens} tokens and their prompts (about {room} tokens) do not fit "
            f"the QA model's context of {context} tokens; lower --max-passage-tokens",
            field="max_passage_tokens",
        )
    # inputs are valid: now the model
    config.set_threads()
    if writer is None:
        if model is None:
            model, qa_tokenizer = models.load_for_inference(
                resolved(qa_name),
                device=config.device,
                dtype=config.dtype,
                trust_remote_code=config.trust_remote_code,
            )
        writer = QAWriter(model, qa_tokenizer or tokenizer, config.max_new_tokens, config.batch_size)
    gold_questions = {
        p.id: {squad_normalize(g.question) for g in golds.get(p.position, [])}
        for p in passages
        if p.source == SQUAD_SOURCE
    }
    candidates = write_pairs(passages, writer, config, gold_questions)
    out = Path(config.out)
    atomic_write_jsonl(out / PASSAGES_FILE, [p.to_json() for p in passages])
    atomic_write_jsonl(out / CANDIDATES_FILE, candidates)
    train, heldout = split_pairs(candidates, passages, config)
    if not train:
        reasons = Counter(c["reason"] for c in candidates)
        raise InputError(
            f"no generated pair passed the filters ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}); "
            f"every candidate is in {CANDIDATES_FILE}",
            out,
        )
    outputs = {"train.jsonl": train, "heldout.jsonl": heldout}
    if golds:
        outputs["gold.jsonl"], outputs["gold_open.jsonl"] = gold_records(passages, golds, config.answer_style)
    for name, rows in outputs.items():
        atomic_write_jsonl(out / name, rows)
    for stale in {"heldout.jsonl", "gold.jsonl", "gold_open.jsonl"} - set(outputs):
        (out / stale).unlink(missing_ok=True)  # a rerun without --squad leaves no old gold split behind
    reasons = Counter(c["reason"] for c in candidates if not c["kept"])
    extra: dict[str, Any] = {}
    if read["squad"]:
        extra["squad"] = {**read["squad"], "gold_questions": len(outputs["gold.jsonl"])}
    return write_manifest(
        out,
        GENERATOR,
        VERSION,
        [*outputs, PASSAGES_FILE, CANDIDATES_FILE],
        seed=config.seed,
        answer_match="entity",
        answer_style=config.answer_style,
        model=config.model,
        qa_model=qa_name,
        options={
            name: getattr(config, name)
            for name in (
                "questions",
                "heldout",
                "candidates",
                "max_passage_tokens",
                "min_passage_words",
                "max_answer_words",
                "min_shared_words",
                "max_new_tokens",
                "dtype",
            )
        },
        sources=read["sources"],
        counts={
            "passages": len(passages),
            "candidates": len(candidates),
            "kept": sum(c["kept"] for c in candidates),
            "passages_with_pairs": len({r["passage"] for r in train}),
            "train": len(train),
            "heldout": len(heldout),
        },
        dropped={reason: reasons.get(reason, 0) for reason in DROP_REASONS},
        skipped={"count": skips.count, "items": skips.listed},
        **extra,
    )


def documents_command(config: DocumentsConfig) -> dict[str, Any]:
    manifest = build_documents(config)
    counts = manifest["counts"]
    dropped = ", ".join(f"{r} {n}" for r, n in manifest["dropped"].items() if n)
    files = ", ".join(
        f"{name}: {entry['records']}" for name, entry in manifest["files"].items() if "/" not in name
    )
    print(
        f"{counts['passages']} passages, {counts['candidates']} generated pairs, {counts['kept']} kept "
        f"(dropped: {dropped or 'none'}); wrote {config.out}: {files}"
        + (
            f"; skipped {manifest['skipped']['count']} inputs (listed in manifest.json)"
            if manifest["skipped"]["count"]
            else ""
        )
    )
    return manifest
