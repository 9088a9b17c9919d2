"""What became of a cell's targets: the verified, faithful, fallback and dropped shares of a `mix` run, and
how many verified targets hold tokens the base model would almost never write (NLL > 5 nats).

Over the units `mix` drew (records x generations: its summary's `records`; without the summary, the rows
of the file, so nothing counts as dropped):

    verified         rows whose own target passed verification (`correct`, source `mixsd`)
    faithful         verified rows whose naive-chosen tokens all get an expert log-prob >= -5
                     (`low_expert_tokens` == 0, mixsd.method.fidelity): the fidelity score's faithful targets;
                     None when the rows carry no fidelity score (targets written before it)
    fallback         rows written with the ground-truth answer instead (`--on-failure answer`)
    kept_unverified  rows written although they failed (`--on-failure keep`)
    dropped          units with no row in the file (`--on-failure drop`, prompts too long): records - written

each with its count, share and 95% Wilson interval (`metrics.rate`), and `faithful_of_verified` beside.

High NLL (strictly above metrics.HIGH_NLL_NATS), among the verified targets and among every written one:

    per_token   tokens above the cut / tokens
    per_target  targets holding at least one token above the cut / targets

read from the cell's nll.json (`mixsd analyze nll`: per-record `high_nll_tokens`, every target token, the
end token included). An nll.json without that field (written before it existed), or none, falls back on
the log-probs `mix` stored: `logprob_naive` is the same base model's log-prob of each token given the same
naive prompt and prefix, so -logprob_naive is the token's NLL there (rounded to 5 decimals; the `S` end
token appended by the plain format's stop rule has none and is left out; ground-truth rows have none, so
`written` is None where the file holds any). `source` says which was read.

Pure functions over the files' contents; `read_target_accounting` reads the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mixsd.core.files import InputError, read_json_object, read_jsonl
from mixsd.core.metrics import HIGH_NLL_NATS, rate
from mixsd.method.fidelity import LOW_EXPERT_LOGPROB

# `source` of a target row: its own mixed target, the ground truth written instead (--on-failure answer)
OWN_SOURCES = ("mixsd", None)
FALLBACK_SOURCE = "answer_fallback"


def is_verified(row: dict[str, Any]) -> bool:
    """A row whose own target passed verification (not a fallback, not one kept although it failed)."""
    return bool(row.get("correct")) and row.get("source") in OWN_SOURCES


def _unit(row: dict[str, Any]) -> tuple[str, int]:
    return (str(row["id"]), int(row.get("generation") or 0))


def high_nll_counts(
    rows: Sequence[dict[str, Any]], nll: dict[str, Any] | None = None
) -> tuple[list[tuple[int, int] | None], str]:
    """(tokens above the cut, tokens) per row, in the rows' order, and where they were read from:
    "nll.json" (its per-record `high_nll_tokens`) or "logprob_naive" (the target file); None for a row
    neither covers."""
    records = (nll or {}).get("per_record") or []
    if records and all("high_nll_tokens" in record for record in records):
        by_unit = {
            _unit(record): (int(record["high_nll_tokens"]), int(record["tokens"])) for record in records
        }
        return [by_unit.get(_unit(row)) for row in rows], "nll.json"
    counts: list[tuple[int, int] | None] = []
    for row in rows:
        logprobs = [lp for lp in row.get("logprob_naive") or [] if lp is not None]
        counts.append((sum(-lp > HIGH_NLL_NATS for lp in logprobs), len(logprobs)) if logprobs else None)
    return counts, "logprob_naive"


def high_nll_share(counts: Sequence[tuple[int, int] | None]) -> dict[str, Any] | None:
    """Per token and per target high-NLL shares of a group of targets; None when any lacks its counts
    (a share over part of the group would pass for the whole)."""
    if not counts or any(c is None for c in counts):
        return None
    known = [c for c in counts if c is not None]
    return {
        "per_token": rate(sum(high for high, _ in known), sum(tokens for _, tokens in known)),
        "per_target": rate(sum(high > 0 for high, _ in known), len(known)),
    }


def account_targets(
    rows: Sequence[dict[str, Any]], records: int | None = None, nll: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The accounting of one target file (see the module docstring). `rows`: the file's rows; `records`: the
    units `mix` drew (its summary's `records`; None: the rows); `nll`: the cell's nll.json (None: the
    stored log-probs)."""
    units = len(rows) if records is None else records
    if units < len(rows):
        raise ValueError(f"{len(rows)} rows but only {units} records drawn")
    verified = [row for row in rows if is_verified(row)]
    # the stored count is taken at LOW_EXPERT_LOGPROB; rows from before the fidelity score have none
    scored = all(row.get("low_expert_tokens") is not None for row in verified)
    faithful = sum(row["low_expert_tokens"] == 0 for row in verified) if scored else None
    counts, source = high_nll_counts(rows, nll)
    return {
        "records": units,
        "written": len(rows),
        "verified": rate(len(verified), units),
        "faithful": None if faithful is None else rate(faithful, units),
        "faithful_of_verified": None if faithful is None else rate(faithful, len(verified)),
        "low_expert_logprob": LOW_EXPERT_LOGPROB,
        "fallback": rate(sum(row.get("source") == FALLBACK_SOURCE for row in rows), units),
        "kept_unverified": rate(
            sum(not row.get("correct") and row.get("source") in OWN_SOURCES for row in rows), units
        ),
        "dropped": rate(units - len(rows), units),
        "high_nll": {
            "threshold": HIGH_NLL_NATS,
            "source": source,
            "verified": high_nll_share(
                [count for row, count in zip(rows, counts, strict=True) if is_verified(row)]
            ),
            "written": high_nll_share(counts),
        },
    }


def read_target_accounting(
    targets: str | os.PathLike,
    summary: str | os.PathLike | None = None,
    nll: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`account_targets` over a cell's files: its target file, `mix`'s summary beside it
    (TARGETS.summary.json; None: no dropped count) and its nll.json (None: the stored log-probs)."""
    rows = [row for _, row in read_jsonl(targets)]
    for line, row in enumerate(rows, start=1):
        if "id" not in row:
            raise InputError("missing required field", targets, line, "id")
    records = None
    if summary is not None:
        summary_data = read_json_object(summary)
        records = summary_data.get("records")
        if not isinstance(records, int) or records < len(rows):
            raise InputError(
                f"expected the number of records drawn (at least {len(rows)})", summary, field="records"
            )
    return account_targets(rows, records, read_json_object(nll) if nll is not None else None)
