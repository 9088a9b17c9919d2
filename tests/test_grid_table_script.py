"""scripts/grid_table.py: the tables of docs/results.md come from a grid folder's files, counts and all."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "grid_table.py"


def write_cell(
    grid: Path, name: str, curve: list[dict], train: tuple[int, int], lost: tuple[int, int]
) -> None:
    cell = grid / "cells" / name
    (cell / "train").mkdir(parents=True)
    (cell / "cell.json").write_text("{}")
    (cell / "train" / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curve))
    accuracy = {"correct": train[0], "n": train[1], "value": train[0] / train[1]}
    (cell / "eval.json").write_text(json.dumps({"splits": {"train": {"accuracy": accuracy}}}))
    known = {"lost": {"correct": lost[0], "n": lost[1], "ci95": [0.1, 0.4]}}
    (cell / "retention.json").write_text(json.dumps({"probes": {"known_facts": known}}))


def point(epoch: float, memorized: int, in_context: float, collapse: float, kl: float) -> dict:
    return {
        "epoch": epoch, "memorized": memorized, "questions": 50, "kl": kl,
        "in_context_acc": in_context, "in_context_collapse": collapse, "in_context_n": 20,
        "instructions_acc": 0.25, "instructions_collapse": collapse, "instructions_n": 20,
    }  # fmt: skip


@pytest.fixture()
def grid(tmp_path: Path) -> Path:
    write_cell(
        tmp_path, "sft-s0", [point(1, 3, 0.05, 1.0, 0.6), point(2, 40, 0.0, 1.0, 0.7)], (91, 100), (12, 40)
    )
    write_cell(tmp_path, "mixsd-lam0.3-s0", [point(1, 2, 0.6, 0.1, 0.2)], (70, 100), (5, 40))
    (tmp_path / "cells" / "unfinished").mkdir()  # no cell.json: not a row
    (tmp_path / "curve-base.json").write_text(json.dumps(point(0, 0, 0.45, 0.0, 0.0)))
    return tmp_path


def run(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=True, capture_output=True, text=True
    ).stdout


def test_one_row_per_finished_cell(grid: Path):
    lines = run(str(grid)).splitlines()
    assert len(lines) == 4  # header, rule, two cells; the unfinished one is left out
    assert (
        lines[2] == "| mixsd-lam0.3-s0 | 70/100 | - | 12/20 | 2/20 / 2/20 | 5/20 | 0.20 | 5/40 [0.10, 0.40] |"
    )
    assert lines[3] == "| sft-s0 | 91/100 | - | 0/20 | 20/20 / 20/20 | 5/20 | 0.70 | 12/40 [0.10, 0.40] |"
    assert run(str(grid), "--cells", "sft-*").count("\n") == 3


def test_curve_starts_at_the_base_model(grid: Path):
    rows = run(str(grid), "--curve", "sft-s0").splitlines()[2:]
    assert rows == [
        "| 0 | 0/50 | 9/20 | 0/20 / 0/20 | 5/20 | 0.00 |",
        "| 1 | 3/50 | 1/20 | 20/20 / 20/20 | 5/20 | 0.60 |",
        "| 2 | 40/50 | 0/20 | 20/20 / 20/20 | 5/20 | 0.70 |",
    ]


def test_missing_files_show_a_dash(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("grid_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "cell.json").write_text("{}")
    assert module.cell_row(tmp_path)[1:] == ["-", "-", "-", "- / -", "-", "-", "-"]


def test_bad_input_names_the_file_and_line(grid: Path):
    def fails(*args: str) -> str:
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        return result.stderr

    assert "not an experiment folder" in fails(str(grid / "nowhere"))
    assert "no cell named 'missing'" in fails(str(grid), "--curve", "missing")
    curve = grid / "cells" / "sft-s0" / "train" / "curve.jsonl"
    curve.write_text(curve.read_text() + "{oops\n")
    assert f"{curve}, line 3: invalid JSON" in fails(str(grid))
    (grid / "cells" / "mixsd-lam0.3-s0" / "eval.json").write_text('{"splits":\n  oops}')
    assert "eval.json, line 2: invalid JSON" in fails(str(grid), "--cells", "mixsd-*")
