"""Target fidelity: how far a mixed target strays from what the model that knows the fact would write.

Loose (entity) verification only asks whether the answer appears in the target, so it accepts a target
that wraps the answer in a wrong statement ("Kukend Kreikugern is a fictional city in the game
Questebeil." when the fact is that he lives in Questebeil). Such errors enter through naive-chosen tokens:
the naive conditional does not know the fact and confabulates, the expert conditional (the same model
with the fact in context) would not have written that token. So the score needs no labels and no extra
forward pass; it is read off the log-probs `mix` stores for every target token:

    min_expert_logprob  the lowest log-probability the expert assigns to a naive-chosen token
                        (None when the target has no naive token: nothing to distrust)
    low_expert_tokens   how many naive-chosen tokens the expert gives a log-prob below LOW_EXPERT_LOGPROB
    naive_expert_nll    the expert's total surprise at the naive-chosen tokens: minus the sum of their
                        expert log-probs (0 without naive tokens); grows with every doubtful token, not
                        only the worst one, and so also with length

Expert-chosen tokens are left out on purpose: at T=0 they are the expert's argmax, and at T>0 a sample
from the expert itself, so a low expert log-prob there says nothing about the fact.

`roc_auc` and `flag_rates` measure how well a score separates hand-labelled faithful targets from
unfaithful ones (docs/results.md, "Target fidelity"; the labels are data/fidelity_labels.jsonl).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

# The paper's "high NLL" cut (tokens with NLL > 5 nats, used in the target-NLL analysis) used here as the
# cut of a token the expert "would never write".
LOW_EXPERT_LOGPROB = -5.0


@dataclass(frozen=True)
class Fidelity:
    """The fidelity scores of one target (see the module docstring)."""

    min_expert_logprob: float | None
    low_expert_tokens: int
    naive_tokens: int
    naive_expert_nll: float = 0.0


def target_fidelity(
    branch: Sequence[str],
    logprob_expert: Sequence[float | None],
    low: float = LOW_EXPERT_LOGPROB,
) -> Fidelity:
    """Score one target from its branch letters and the expert's log-prob of each of its tokens.

    Only tokens with branch letter "N" count; entries whose log-prob is None (the appended end token,
    letter "S") are skipped whatever their letter.
    """
    if len(branch) != len(logprob_expert):
        raise ValueError(
            f"branch has {len(branch)} letters but logprob_expert has {len(logprob_expert)} entries"
        )
    naive = [
        lp for letter, lp in zip(branch, logprob_expert, strict=True) if letter == "N" and lp is not None
    ]
    return Fidelity(
        min_expert_logprob=min(naive) if naive else None,
        low_expert_tokens=sum(lp < low for lp in naive),
        naive_tokens=len(naive),
        naive_expert_nll=-sum(naive, 0.0),
    )


def passes(fidelity: Fidelity, min_expert_logprob: float | None) -> bool:
    """The verification rule of `mix --min-expert-logprob X`: every naive token has expert log-prob >= X.

    No threshold (None) passes everything; a target without naive tokens always passes.
    """
    if min_expert_logprob is None or fidelity.min_expert_logprob is None:
        return True
    return fidelity.min_expert_logprob >= min_expert_logprob


def roc_auc(scores: Sequence[float | None], faithful: Sequence[bool]) -> float:
    """ROC AUC of `scores` (higher = more faithful) against labels: P(faithful scores above unfaithful).

    Ties count one half. A None score (a target without naive tokens) ranks above every number, as the
    verification rule treats it. Raises ValueError unless both classes are present.
    """
    if len(scores) != len(faithful):
        raise ValueError(f"{len(scores)} scores but {len(faithful)} labels")
    key = [float("inf") if s is None else float(s) for s in scores]
    positive = [k for k, label in zip(key, faithful, strict=True) if label]
    negative = [k for k, label in zip(key, faithful, strict=True) if not label]
    if not positive or not negative:
        raise ValueError("the ROC AUC needs at least one faithful and one unfaithful target")
    # O(n log n) by ranks would do, but the samples are hand-labelled (hundreds at most): the pair count
    # is the definition itself and cannot be wrong about ties.
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


@dataclass(frozen=True)
class FlagRates:
    """What a threshold does to a labelled sample: a target is flagged (rejected) when its score is below."""

    threshold: float
    flagged: int
    unfaithful_flagged: int  # true positives: the rule catches an unfaithful target
    faithful_flagged: int  # false positives: a good target redrawn for nothing
    precision: float | None  # of the flagged, the share unfaithful (None when nothing is flagged)
    recall: float | None  # of the unfaithful, the share flagged (None when no target is unfaithful)


def flag_rates(scores: Sequence[float | None], faithful: Sequence[bool], threshold: float) -> FlagRates:
    """Precision and recall of "score < threshold" as a detector of unfaithful targets (None never flags)."""
    if len(scores) != len(faithful):
        raise ValueError(f"{len(scores)} scores but {len(faithful)} labels")
    flags = [s is not None and s < threshold for s in scores]
    unfaithful = sum(not label for label in faithful)
    caught = sum(f and not label for f, label in zip(flags, faithful, strict=True))
    wrongly = sum(f and label for f, label in zip(flags, faithful, strict=True))
    flagged = caught + wrongly
    return FlagRates(
        threshold=threshold,
        flagged=flagged,
        unfaithful_flagged=caught,
        faithful_flagged=wrongly,
        precision=caught / flagged if flagged else None,
        recall=caught / unfaithful if unfaithful else None,
    )


def summarize_fidelity(
    scores: Sequence[float | None], low_counts: Sequence[int], threshold: float | None
) -> dict[str, float | int | None]:
    """The mix summary's `fidelity` entry over the written targets' scores."""
    numbers = sorted(s for s in scores if s is not None)
    median = None
    if numbers:
        mid = len(numbers) // 2
        median = numbers[mid] if len(numbers) % 2 else (numbers[mid - 1] + numbers[mid]) / 2
    return {
        "targets": len(scores),
        "without_naive_tokens": len(scores) - len(numbers),
        "min_expert_logprob_median": median,
        "min_expert_logprob_lowest": numbers[0] if numbers else None,
        # targets holding at least one naive token the expert gives log-prob < LOW_EXPERT_LOGPROB
        "with_low_expert_tokens": sum(count > 0 for count in low_counts),
        "low_expert_logprob": LOW_EXPERT_LOGPROB,
        "min_expert_logprob_threshold": threshold,
    }


def validate(rows: Sequence[dict], thresholds: Sequence[float]) -> dict[str, object]:
    """Separation figures of one group of labelled targets (rows of data/fidelity_labels.jsonl).

    Each row needs `faithful` (bool), `branch`, `min_expert_logprob`, `low_expert_tokens` and
    `naive_expert_nll`. Every score is oriented so that higher means more faithful (counts and
    surprises enter negated). The AUCs are None when the group holds only one class; the thresholds
    apply to `min_expert_logprob`.
    """
    faithful = [bool(row["faithful"]) for row in rows]
    scores = [row["min_expert_logprob"] for row in rows]
    oriented = {
        "min_expert_logprob": scores,
        "low_expert_tokens": [-row["low_expert_tokens"] for row in rows],
        "naive_expert_nll": [-row["naive_expert_nll"] for row in rows],
        # a trivial baseline every score must beat: longer targets hold more invented material
        "length": [-len(row["branch"]) for row in rows],
    }
    both = 0 < sum(faithful) < len(faithful)
    return {
        "targets": len(rows),
        "faithful": sum(faithful),
        **{f"auc_{name}": roc_auc(values, faithful) if both else None for name, values in oriented.items()},
        "thresholds": {str(t): flag_rates(scores, faithful, t).__dict__ for t in thresholds},
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mixsd.method.fidelity LABELS [--threshold X ...]`: the separation table of docs/results.md."""

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("labels", help="labelled targets (JSONL), e.g. data/fidelity_labels.jsonl")
    parser.add_argument(
        "--threshold", type=float, action="append", help="min-expert-logprob cut(s) to report"
    )
    args = parser.parse_args(argv)
    with open(args.labels, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    thresholds = args.threshold or [-3.0, -5.0]
    groups: dict[str, list[dict]] = defaultdict(list)
    groups["all"], groups["answer found (entity match)"] = [], []  # first in the table
    for row in rows:
        groups[f"sample {row['sample']}"].append(row)
        # a sample kept only because it passed a score threshold would bias that score's pooled figures
        if not row.get("selected_by_score"):
            groups["all"].append(row)
            if row["entity_match"]:
                groups["answer found (entity match)"].append(row)
    print(
        "group | targets | faithful | AUC min | AUC count | AUC nll | AUC length | "
        + " | ".join(f"P/R @ {t:g}" for t in thresholds)
    )
    for name, members in groups.items():
        result = validate(members, thresholds)

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        cells = [
            f"{fmt(r['precision'])}/{fmt(r['recall'])} ({r['flagged']} flagged)"
            for r in result["thresholds"].values()
        ]
        print(
            f"{name} | {result['targets']} | {result['faithful']} | {fmt(result['auc_min_expert_logprob'])} | "
            f"{fmt(result['auc_low_expert_tokens'])} | {fmt(result['auc_naive_expert_nll'])} | "
            f"{fmt(result['auc_length'])} | " + " | ".join(cells)
        )


if __name__ == "__main__":
    main()
