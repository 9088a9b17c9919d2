"""mixsd: inject new knowledge into causal language models with Mixed Contextual Self-Distillation.

The library functions behind the commands (README's table) are importable from here; each lives in its
stage's folder (docs/architecture.md): core, method, training, evaluation, editing, experiments, corpora.
They load on first use, so `import mixsd` (and `mixsd --help`) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mixsd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

# public name -> the module that defines it
PUBLIC: dict[str, str] = {
    "mix": "mixsd.method.targets",
    "MixConfig": "mixsd.method.mix_config",
    "sft_target_rows": "mixsd.method.sft_targets",
    "rewrite": "mixsd.method.rewrite",
    "RewriteConfig": "mixsd.method.rewrite",
    "export_trl": "mixsd.method.export",
    "ExportTRLConfig": "mixsd.method.export",
    "train": "mixsd.training.train",
    "TrainConfig": "mixsd.training.train_config",
    "evaluate": "mixsd.evaluation.evaluate",
    "EvalConfig": "mixsd.evaluation.eval_config",
    "target_nll": "mixsd.evaluation.analyze",
    "NLLConfig": "mixsd.evaluation.analyze",
    "fisher_displacement": "mixsd.evaluation.analyze",
    "FisherConfig": "mixsd.evaluation.analyze",
    "export_lm_eval": "mixsd.evaluation.lmeval_export",
    "LmEvalExportConfig": "mixsd.evaluation.lmeval_export",
    "edit": "mixsd.editing.edit",
    "EditConfig": "mixsd.editing.edit",
    "run_experiment": "mixsd.experiments.experiment",
}


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'mixsd' has no attribute '{name}'")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])


__all__ = ["__version__", *PUBLIC]
