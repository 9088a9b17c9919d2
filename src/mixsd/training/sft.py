"""Supervised fine-tuning on stored token ids: the examples, the collator, the loss and the trainer.

MixSD and SFT differ only in their target files, so one trainer serves both: plain NLL of the stored
`target_ids` given the stored `prompt_ids`, never re-tokenized, with the loss on target tokens only.
The loss is the sum of target-token NLLs divided by the number of target tokens in the *global* batch
(every micro-batch of the accumulation window on every process): Trainer counts those tokens up front
(`num_items_in_batch`, gathered across processes), so batch 8 x accumulation 1 on one process, 2 x 4, and
4 x 1 on each of two processes all take the same steps.

`TokenCountingTrainer` is also the base of the OPSD trainer (`mixsd.training.opsd`); `mixsd train` (`mixsd.training.train`)
builds either from its config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from mixsd.core.files import InputError
from mixsd.training.checkpoints import mark_checkpoint_complete

IGNORE = -100  # label of positions that carry no loss (prompt and padding)


# --------------------------------------------------------------------------------------------------
# Data: stored token ids in, padded tensors out
# --------------------------------------------------------------------------------------------------
def target_examples(
    rows: list[dict[str, Any]],
    *,
    vocab_size: int | None = None,
    context_limit: int | None = None,
    path: str | os.PathLike | None = None,
) -> list[dict[str, list[int]]]:
    """prompt_ids + target_ids exactly as stored; labels mask the prompt so only target tokens carry loss."""
    examples = []
    for row in rows:
        prompt, target = row["prompt_ids"], row["target_ids"]
        if vocab_size is not None and max(max(prompt), max(target)) >= vocab_size:
            raise InputError(
                f"record '{row['id']}' has token ids beyond the model's vocabulary ({vocab_size}); "
                "was the file built with another model's tokenizer?",
                path,
                field="target_ids",
            )
        if context_limit is not None and len(prompt) + len(target) > context_limit:
            raise InputError(
                f"record '{row['id']}' is {len(prompt) + len(target)} tokens, longer than the "
                f"model's context ({context_limit})",
                path,
                field="target_ids",
            )
        examples.append({"input_ids": [*prompt, *target], "labels": [IGNORE] * len(prompt) + list(target)})
    return examples


class PadCollator:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_nll(
    outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Sum of target-token NLLs divided by the number of target tokens in the global batch.

    `num_items_in_batch` is Trainer's count over the whole accumulation window and all processes; without it
    (a lone forward) the batch's own count is used.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shifted = labels[:, 1:].to(logits.device)
    keep = shifted != IGNORE
    # Only the target positions go through log-softmax (the prompt is most of each sequence).
    picked = logits[:, :-1][keep].float()
    total = F.cross_entropy(picked, shifted[keep], reduction="sum")
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class TokenCountingTrainer(Trainer):
    """Trainer that logs how many loss-carrying tokens (global) it has trained on."""

    def __init__(self, *args, run_record: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tokens: int | None = None
        self.run_record = run_record or {}  # written into each checkpoint's marker: how it was made

    def _count(self, num_items_in_batch) -> None:
        if self.loss_tokens is None:  # fresh or resumed: continue from the last logged count
            logged = [e["tokens"] for e in self.state.log_history if "tokens" in e]
            self.loss_tokens = int(logged[-1]) if logged else 0
        if num_items_in_batch is not None:
            self.loss_tokens += int(round(float(num_items_in_batch)))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self._count(num_items_in_batch)
        return batches, num_items_in_batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.loss_tokens is not None:
            logs["tokens"] = self.loss_tokens
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then its completeness marker, and only then the rotation of old ones.

        Trainer deletes the oldest checkpoints (save_total_limit) inside its own save, before it returns:
        a kill between that deletion and the end of the new checkpoint could leave nothing to resume from.
        Here the old ones go only once the new one is marked complete (see `checkpoint_is_complete`).
        """
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self.accelerator.wait_for_everyone()  # every process has written its part (sharded states)
        if self.args.should_save:
            mark_checkpoint_complete(folder, self.run_record)
            rotate_checkpoints(
                output_dir=str(folder.parent),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
