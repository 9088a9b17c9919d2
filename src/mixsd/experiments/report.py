"""The experiment report: figures (`mixsd.experiments.report_figures`) and one Markdown and one self-contained HTML
page, drawn from the results rows and the JSON files the results side writes beside them
(`mixsd.experiments.report_data`: tuning.json, curves.jsonl, correlations.json, comparisons.json, target-nll.json,
training-loss.json). The report computes no statistic and opens no cell's file: what it shows is in those
files.

With learning curves the report also holds retention at matched memorization (90%, 95%, interpolated
between epochs) and, where a method sweeps settings, the declared selection rule and its choice
(`mixsd.experiments.tuning`); every curve point is in OUT/curves.jsonl, the tables in OUT/tuning.json.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from mixsd.core.files import InputError, atomic_write_text
from mixsd.experiments.report_figures import (
    correlation_figure,
    curves_figure,
    fisher_figure,
    frontier_figure,
    nll_figure,
    pareto_figure,
    retention_figure,
    trajectory_figure,
)
from mixsd.experiments.report_sections import (
    SINGLE_SEED_MARK,
    analyses_markdown,
    comparison_rows,
    comparisons_html,
    comparisons_markdown,
    lm_eval_markdown,
    section_html,
    table_cell,
    tuning_markdown,
)
from mixsd.experiments.results import (
    COMPARISONS_FILE,
    CORRELATIONS_FILE,
    CURVES_FILE,
    MAIN_COLUMNS,
    TARGET_NLL_FILE,
    TRAINING_LOSS_FILE,
    TUNING_FILE,
    aggregate,
    rows_by_group,
)


def _read_json(out: Path, name: str) -> Any:
    path = out / name
    if not path.is_file():
        raise InputError(
            f"no {name}: the report draws what the results step writes (mixsd.experiments.report_data.write_report_data)",
            path,
        )
    return json.loads(path.read_text(encoding="utf-8"))


def seed_curves(out: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """Per group, its seeds' curves as curves.jsonl lists them (one cell after another, points in order)."""
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    path = out / CURVES_FILE
    if not path.is_file():
        raise InputError(f"no {CURVES_FILE}: the report draws what the results step writes", path)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            point = json.loads(line)
            by_cell.setdefault((point["group"], point["cell"]), []).append(point)
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for (group, _), points in by_cell.items():
        curves.setdefault(group, []).append(points)
    return curves


def write_report(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, str]:
    """The report of a grid folder: `rows` its results rows, `meta` the run's description; the results
    step has written the files of `mixsd.experiments.report_data` in `out`."""
    tuning = _read_json(out, TUNING_FILE)
    correlations = _read_json(out, CORRELATIONS_FILE)
    target_nll = _read_json(out, TARGET_NLL_FILE)
    figures_dir = out / "report"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = [
        (
            "Learning trajectories",
            trajectory_figure(tuning, seed_curves(out), figures_dir / "trajectories.png"),
        ),
        ("Settings and frontiers", frontier_figure(tuning, figures_dir / "frontier.png")),
        ("Memorization vs retention", pareto_figure(rows, figures_dir / "pareto.png")),
        ("Retention per probe", retention_figure(rows, figures_dir / "retention.png")),
        ("Target NLL under the base model", nll_figure(target_nll["histograms"], figures_dir / "nll.png")),
        ("Fisher-weighted displacement", fisher_figure(rows, figures_dir / "fisher.png")),
        ("Training curves", curves_figure(_read_json(out, TRAINING_LOSS_FILE), figures_dir / "curves.png")),
        ("Displacement vs retention drop", correlation_figure(correlations, figures_dir / "correlation.png")),
    ]
    figures = [(title, p) for title, p in figures if p is not None]
    columns = [c for c in MAIN_COLUMNS if any(isinstance(r.get(c), int | float) for r in rows)]
    table = aggregate(rows, columns)
    groups = rows_by_group(rows)

    def cell_text(entry: dict[str, Any], column: str) -> str:
        return table_cell(entry, groups[entry["group"]], column)

    def seeds_text(entry: dict[str, Any]) -> str:
        return f"{entry['seeds']}{SINGLE_SEED_MARK if entry['seeds'] == 1 else ''}"

    comparisons = comparison_rows(_read_json(out, COMPARISONS_FILE))
    modes = sorted({v for r in rows for k, v in r.items() if k.endswith("_match") and isinstance(v, str)})

    md = [
        f"# mixsd report: {meta['name']}",
        "",
        f"Model `{meta['model']}`; mixsd {meta['mixsd']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, Python {meta['python']}; finished {meta['finished']}.",
        "",
        f"Command: `{meta['command']}`  (config: `{meta['config_file']}`, copied to `experiment.yaml`)",
        "",
        "## Results (mean [95% interval] ± sd over seeds)",
        "",
        "| method | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    md += [
        f"| {e['group']} | {seeds_text(e)} | " + " | ".join(cell_text(e, c) for c in columns) + " |"
        for e in table
    ]
    md += [
        "",
        f"Columns: `*_acc` accuracy under the corpus's own matcher ({', '.join(modes) or 'entity'}; "
        "`answer_match` in its manifest.json), 95% Wilson interval over the items of all seeds; "
        "`retention_mean` mean over probes of the retention (multiple choice chance-normalized: "
        "(acc − chance) / (acc_base − chance); raw ratios in `*_retention_raw` of `results.csv`), "
        "intervals of ratios from a paired bootstrap over items; `kl_per_token` KL(base‖model) on the base "
        "model's own answers, `target_nll_mean` mean NLL of the training targets under the base model, "
        "`target_nll_above_5` share of target tokens above 5 nats (Wilson interval over the tokens of all "
        "seeds), `fisher_displacement_norm` Σ F·Δθ² / Σ F, `fisher_ratio` Σ F·Δθ² / ‖Δθ‖², "
        "`delta_norm_sq` raw ‖Δθ‖². ± sd: spread over seeds. "
        f"{SINGLE_SEED_MARK} single seed: the interval covers the sampling of items only, not seed-to-seed "
        "variation. Every cell's raw numbers: `results.csv`.",
        "",
    ]
    lm_eval_md = lm_eval_markdown(rows)
    md += lm_eval_md
    md += comparisons_markdown(comparisons)
    # the paper's analyses (NLL > 5 share, displacement vs retention drop)
    analyses = analyses_markdown(target_nll["high_nll"], correlations)
    md += analyses
    tuning_md = tuning_markdown(tuning)
    md += tuning_md
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}](report/{path.name})", ""]
    md += ["## Configuration", "", "```yaml", _yaml(meta["config"]), "```", ""]
    markdown_path = out / "report.md"
    atomic_write_text(markdown_path, "\n".join(md))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["method", "seeds", *columns])
    body = "".join(
        "<tr><td>"
        + html.escape(e["group"])
        + f"</td><td>{html.escape(seeds_text(e))}</td>"
        + "".join(f"<td>{html.escape(cell_text(e, c))}</td>" for c in columns)
        + "</tr>"
        for e in table
    )
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mixsd report: {html.escape(meta["name"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}code,pre{{background:#f4f4f4}}</style></head><body>
<h1>mixsd report: {html.escape(meta["name"])}</h1>
<p>Model <code>{html.escape(meta["model"])}</code>; mixsd {meta["mixsd"]}, torch {meta["torch"]},
transformers {meta["transformers"]}, Python {meta["python"]}; finished {html.escape(meta["finished"])}.</p>
<p>Command: <code>{html.escape(meta["command"])}</code></p>
<h2>Results (mean [95% interval] ± sd over seeds)</h2><table><tr>{head}</tr>{body}</table>
<p>{html.escape(SINGLE_SEED_MARK)} single seed: the interval covers the sampling of items only.
Accuracy under the corpus's own matcher ({html.escape(", ".join(modes) or "entity")}).
Raw rows: <code>results.csv</code>, <code>results.jsonl</code>.</p>{section_html(lm_eval_md)}{comparisons_html(comparisons)}{section_html(analyses)}{section_html(tuning_md)}{images}
<h2>Configuration</h2><pre>{html.escape(_yaml(meta["config"]))}</pre></body></html>"""
    html_path = out / "report.html"
    atomic_write_text(html_path, page)
    return {"markdown": str(markdown_path), "html": str(html_path)}


def _yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False).strip()
