"""`mixsd train --method opsd`'s options (`OPSDOptions`), beside the OPSD trainer (`mixsd.training.opsd`) and mixed
into `mixsd.training.train_config.TrainConfig`; apart from the trainer so that the config imports no trainer."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from mixsd.core.files import InputError
from mixsd.core.options import check_range

# the per-epoch diagnostics every OPSD run writes into its output folder (opsd.OPSDDiagnostics)
DIAGNOSTICS_FILE = "opsd-diagnostics.jsonl"

Divergence = typing.Literal["forward", "reverse", "jsd"]


@dataclass
class OPSDOptions:
    """`mixsd train --method opsd`'s own options, mixed into `mixsd.training.train_config.TrainConfig` (their field
    help is the CLI help) and read by `OPSDTrainer`."""

    opsd_rollouts: int = field(
        default=8, metadata={"help": "OPSD: answers the student samples per prompt (T=1; the paper: 8)."}
    )
    opsd_divergence: Divergence = field(
        default="forward",
        metadata={
            "help": "OPSD: token-level KL(teacher||student) (forward), KL(student||teacher) (reverse), or JSD."
        },
    )
    opsd_top_k: int = field(
        default=64,
        metadata={
            "help": "OPSD: divergence over the teacher's top-k tokens (both renormalized); 0 = full vocabulary."
        },
    )
    opsd_max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "OPSD: length cap of a sampled answer (SmolLM2's expert answers to KGFact-small: median 16 "
            "tokens, nine in ten within 27)."
        },
    )

    def check_opsd_options(self) -> None:
        """Each option in range, the field named (TrainConfig calls this with its own checks)."""
        divergences = typing.get_args(Divergence)
        if self.opsd_divergence not in divergences:
            raise InputError(
                f"must be one of {', '.join(divergences)}; got {self.opsd_divergence!r}",
                field="opsd_divergence",
            )
        check_range("opsd_rollouts", self.opsd_rollouts, 1, integer=True)
        check_range("opsd_top_k", self.opsd_top_k, 0, integer=True)
        check_range("opsd_max_new_tokens", self.opsd_max_new_tokens, 1, integer=True)
