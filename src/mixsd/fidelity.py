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

Expert-chosen tokens are left out on purpose: at T=0 they are the expert's argmax, and at T>0 a sample
from the expert itself, so a low expert log-prob there says nothing about the fact.

`roc_auc` and `flag_rates` measure how well a score separates hand-labelled faithful targets from
unfaithful ones (docs/results.md, "Target fidelity"; the labels are data/fidelity_labels.jsonl).
"""

from __future__ import annotations

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
