"""`mixsd probes export-lm-eval`: mixsd's probes as lm-evaluation-harness tasks (a task YAML and a local data
file per probe, and a manifest), for `lm_eval --include_path OUT`.

    mixsd probes export-lm-eval OUT [--probes DIR]

Each probe kind the harness can score carries its task format in the registry (`ProbeKind.lm_eval`, see
`mixsd.evaluation.lmeval_format`); a kind without one is skipped with the reason in the manifest. lm-eval itself is
not needed to export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixsd.core.files import InputError, atomic_write_jsonl, atomic_write_text, sha256_file
from mixsd.core.options import check_range
from mixsd.corpora._manifest import write_manifest
from mixsd.corpora.probes import default_out
from mixsd.evaluation.lmeval_format import LmEvalFormat
from mixsd.evaluation.probe_kinds import load_probe

GENERATOR = "mixsd.evaluation.lmeval"  # the manifest's generator, as exports have always named it
VERSION = 1
TAG = "mixsd_probes"  # every exported task carries it: `lm_eval --tasks mixsd_probes` runs them all
# The score of each exported probe that counts for retention; mixsd.experiments.results.RETENTION_METRIC reads the
# fetched probes the same way (a test holds the two together).
EXPORT_METRIC = {"social_iqa": "acc_norm"}


# --------------------------------------------------------------------------------------------------
# `mixsd probes export-lm-eval`
# --------------------------------------------------------------------------------------------------
@dataclass
class LmEvalExportConfig:
    out: str = field(
        metadata={
            "help": "Folder to create (must not exist): one task YAML and one data file per probe, plus "
            "manifest.json. The YAMLs name their data files by absolute path: export again after moving it."
        }
    )
    probes: str | None = field(
        default=None,
        metadata={
            "help": "Probe folder (every *.jsonl in it) or one probe file; default $MIXSD_CACHE/probes "
            "(written by `mixsd probes fetch`)."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "Export only N items of each probe, taken evenly across the file (as eval --limit)."
        },
    )
    prefix: str = field(
        default="mixsd_",
        metadata={"help": "Task names are PREFIX + the probe file's name (mixsd_general_knowledge, ...)."},
    )

    def __post_init__(self) -> None:  # refuse bad options before anything is read (issue 10)
        check_range("limit", self.limit, 1, integer=True, optional=True)
        if not self.prefix.replace("_", "").replace("-", "").isalnum() and self.prefix:
            raise InputError("use letters, digits, '_' and '-' only", field="prefix")


def _task_yaml(task: str, data_file: Path, task_format: LmEvalFormat, metric: str) -> str:
    config: dict[str, Any] = {
        "task": task,
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        **dict(task_format.task_fields),
        "num_fewshot": 0,
        "metric_list": task_format.metric_list(),
        "metadata": {"version": float(VERSION), "mixsd_metric": metric},
    }
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def export_lm_eval(config: LmEvalExportConfig) -> dict[str, Any]:
    """Write every probe whose kind has an lm-eval task format as a task (YAML + JSONL); return the manifest.

    Other probes (generative ones: their checks are mixsd code, which a task file would have to execute)
    are skipped with their reason.
    """
    out = Path(config.out)
    if out.exists():
        raise InputError("already exists; choose a new folder (the export never overwrites)", out)
    source = Path(config.probes) if config.probes else default_out()
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(source.glob("*.jsonl"))
        if not files:
            raise InputError("no *.jsonl probe files", source)
    else:
        raise InputError("not found (run `mixsd probes fetch`, or pass --probes)", source)

    final = out.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tasks, skipped, written = {}, [], []
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        for path in files:
            kind, items = load_probe(path, config.limit)
            task = config.prefix + path.stem
            task_format = kind.lm_eval
            if task_format is None:
                skipped.append({"file": path.name, "reason": f"{kind.name} probe (checked by mixsd code)"})
                continue
            docs = task_format.documents(path, items)
            named = EXPORT_METRIC.get(path.stem)
            metric = named if named in task_format.metrics else task_format.metrics[0]
            atomic_write_jsonl(staging / f"{task}.jsonl", docs)
            atomic_write_text(
                staging / f"{task}.yaml", _task_yaml(task, final / f"{task}.jsonl", task_format, metric)
            )
            written += [f"{task}.jsonl", f"{task}.yaml"]
            tasks[task] = {
                "source": path.name,
                "source_sha256": sha256_file(path),
                "kind": kind.name,
                "items": len(docs),
                "metric": metric,
            }
        if not tasks:
            raise InputError("no multiple-choice or text probes to export", source)
        manifest = write_manifest(
            staging,
            GENERATOR,
            VERSION,
            written,
            prefix=config.prefix,
            limit=config.limit,
            tasks=tasks,
            skipped=skipped,
            tag=TAG,
        )
        os.rename(staging, final)  # the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def export_command(config: LmEvalExportConfig) -> dict[str, Any]:
    manifest = export_lm_eval(config)
    for task, entry in manifest["tasks"].items():
        print(f"{task:<32} {entry['kind']:<16} {entry['items']:>6} items  (from {entry['source']})")
    for entry in manifest["skipped"]:
        print(f"skipped {entry['file']}: {entry['reason']}")
    names = ",".join(manifest["tasks"])
    print(
        f"wrote {config.out}; run: lm_eval --model hf --model_args pretrained=MODEL "
        f"--include_path {config.out} --tasks {names}"
    )
    return manifest
