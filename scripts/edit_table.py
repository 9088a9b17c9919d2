"""Print the table of an edit comparison (scripts/edit_comparison.sh) from its eval and retention files.

python scripts/edit_table.py runs/cf/smollm2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("base", "memit", "sft", "mixsd")


def cell(rate: dict) -> str:
    low, high = rate["ci95"]
    return f"{rate['correct']}/{rate['n']} [{low:.2f}, {high:.2f}]"


def main(folder: Path) -> None:
    splits = ("edits", "paraphrase", "neighborhood", "twohop")
    probes = ("known_facts", "in_context", "instructions")
    header = ["method", *splits, *(f"{p} (lost)" for p in probes), "KL/token"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in METHODS:
        path = folder / method / "eval.json"
        if not path.is_file():
            continue
        evaluation = json.loads(path.read_text())["splits"]
        row = [method, *(cell(evaluation[s]["accuracy"]) if s in evaluation else "-" for s in splits)]
        retention_file = folder / method / "retention.json"
        retention = json.loads(retention_file.read_text())["probes"] if retention_file.is_file() else {}
        for probe in probes:
            summary = retention.get(probe)
            if summary is None:
                row.append("-")
                continue
            lost = summary.get("lost")
            text = f"{summary['acc']['correct']}/{summary['acc']['n']}"
            if lost and method != "base":
                text += f" ({lost['correct']}/{lost['n']} lost)"
            row.append(text)
        kl = retention.get("kl", {}).get("kl_per_token")
        row.append("-" if kl is None else f"{kl:.3f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
