"""What every cell of a grid shares, made once before the cells run: the corpus (generated, or a folder, and
its cut copy with `train_limit`), the retention probes (with the known facts the base model answers), the
offline capability probes, and the learning curve's options. `mixsd.experiments.experiment.Runner` adds each cell's
stages on top.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixsd.core.files import (
    InputError,
    JournalWriter,
    atomic_copy,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
    sha256_file,
)
from mixsd.core.models import cache_dir
from mixsd.core.stage_settings import stage_settings
from mixsd.core.stages import Stage, file_hash
from mixsd.corpora.capability import CapabilityConfig, build_capability
from mixsd.corpora.documents import PASSAGES_FILE
from mixsd.corpora.kgfact import KGFactConfig, build_kgfact
from mixsd.corpora.kgfunc import KGFuncConfig, build_kgfunc
from mixsd.corpora.probes import ProbesFetchConfig, fetch_probes
from mixsd.experiments.grid import CAPABILITY_PROBES, CURVE_OPTIONS, Cell, Experiment, build_config, typed

# the corpus generators a grid names, each with its config
GENERATORS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "kgfact": (KGFactConfig, build_kgfact),
    "kgfunc": (KGFuncConfig, build_kgfunc),
}


class GridData:
    """The grid's folders and the stages every cell shares (see the module docstring)."""

    def __init__(self, experiment: Experiment):
        self.x = experiment
        self.out = experiment.out
        corpus = experiment.corpus
        generated = self.out / "corpus"
        self.source_dir = Path(corpus["path"]) if corpus.get("generator") == "folder" else generated
        # train_limit: the cells train and evaluate on a cut copy in OUT/data
        self.corpus_dir = self.out / "data" if corpus.get("train_limit") else self.source_dir
        self.probes_dir: Path | None = self._probes(fetch=False)
        if self.probes_dir is not None and self.x.retention_extras.known_facts:
            self.probes_dir = self.retention_probes_dir  # made by prepare_data
        self.stage_log = self.out / "stage-log.jsonl"
        self.capability_stage: Stage | None = self._capability_stage()

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def _log(self, cell: Cell | None) -> Callable[[Stage, str, list[str]], None]:
        """Every stage decision goes to OUT/stage-log.jsonl: what ran, what was reused, and why."""

        def log(stage: Stage, action: str, changes: list[str]) -> None:
            entry = {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "cell": cell.name if cell else None,
                "stage": stage.name,
                "action": action,
                "changes": changes,
            }
            with JournalWriter(self.stage_log) as writer:
                writer.write([entry])

        return log

    # corpus and probes, shared by every cell
    def corpus_config(self):
        """The generator's config (KGFactConfig / KGFuncConfig), or None for a corpus folder."""
        corpus = self.x.corpus
        generator = corpus.get("generator", "kgfact")
        options = {k: v for k, v in corpus.items() if k not in ("generator", "path", "train_limit")}
        if "train_limit" in corpus:
            limit = typed(corpus["train_limit"], int | None, self.x.path, "corpus.train_limit")
            if limit is not None and limit < 1:
                raise InputError(f"must be >= 1; got {limit}", self.x.path, field="corpus.train_limit")
        if generator == "folder":
            for key in options:
                raise InputError(
                    f"'{key}' is not an option of a corpus folder (path, train_limit)",
                    self.x.path,
                    field=f"corpus.{key}",
                )
            return None
        config_class, _ = GENERATORS[generator]
        return build_config(
            config_class, {"out": str(self.out / "corpus")}, [("corpus", options)], self.x.path
        )

    def prepare_data(self) -> None:
        config = self.corpus_config()
        if config is not None:
            _, build = GENERATORS[self.x.corpus.get("generator", "kgfact")]
            stage = Stage(
                "corpus",
                self.source_dir / "manifest.json",
                stage_settings(config),
                record=self.out / "stages" / "corpus.json",
            )
            stage.run(lambda discard: build(config), log=self._log(None))
        elif not (self.source_dir / "train.jsonl").is_file():
            raise InputError("corpus folder has no train.jsonl", self.source_dir)
        if self.x.corpus.get("train_limit"):
            limit = int(self.x.corpus["train_limit"])
            source = self.source_dir
            stage = Stage(
                "data",
                self.corpus_dir / "manifest.json",
                {"train_limit": limit, "source": str(source)},
                inputs=[*sorted(source.glob("*.jsonl")), source / "manifest.json"],
                record=self.out / "stages" / "data.json",
            )
            stage.run(lambda discard: self._subset(source, limit), log=self._log(None))
        self.probes_dir = self._probes(fetch=True)
        if self.probes_dir is not None and self.x.retention_extras.known_facts:
            self.probes_dir = self._with_known_facts(self.probes_dir)
        if self.capability_stage is not None:
            config = self._capability_config()
            self.capability_stage.run(lambda discard: build_capability(config), log=self._log(None))

    def _with_known_facts(self, probes: Path) -> Path:
        """OUT/retention-probes: the probe files plus known_facts.jsonl, filtered by the base model."""
        dtype = "bfloat16" if self.x.sections["retention"].get("bf16") else "float32"
        config = CapabilityConfig(out=str(self.out / "known-facts"), model=self.x.model, dtype=dtype)
        built = Path(config.out) / "known_facts.jsonl"
        Stage(
            "known-facts",
            [built, Path(config.out) / "manifest.json"],
            stage_settings(config, also=("out",)),
            inputs=[probes / "manifest.json"],
            record=self.out / "stages" / "known-facts.json",
        ).run(lambda discard: build_capability(config), log=self._log(None))
        if not built.is_file():  # the base model answered none: nothing to add
            return probes
        combined = self.retention_probes_dir
        combined.mkdir(parents=True, exist_ok=True)
        for source in [*sorted(probes.glob("*.jsonl")), probes / "manifest.json", built]:
            target = combined / source.name
            if file_hash(target) != file_hash(source):  # unchanged copies keep the retention stages current
                atomic_copy(source, target)
        return combined

    @property
    def retention_probes_dir(self) -> Path:
        return self.out / "retention-probes"

    # learning curves, shared by every trained cell
    def _capability_config(self) -> CapabilityConfig:
        corpus = self.x.corpus
        world = {}
        if corpus.get("generator", "kgfact") == "kgfact":  # in-context facts from the trained world
            world = {"kgfact_size": corpus.get("size", "small"), "kgfact_seed": corpus.get("seed", 0)}
        return CapabilityConfig(out=str(self.out / "capability"), **world)

    def _capability_stage(self) -> Stage | None:
        """OUT/capability: the offline capability probes (no model: in-context facts, instructions)."""
        if self.x.curves is None or not self.x.curves.get("capability"):
            return None
        config = self._capability_config()
        folder = Path(config.out)
        return Stage(
            "capability",
            [folder / "manifest.json", *(folder / name for name in CAPABILITY_PROBES)],
            # built without a model: how one would be loaded is moot
            stage_settings(config, also=("dtype", "trust_remote_code")),
            record=self.out / "stages" / "capability.json",
        )

    def curve_sections(
        self, train_file: Path
    ) -> tuple[dict[str, Any], tuple[str, dict[str, Any]], list[Path]]:
        """What a trained cell's curve adds to its TrainConfig: the runner's fields, the `curves` section
        as TrainConfig options, and the files the curve reads (their content is part of the fingerprint)."""
        curves = self.x.curves or {}
        options = {CURVE_OPTIONS[key]: value for key, value in curves.items() if key in CURVE_OPTIONS}
        probes = [p.strip() for p in str(options.get("eval_probes") or "").split(",") if p.strip()]
        if curves.get("capability"):
            probes = [str(self.out / "capability" / name) for name in CAPABILITY_PROBES] + probes
        if curves.get("known_facts"):
            probes.append(str(self.retention_probes_dir / "known_facts.jsonl"))
        if probes:
            options["eval_probes"] = ",".join(probes)
        files = [Path(p) for p in probes]
        if isinstance(options.get("eval_kl_prompts"), str):
            files.append(Path(options["eval_kl_prompts"]))
        runner_set = {"eval_every_epoch": True, "eval_corpus": str(train_file)}
        return runner_set, ("curves", options), files

    def _subset(self, source: Path, limit: int) -> Path:
        """A copy of the corpus that trains on its first `limit` facts (kept small for quick runs).

        The generated corpus stays untouched; OUT/data holds train.jsonl cut to `limit` records, the
        paraphrase and compositional records that ask about those facts only, and every other split as
        is, with a manifest saying where it came from.
        """
        target = self.corpus_dir
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*.jsonl"):  # a split left empty this time must not linger from the last
            old.unlink()
        train = [row for _, row in read_jsonl(source / "train.jsonl")][:limit]
        kept = {row.get("fact", row.get("id")) for row in train}
        counts = {}
        for path in sorted(source.glob("*.jsonl")):
            rows = [row for _, row in read_jsonl(path)]
            if path.name == "train.jsonl":
                rows = train
            elif path.name == "paraphrase.jsonl":
                rows = [r for r in rows if r.get("fact") in kept]
            elif path.name == "compositional.jsonl" and rows and "facts" in rows[0]:
                rows = [r for r in rows if set(r["facts"]) <= kept]
            if rows:  # a split with nothing left is left out (evaluation notes it as skipped)
                atomic_write_jsonl(target / path.name, rows)
                counts[path.name] = len(rows)
        manifest = {
            "derived_from": str(source),
            "train_limit": limit,
            "records": counts,
            "source_manifest_sha256": sha256_file(source / "manifest.json")
            if (source / "manifest.json").is_file()
            else None,
            "sha256": {name: sha256_file(target / name) for name in counts},
        }
        if (source / "manifest.json").is_file():  # the corpus's scorer (answer_match) travels with it
            source_manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
            if isinstance(source_manifest, dict) and "answer_match" in source_manifest:
                manifest["answer_match"] = source_manifest["answer_match"]
        atomic_write_json(target / "manifest.json", manifest)
        return target

    def _probes(self, fetch: bool) -> Path | None:
        """The retention probe folder: fetched once into the cache (when `fetch`); None (KL-only
        retention) when there is none."""
        extras = self.x.retention_extras
        if not extras.probes:
            return None
        folder = Path(extras.data or cache_dir() / "probes")
        if (folder / "manifest.json").is_file():
            return folder
        if not fetch:
            return None
        try:
            fetch_probes(ProbesFetchConfig(out=str(folder)))
            return folder
        except Exception as err:  # noqa: BLE001 - the experiment goes on with the probes that need no data
            print(
                f"warning: could not fetch retention probes ({err}); retention uses KL only", file=sys.stderr
            )
            return None

    def _fisher_probe(self) -> Path:
        """Held-out text the Fisher is measured on: ability we want to keep, not the injected facts."""
        if self.probes_dir and (self.probes_dir / "squad_paragraphs.jsonl").is_file():
            return self.probes_dir / "squad_paragraphs.jsonl"
        for name in ("unseen.jsonl", "paraphrase.jsonl", "retrieval.jsonl"):
            if (self.corpus_dir / name).is_file():
                return self.corpus_dir / name
        return self.corpus_dir / "train.jsonl"

    def cpt_text_file(self, train_file: Path) -> Path:
        """What a cpt cell trains on: a documents corpus's passages, else the training records' contexts."""
        passages = self.source_dir / PASSAGES_FILE
        return passages if passages.is_file() else train_file
