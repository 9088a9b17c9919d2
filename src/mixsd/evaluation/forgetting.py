"""What training cost a cell, as three measures kept apart, none of them defined by one arm's target format.

`instructions.is_collapsed` ("\\boxed{" anywhere, or "answer is" in the first sentence) is the shape of
the SFT targets: it flags an SFT model that answers every question "The answer is X." but never a model
trained on statements or on MixSD's own wording that does the same in its own shape. Here each cell is
judged by the shape of *its own* training targets:

format transfer   a generative retention answer (known facts, in-context facts, instructions) takes the
                  shape of the cell's own training targets: the first sentence of the answer, with names
                  and numbers masked (`answer_shape`), equals the masked first sentence of one of the
                  cell's targets. SFT's "The answer is Shiboshend. \\boxed{Shiboshend}" has the shape
                  "the answer is E", a statement "Vedux Vudratrox lives in Shiboshend." "E lives in E",
                  so "The answer is Vienna." takes SFT's shape and "Arizona lives in Phoenix." the
                  statement's. The base model's answers to the same items are judged against the same
                  shapes (what the base does anyway: a short MixSD target shape like "E" can fit base
                  answers too); `paired` compares the two item by item (wrong_to_right: items whose answer
                  took the shape only after training).
leakage           an answer names an invented entity of the training corpus (the records' `check` and
                  `subject`) that is neither in its prompt nor among its accepted answers
                  (`taxonomy.Taxonomy.leaked`: whole words after normalization, names of 3+ characters).
erased knowledge  what retention.json already holds: multiple-choice accuracy (acc and acc_norm) and
                  perplexity against the base (`metrics.probe_columns`: chance-normalized and raw
                  retention, right->wrong flips, McNemar p), the known facts lost (right -> wrong among
                  the items the base answers right) and KL per token.

Rates come with their count and 95% Wilson interval (`metrics.rate`), per probe and over every generative
probe. Pure functions over the files' contents; `read_forgetting` reads a cell's files.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, read_json_object, read_jsonl
from mixsd.core.instructions import first_sentence
from mixsd.core.metrics import pair_rows, paired_comparison, rate
from mixsd.evaluation.probe_kinds import GENERATIVE, PROBE_KINDS
from mixsd.evaluation.taxonomy import Taxonomy

# A word, a \boxed{...} group, or one punctuation mark.
_TOKEN = re.compile(r"\\boxed\{[^{}]*\}|[^\W_][\w'\u2019-]*|[^\w\s]")
MASK = "E"
SENTENCE_END_MARKS = frozenset(".!?")
# Capitalized only because they begin the sentence: these stay words, every other capitalized word or
# number is a name (masked).
SENTENCE_START_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "he",
        "she",
        "they",
        "we",
        "you",
        "i",
        "my",
        "his",
        "her",
        "their",
        "our",
        "your",
        "in",
        "on",
        "at",
        "of",
        "for",
        "from",
        "to",
        "by",
        "with",
        "as",
        "yes",
        "no",
        "not",
        "what",
        "which",
        "who",
        "where",
        "when",
        "why",
        "how",
        "is",
        "are",
        "was",
        "were",
        "and",
        "but",
        "or",
        "so",
        "if",
        "because",
        "sure",
        "certainly",
        "well",
        "one",
    ]
)


# --------------------------------------------------------------------------------------------------
# Format transfer
# --------------------------------------------------------------------------------------------------
def answer_shape(text: str) -> str:
    """The shape of a text's first sentence: names and numbers masked as E (a run of them as one E; a
    capitalized word counts as a name unless it begins the sentence and is a common word), `\\boxed{...}`
    as `\\boxed{E}`, other words lower-cased, punctuation kept but the sentence's final marks, tokens
    joined by single spaces."""
    shape: list[str] = []
    for index, token in enumerate(_TOKEN.findall(first_sentence(text))):
        if token.startswith("\\boxed{"):
            shape.append("\\boxed{" + MASK + "}")
        elif token[0].isdigit() or (
            token[0].isupper() and not (index == 0 and token.lower() in SENTENCE_START_WORDS)
        ):
            if not shape or shape[-1] != MASK:
                shape.append(MASK)
        else:
            shape.append(token.lower())
    while shape and shape[-1] in SENTENCE_END_MARKS:  # "The answer is Vienna" ends as "... Vienna."
        shape.pop()
    return " ".join(shape)


def target_shapes(rows: Iterable[dict[str, Any]]) -> frozenset[str]:
    """The shapes of a cell's training targets (each row's decoded `text`; empty shapes left out)."""
    shapes = (answer_shape(str(row.get("text") or "")) for row in rows)
    return frozenset(shape for shape in shapes if shape)


def _generative(predictions: Iterable[dict[str, Any]], who: str) -> list[dict[str, Any]]:
    return [r for r in predictions if r.get("who") == who and r.get("kind") == GENERATIVE.row_tag]


def _by_probe(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    probes: dict[str, list[dict[str, Any]]] = {"all": list(rows)}
    for row in rows:
        probes.setdefault(str(row["split"]), []).append(row)
    return probes


def _compare(model: list[dict[str, Any]], base: list[dict[str, Any]], flag: str) -> dict[str, Any]:
    """Model and base rates of a per-answer flag, and the item-by-item comparison (base -> model)."""
    out: dict[str, Any] = {"model": rate(sum(r[flag] for r in model), len(model))}
    if base:
        out["base"] = rate(sum(r[flag] for r in base), len(base))
        # ids are unique within a probe only: paired by (probe, id)
        keyed = lambda rows: [{**r, "id": (r["split"], r["id"])} for r in rows]  # noqa: E731
        out["paired"] = paired_comparison(*pair_rows(keyed(base), keyed(model), flag))
    return out


def format_transfer(predictions: Iterable[dict[str, Any]], shapes: frozenset[str]) -> dict[str, Any]:
    """Per generative probe and over all ("all"): answers in the shape of `shapes` (a cell's
    `target_shapes`), the model's and the base's, and the paired comparison."""
    predictions = list(predictions)
    flagged = {
        who: [
            {**r, "in_shape": answer_shape(str(r.get("output") or "")) in shapes}
            for r in _generative(predictions, who)
        ]
        for who in ("model", "base")
    }
    model, base = _by_probe(flagged["model"]), _by_probe(flagged["base"])
    return {probe: _compare(rows, base.get(probe, []), "in_shape") for probe, rows in model.items()}


# --------------------------------------------------------------------------------------------------
# Leakage
# --------------------------------------------------------------------------------------------------
def training_entities(corpus_rows: Iterable[dict[str, Any]], min_chars: int = 3) -> frozenset[str]:
    """The invented names of a training corpus: its records' `check` and, where present, `subject`
    (normalized, as taxonomy.Taxonomy matches them; numbers are no names)."""
    names = [
        value
        for row in corpus_rows
        for key in ("check", "subject")
        if isinstance(value := row.get(key), str) and value.strip()
    ]
    return Taxonomy.entity_set(names, min_chars)


def leakage(
    predictions: Iterable[dict[str, Any]],
    items: dict[str, dict[str, dict[str, Any]]],
    entities: frozenset[str],
) -> dict[str, Any]:
    """Per generative probe and over all: answers naming a training entity that is neither in the item's
    prompt nor among its accepted answers; model and base, paired, and the model's leaked names by count.
    `items`: probe name -> item id -> the probe item (its `prompt` and `check`)."""
    taxonomy = Taxonomy(entities=entities)
    flagged: dict[str, list[dict[str, Any]]] = {}
    for who in ("model", "base"):
        flagged[who] = []
        for row in _generative(predictions, who):
            item = items.get(str(row["split"]), {}).get(str(row["id"]))
            if item is None:
                raise InputError(
                    f"probe {row['split']} has no item {row['id']!r}: the predictions come from other probe files"
                )
            output = str(row.get("output") or "")
            accepted = Taxonomy.entity_set(_accepted(item), 0)
            leaked = [name for name in taxonomy.leaked(output, item["prompt"], "") if name not in accepted]
            flagged[who].append({**row, "leaked": leaked, "leaks": bool(leaked)})
    model, base = _by_probe(flagged["model"]), _by_probe(flagged["base"])
    out = {}
    for probe, rows in model.items():
        out[probe] = _compare(rows, base.get(probe, []), "leaks")
        out[probe]["names"] = dict(Counter(name for r in rows for name in r["leaked"]).most_common())
    return out


def _accepted(item: dict[str, Any]) -> list[str]:
    check = item.get("check")
    return [check] if isinstance(check, str) else [c for c in check or [] if isinstance(c, str)]


# --------------------------------------------------------------------------------------------------
# Erased knowledge
# --------------------------------------------------------------------------------------------------
def erased_knowledge(retention: dict[str, Any]) -> dict[str, Any]:
    """The retention file's measures of lost knowledge, per probe (see the module docstring)."""
    out: dict[str, Any] = {
        kind.erased.section: kind.erased.empty() for kind in PROBE_KINDS.values() if kind.erased is not None
    }
    for probe, summary in (retention.get("probes") or {}).items():
        kind = PROBE_KINDS.get(summary.get("kind"))
        if kind is not None and kind.erased is not None:
            section = kind.erased.section
            out[section] = kind.erased.add(out[section], probe, summary)
    return out


# --------------------------------------------------------------------------------------------------
# A cell
# --------------------------------------------------------------------------------------------------
def forgetting(
    predictions: Sequence[dict[str, Any]],
    items: dict[str, dict[str, dict[str, Any]]],
    target_rows: Sequence[dict[str, Any]],
    entities: frozenset[str],
    retention: dict[str, Any],
) -> dict[str, Any]:
    """The three measures of one cell: `predictions` (its retention.predictions.jsonl), `items` (the
    generative probes' items by probe and id), `target_rows` (its training targets; none for the base
    model or OPSD: no format to transfer), `entities` (`training_entities` of its corpus), `retention`
    (its retention.json)."""
    shapes = target_shapes(target_rows)
    return {
        "format_transfer": {"target_shapes": len(shapes), **format_transfer(predictions, shapes)}
        if shapes
        else None,
        "leakage": leakage(predictions, items, entities),
        "erased_knowledge": erased_knowledge(retention),
    }


def read_probe_items(
    folder: str | os.PathLike, probes: Iterable[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The items of the named generative probes (FOLDER/<probe>.jsonl) by probe and id (an item without
    an id is named by its line, as `mixsd eval` names it)."""
    items: dict[str, dict[str, dict[str, Any]]] = {}
    for probe in probes:
        path = Path(folder) / f"{probe}.jsonl"
        items[probe] = {}
        for line, obj in read_jsonl(path):
            if not isinstance(obj.get("prompt"), str):
                raise InputError("expected a string", path, line, "prompt")
            items[probe][str(obj.get("id", line))] = obj
    return items


def read_forgetting(
    cell: str | os.PathLike,
    corpus: str | os.PathLike,
    targets: str | os.PathLike | None = None,
    probes: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`forgetting` over a cell's folder (its retention.json and retention.predictions.jsonl), its training
    corpus file (train.jsonl), its target file (None: the cell trains on none) and the folder of the
    retention probes (None: the `data` the retention.json was made with)."""
    cell = Path(cell)
    retention = read_json_object(cell / "retention.json")
    predictions = [row for _, row in read_jsonl(cell / "retention.predictions.jsonl")]
    folder = probes if probes is not None else (retention.get("config") or {}).get("data")
    if folder is None:
        raise InputError("names no probe folder (config.data): pass the folder", cell / "retention.json")
    generative = sorted({str(r["split"]) for r in predictions if r.get("kind") == GENERATIVE.row_tag})
    items = read_probe_items(folder, generative)
    entities = training_entities(row for _, row in read_jsonl(corpus))
    target_rows = [row for _, row in read_jsonl(targets)] if targets is not None else []
    return forgetting(predictions, items, target_rows, entities, retention)
