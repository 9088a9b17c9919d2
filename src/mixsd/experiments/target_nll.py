"""How surprising each group's training targets are to the base model, from the cells' nll.json
(`mixsd analyze nll`), written as OUT/target-nll.json for the report:

- high_nll: per group, the target tokens with NLL > 5 nats, overall ("all") and per branch letter of the
  mixed targets (E expert, N naive, G ground truth), as [count, tokens] pooled over every seed;
- histograms: per group, the first seed's histogram of per-token NLL and its mean.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixsd.experiments.results import rows_by_group

NLL_FILE = "nll.json"


def high_nll_counts(cells_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group with counted tokens: `seeds` (its cells) and `counts`, part -> [count, n] pooled over
    every seed's nll.json ("all" and each branch letter). Groups without counts are left out."""
    out = []
    for group, members in rows_by_group(rows).items():
        pooled: dict[str, list[int]] = {}
        for member in members:
            path = cells_dir / member["cell"] / NLL_FILE
            if not path.is_file():
                continue
            nll = json.loads(path.read_text(encoding="utf-8"))
            parts = [("all", nll.get("overall") or {})]
            parts += [(k, d) for k, d in (nll.get("by_branch") or {}).items()]
            for key, part in parts:
                high = part.get("high_nll") or {}
                if isinstance(high.get("count"), int) and isinstance(high.get("n"), int):
                    counts = pooled.setdefault(key, [0, 0])
                    counts[0] += high["count"]
                    counts[1] += high["n"]
        if "all" in pooled:
            out.append({"group": group, "seeds": len(members), "counts": pooled})
    return out


def nll_histograms(cells_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group, its first seed's histogram of target-token NLL (`edges`, `counts`) and mean, where the
    cell's nll.json has one; in the order of the rows."""
    out = []
    for row in rows:
        nll_file = cells_dir / row["cell"] / NLL_FILE
        first_seed = min(r["seed"] for r in rows if r["group"] == row["group"])
        if row["seed"] != first_seed or not nll_file.is_file():
            continue
        overall = json.loads(nll_file.read_text()).get("overall", {})
        histogram = overall.get("histogram") or {}
        if histogram.get("counts"):
            out.append(
                {
                    "cell": row["cell"],
                    "group": row["group"],
                    "method": row["method"],
                    "lam": row["lam"],
                    "mean": overall["mean"],
                    "histogram": histogram,
                }
            )
    return out


def target_nll(cells_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """OUT/target-nll.json: the pooled > 5 nats counts and the histograms (see the module doc)."""
    return {"high_nll": high_nll_counts(cells_dir, rows), "histograms": nll_histograms(cells_dir, rows)}
