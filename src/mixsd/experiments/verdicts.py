"""The paper's claims, each decided on a grid's summary (`mixsd.experiments.grid_summary`) by a rule declared here
before the numbers were read; docs/results.md's verdict table shows them (`scripts/results.py`).

Rules (`verdicts`): memorization — every seed of MixSD's chosen setting reaches 95% (holds), none does
(does not hold), some do (partly); retention — the paired difference MixSD − SFT in the primary retention
metric at the highest matched level both reach with every seed: interval above 0 holds, below 0 does not
hold, else cannot tell; NLL — pooled Wilson intervals of the > 5 nats share disjoint; Fisher — the partial
r of the Fisher ratio against that of raw ‖Δθ‖²; retention against the self-rewrite (SDFT, not in the paper),
OPSD and MEMIT (an edit: its curve's one point) baselines by the retention rule, at the baseline's own
level when it reaches no declared level but at least OWN_LEVEL_FLOOR of the facts; in a grid of OPSD alone (its
sweep), whether OPSD learns at all (`_opsd_learns`); our extensions (EXTENSIONS: guarded mixing) against the
paper's MixSD by the retention rule, and against their aim, no loss at 95% (`_no_loss`). Fewer than MIN_SEEDS seeds per method: "cannot tell yet"
(a deterministic method, MEMIT, needs one).
"""

from __future__ import annotations

from typing import Any

from mixsd.core.metrics import wilson_interval

MIN_SEEDS = 3  # below this a method's verdict is "cannot tell yet"
# A baseline that reaches no declared level with every seed is compared with MixSD at its own level (the
# highest memorization every one of its seeds reaches; `grid_summary.compare_at_own_level`), but only from
# this floor up: below it the baseline has learnt under half of the facts, and "matched" retention would
# compare MixSD with a model barely changed (at 0% memorization any method keeps everything).
OWN_LEVEL_FLOOR = 0.5
CLAIMS = {
    "memorization": "MixSD reaches near-perfect training accuracy (≥ 95%)",
    "retention": "MixSD keeps more of what the model knew than SFT, at matched memorization",
    "nll": "MixSD targets have lower NLL under the base model (share of tokens > 5 nats)",
    "fisher": "Fisher-weighted displacement tracks the retention drop; raw displacement does not",
    # not the paper's claim: its closest ancestor as the baseline (issue 20), under the retention rule
    "retention_rewrite": "MixSD keeps more of what the model knew than the self-rewrite baseline (SDFT, not in "
    "the paper), at matched memorization",
    "retention_opsd": "MixSD keeps more of what the model knew than on-policy self-distillation (OPSD), at "
    "matched memorization",
    "retention_memit": "MixSD keeps more of what the model knew than MEMIT editing, at matched memorization",
    # ours, not the paper's (issue 19 §4): guarded mixing against the paper's MixSD, and against its own aim
    "retention_guard": "Guarded mixing (ours, not in the paper: a naive token only inside the expert's top-p) "
    "keeps more of what the model knew than plain MixSD λ=0.3, at matched memorization",
    "guard_no_loss": "Guarded mixing (ours) reaches 95% memorization with a loss of what the model knew "
    "indistinguishable from zero (primary retention's interval reaches 1)",
    # the paper's tables (low-confidence extraction, method notes §5d): its OPSD reaches about 92-99%
    "opsd_learns": "OPSD at the paper's settings learns the facts (≥ 95% memorization; the paper's tables, "
    "low-confidence extraction: about 92–99% training accuracy)",
}


# the families whose chosen settings the verdicts compare (the paper's SFT and its recommended λ)
VERDICT_FAMILIES = {
    "sft": "SFT",
    "mixsd": "MixSD λ=0.3",
    "rewrite": "Self-rewrite",
    "opsd": "OPSD",
    "memit": "MEMIT",
    "guard": "MixSD λ=0.3 guard_top_p=0.9",
}
# the baselines MixSD is compared with besides SFT, by the retention rule: method -> claim
BASELINES = {"rewrite": "retention_rewrite", "opsd": "retention_opsd", "memit": "retention_memit"}
# our extensions of MixSD, each against the paper's MixSD λ=0.3 by the retention rule: family -> claim (and
# against its aim, no loss at 95%: the claim "{family}_no_loss")
EXTENSIONS = {"guard": "retention_guard"}
# methods whose every seed gives the same model (MEMIT's edit draws nothing at random): one seed is all
# there is to know of them, so the seed count of a comparison is the other side's alone
DETERMINISTIC = {"memit"}


def _chosen(summary: dict[str, Any], method: str) -> tuple[str, dict[str, Any]] | None:
    """The group the rule chose in `method`'s verdict family (or the family's only group, unswept)."""
    family = VERDICT_FAMILIES[method]
    if family in summary["choices"]:
        name = summary["choices"][family]["chosen"]
        return name, summary["groups"][name]
    groups = [(n, g) for n, g in summary["groups"].items() if g["family"] == family]
    return groups[0] if len(groups) == 1 else None


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim: verdict (holds / does not hold / partly / cannot tell), the figure behind it,
    its interval (`boot`, or `value` where the figure is not one bootstrap) and the seeds. Rules:
    memorization — every seed of MixSD's chosen setting reaches 95% (holds), none does (does not hold),
    some do (partly); retention — the paired difference MixSD − SFT in
    the primary metric at the highest level both reach with every seed: interval above 0 holds, below 0
    does not hold, else cannot tell; NLL — pooled Wilson intervals of the > 5 nats share disjoint (lower:
    holds, higher: does not hold), else cannot tell; Fisher — the partial r of the Fisher ratio has an
    interval above 0 while raw ‖Δθ‖²'s includes 0 (holds), the ratio's includes or is below 0 (does not
    hold when raw's is above 0, else cannot tell); retention vs each baseline of BASELINES the grid has
    (self-rewrite, OPSD, MEMIT) — the retention rule with the baseline's chosen setting in SFT's place; a baseline
    that reaches no declared level is compared at its own level (the highest memorization every one of its
    seeds reaches, each method at the first point of its curve reaching it) when that level is at least
    OWN_LEVEL_FLOOR, else named in the verdict. Fewer than 3 seeds per method: "cannot tell yet"."""
    rows = []
    mixsd, sft = _chosen(summary, "mixsd"), _chosen(summary, "sft")
    if mixsd:
        name, group = mixsd
        reached = [e is not None for e in group["first_epoch"]["0.95"]]
        verdict = "holds" if all(reached) else "does not hold" if not any(reached) else "partly"
        rows.append(
            {
                "claim": "memorization",
                "verdict": _enough(verdict, len(group["seeds"])),
                "figure": f"{name}: last-epoch memorization",
                "boot": group["final_memorization_ci"],
                "seeds": f"{sum(reached)}/{len(reached)} seeds reach 95%",
            }
        )
    if mixsd and sft:
        rows.append(_retention_verdict(summary, "retention", mixsd, sft))
        seeds = min(len(mixsd[1]["seeds"]), len(sft[1]["seeds"]))
        shares = [_pooled_high_nll(summary, g["cells"]) for g in (mixsd[1], sft[1])]
        if all(shares):
            (m, m_ci), (s, s_ci) = shares
            verdict = (
                "holds" if m_ci[1] < s_ci[0] else "does not hold" if m_ci[0] > s_ci[1] else "cannot tell"
            )
            rows.append(
                {
                    "claim": "nll",
                    "verdict": _enough(verdict, seeds),
                    "figure": f"share of target tokens > 5 nats: {mixsd[0]} vs {sft[0]}",
                    "value": f"{m:.3f} [{m_ci[0]:.3f}, {m_ci[1]:.3f}] vs {s:.3f} [{s_ci[0]:.3f}, {s_ci[1]:.3f}]",
                    "boot": None,
                    "seeds": f"{len(mixsd[1]['seeds'])} vs {len(sft[1]['seeds'])} (pooled tokens, Wilson)",
                }
            )
    for method, claim in BASELINES.items():  # the same rule as MixSD vs SFT, against each baseline
        baseline = _chosen(summary, method)
        if mixsd and baseline:
            rows.append(_retention_verdict(summary, claim, mixsd, baseline))
    for family, claim in EXTENSIONS.items():  # ours against the paper's MixSD, then against the aim
        extension = _chosen(summary, family)
        if mixsd and extension:
            rows.append(_retention_verdict(summary, claim, extension, mixsd))
            rows.append(_no_loss(extension, f"{family}_no_loss"))
    opsd = [(n, g) for n, g in summary["groups"].items() if g["method"] == "opsd"]
    if opsd and not mixsd:  # a grid of OPSD alone (the sweep): does it learn at all?
        rows.append(_opsd_learns(summary, opsd))
    measures = summary["fisher"]["measures"]
    ratio, raw = measures["fisher_ratio"]["partial"], measures["delta_norm_sq"]["partial"]
    if not ratio["n"]:  # no cell of the grid measured Fisher (`analyses: {fisher: false}`): no claim to judge
        return rows
    if ratio["ci95"] and raw["ci95"]:
        if ratio["ci95"][0] > 0 and raw["ci95"][0] <= 0 <= raw["ci95"][1]:
            verdict = "holds"
        elif ratio["ci95"][0] <= 0 and raw["ci95"][0] > 0:
            verdict = "does not hold"
        else:
            verdict = "cannot tell"
        value = f"ratio {ratio['r']:+.2f} [{ratio['ci95'][0]:+.2f}, {ratio['ci95'][1]:+.2f}], raw {raw['r']:+.2f} [{raw['ci95'][0]:+.2f}, {raw['ci95'][1]:+.2f}]"
    else:
        verdict, value = "cannot tell: " + (ratio["note"] or raw["note"] or "no interval"), "–"
    rows.append(
        {
            "claim": "fisher",
            "verdict": verdict,
            "figure": "partial r with the retention drop: Fisher ratio, raw displacement",
            "value": value,
            "boot": None,
            "seeds": f"{ratio['n']} cells",
        }
    )
    return rows


def _retention_verdict(
    summary: dict[str, Any], claim: str, mixsd: tuple[str, dict[str, Any]], other: tuple[str, dict[str, Any]]
) -> dict[str, Any]:
    """The retention rule (see `verdicts`): MixSD − the other method at the highest level both reach."""
    pair = summary["comparisons"].get(f"{mixsd[0]} vs {other[0]}", {})
    level = max(pair, key=float) if pair else None
    boot = pair.get(level) if level else None
    own = summary.get("own_level_comparisons", {}).get(f"{mixsd[0]} vs {other[0]}")
    if boot is None and own is not None:  # the baseline reaches no declared level but learns half or more
        boot = own
        low, high = own["ci95"]
        verdict = "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"
        figure = f"{mixsd[0]} − {other[0]} at {own['level']:.0%} ({other[0]}'s own level: it reaches no declared level)"
    elif boot is None:
        unreached = [n for n, g in (mixsd, other) if not any(m.get("primary") for m in g["matched"].values())]
        verdict, figure = "cannot tell: no level reached by every seed of both", "–"
        if unreached == [other[0]]:  # the baseline barely learns: nothing to match MixSD's retention with
            best = max(other[1]["final_memorization"])
            verdict = (
                f"cannot tell: {other[0]} reaches no level (best final memorization {best:.2f}; "
                f"compared at its own level only from {OWN_LEVEL_FLOOR:.0%})"
            )
    else:
        low, high = boot["ci95"]
        verdict = "holds" if low > 0 else "does not hold" if high < 0 else "cannot tell"
        figure = f"{mixsd[0]} − {other[0]} at {float(level):.0%}"
    seeds = len(mixsd[1]["seeds"])
    if other[1]["method"] not in DETERMINISTIC:
        seeds = min(seeds, len(other[1]["seeds"]))
    return {
        "claim": claim,
        "verdict": _enough(verdict, seeds),
        "figure": figure,
        "boot": boot,
        "seeds": f"{len(mixsd[1]['seeds'])} vs {len(other[1]['seeds'])}",
    }


def _no_loss(chosen: tuple[str, dict[str, Any]], claim: str) -> dict[str, Any]:
    """No loss at 95%: every seed reaches 95% and the primary retention's interval there reaches 1 (holds) or
    stays below it (does not hold); a seed that never reaches 95% makes it not hold either."""
    name, group = chosen
    matched = group["matched"].get("0.95", {}).get("primary")
    reached = [e is not None for e in group["first_epoch"]["0.95"]]
    if matched is None:
        verdict = "does not hold" if not all(reached) else "cannot tell"
        figure, boot = f"{name}: {sum(reached)}/{len(reached)} seeds reach 95%", None
    else:
        verdict = "holds" if matched["ci95"][1] >= 1.0 else "does not hold"
        figure, boot = f"{name}: primary retention at 95%", matched
    return {
        "claim": claim,
        "verdict": _enough(verdict, len(group["seeds"])),
        "figure": figure,
        "boot": boot,
        "seeds": f"{len(group['seeds'])} seeds",
    }


def _opsd_learns(summary: dict[str, Any], groups: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """OPSD learns: holds when every seed of the rule's chosen setting reaches 95%; does not hold when
    even the best scored epoch of every setting and seed has a Wilson upper bound below 95% (the interval over
    its questions excludes the level: not a near miss that item noise could explain); else cannot tell."""
    chosen = _chosen(summary, "opsd")
    best = [g["best_memorization"] for _, g in groups if g.get("best_memorization")]
    top = max(best, key=lambda b: b["value"]) if best else None
    per_setting = [len(g["seeds"]) for _, g in groups]
    seeds = f"{len(groups)} setting{'s' if len(groups) > 1 else ''} × " + (
        f"{per_setting[0]} seed{'s' if per_setting[0] > 1 else ''}"
        if len(set(per_setting)) == 1
        else f"{', '.join(map(str, per_setting))} seeds"
    )
    if chosen and all(e is not None for e in chosen[1]["first_epoch"]["0.95"]):
        verdict = _enough("holds", len(chosen[1]["seeds"]))
        figure, boot = f"{chosen[0]}: last-epoch memorization", chosen[1]["final_memorization_ci"]
    elif best and all(b["ci95"][1] < 0.95 for b in best):
        verdict = "does not hold at this scale"
        figure = (
            f"best scored epoch of any setting: {top['memorized']}/{top['questions']} "
            f"({top['cell']}, epoch {top['epoch']:g}; Wilson)"
        )
        boot = {"value": top["value"], "ci95": top["ci95"]}
    else:
        verdict, figure, boot = "cannot tell", "–", None
    return {"claim": "opsd_learns", "verdict": verdict, "figure": figure, "boot": boot, "seeds": seeds}


def _enough(verdict: str, seeds: int) -> str:
    return (
        verdict
        if seeds >= MIN_SEEDS
        else f"cannot tell yet ({seeds} seed{'s' if seeds > 1 else ''}; provisional: {verdict})"
    )


def _pooled_high_nll(summary: dict[str, Any], cells: list[str]) -> tuple[float, list[float]] | None:
    rows = [c for c in summary["cells"] if c["cell"] in cells and c.get("target_nll_above_5_n")]
    count, n = sum(c["target_nll_above_5_count"] for c in rows), sum(c["target_nll_above_5_n"] for c in rows)
    return (count / n, list(wilson_interval(int(count), int(n)))) if n else None
