"""How a probe file's items become an lm-evaluation-harness task: the documents and the task settings of
each probe kind the harness can score. `mixsd.evaluation.probe_kinds` registers a format with each such kind (its
`lm_eval` field); `mixsd.evaluation.lmeval_export` writes the files. Pure: the harness is not imported.

The multiple-choice format reproduces mixsd's strings exactly: lm-eval scores `context + target_delimiter +
choice` after moving the context's trailing whitespace into the continuation (`LM._encode_pair`); with
`target_delimiter: ""` and `context = query + " "` (or `query` when the query already ends in whitespace, or
every choice starts with it) that is `mixsd.evaluation.scoring.choice_tokens`' split, token for token, and the choices
keep their own text, so lm-eval's `acc_norm` divides by the same character counts as mixsd's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, read_jsonl

Documents = Callable[[Path, list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class LmEvalFormat:
    """The lm-eval task a probe kind is exported as."""

    # the task YAML's fields that say how a document is scored (lm-eval's `output_type` first), in order
    task_fields: tuple[tuple[str, Any], ...]
    metrics: tuple[str, ...]  # what the task reports; the first is its headline unless a probe names another
    # declared as a mean where higher is better; otherwise the harness's own aggregations (perplexities are
    # weighted by words / bytes)
    mean_metrics: bool
    documents: Documents  # the task's data file, from the probe's items (InputError names the file's line)

    def metric_list(self) -> list[dict[str, Any]]:
        if self.mean_metrics:
            return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in self.metrics]
        return [{"metric": m} for m in self.metrics]


def mc_context(query: str, choices: list[str]) -> str | None:
    """The lm-eval context (with `target_delimiter: ""`) under which the harness scores exactly the tokens
    `mixsd.evaluation.scoring.choice_tokens` scores; None when no single context does (some choices of the item start
    with whitespace and others do not: mixsd puts the space before some choices only)."""
    if query[-1:].isspace() or all(c[:1].isspace() for c in choices):
        return query  # no space is added; the harness moves the query's trailing whitespace, as mixsd does
    if any(c[:1].isspace() for c in choices):
        return None
    return query + " "  # the harness moves this space into every continuation: " " + choice, as mixsd


def multiple_choice_documents(path: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = {str(obj.get("id", line)): line for line, obj in read_jsonl(path)}
    docs = []
    for item in items:
        if not item["query"].strip():
            raise InputError(
                "empty query: lm-eval conditions an empty context on the BOS token, mixsd on EOS, so the "
                "scores would differ; give the item a query",
                path,
                lines.get(item["id"]),
                "query",
            )
        context = mc_context(item["query"], item["choices"])
        if context is None:
            raise InputError(
                "some choices start with whitespace and others do not; lm-eval joins every choice of an "
                "item to its context the same way, so strip the choices or start all of them with a space",
                path,
                lines.get(item["id"]),
                "choices",
            )
        docs.append(
            {
                "id": item["id"],
                "query": item["query"],
                "context": context,
                "choices": item["choices"],
                "gold": item["gold"],
            }
        )
    return docs


def text_documents(path: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": item["id"], "text": item["text"]} for item in items]


MULTIPLE_CHOICE_TASK = LmEvalFormat(
    task_fields=(
        ("output_type", "multiple_choice"),  # lm-eval's own word for a choice among options
        ("doc_to_text", "context"),  # column names: the strings are taken as they are, never templated
        ("doc_to_choice", "choices"),
        ("doc_to_target", "gold"),
        ("target_delimiter", ""),  # the context carries mixsd's separator (see mc_context)
    ),
    metrics=("acc", "acc_norm"),
    mean_metrics=True,
    documents=multiple_choice_documents,
)
TEXT_TASK = LmEvalFormat(
    task_fields=(("output_type", "loglikelihood_rolling"), ("doc_to_text", ""), ("doc_to_target", "text")),
    metrics=("word_perplexity", "byte_perplexity", "bits_per_byte"),
    mean_metrics=False,
    documents=text_documents,
)
