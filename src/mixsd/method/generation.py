"""Batched forward passes for evaluation: greedy generation and scoring of given tokens.

Both pack sequences of different lengths by left padding with an explicit attention mask and position
ids, so every row sees exactly the positions it would see alone. Sequences are sorted by length before
batching (little padding); results carry the caller's indices, so the order of the input does not matter.

    greedy_generate   KV-cached greedy decoding with continuous batching: a row leaves the batch as soon
                      as it emits a stop token and a waiting prompt takes its place
    tail_logprobs     log-probabilities a model gives the last `tail` tokens of each sequence, computing
                      the vocabulary projection only for the positions that are scored
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache

J = TypeVar("J")  # a caller's job: a prompt index (greedy generation), a record's slot (the MixSD decoder)


def autocast(device: torch.device | str, enabled: bool):
    """bfloat16 autocast on `device` when enabled: weights stay as loaded, matmuls run in bf16."""
    if not enabled:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (a memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
    return ids, mask, positions


def _forward(model, keep: int | None = None, **inputs):
    """A forward pass that computes logits only for the last `keep` positions where the model allows it."""
    if keep is None:
        return model(**inputs)
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:  # a model without `logits_to_keep`: compute all positions and cut
        out = model(**inputs)
        out.logits = out.logits[:, -keep:]
        return out


# Cache layers RowBatch knows how to splice and trim. Exact class names, not subclasses: a subclass may
# keep more state (an indexer cache, quantized copies) that splicing would leave behind.
_SPLICEABLE = {"DynamicLayer", "DynamicSlidingWindowLayer"}


def _spliceable_layers(cache) -> list | None:
    """The cache's layers when every one can be spliced and trimmed (see `_SPLICEABLE`), else None.

    A DynamicLayer holds every column of the batch; a DynamicSlidingWindowLayer holds only the last
    min(columns, window - 1) of them and counts the columns in `cumulative_length`. Both stay valid
    when rows are left-padded, because left padding shifts every row's columns by the same amount.
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    for layer in layers:
        if type(layer).__name__ not in _SPLICEABLE or not layer.is_initialized:
            return None
        if getattr(layer, "record_past", False):  # keeps more than the window: not the layout above
            return None
    return layers


def _is_sliding(layer) -> bool:
    return type(layer).__name__ == "DynamicSlidingWindowLayer"


def _pad_left_to(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class RowBatch:
    """Rows of a KV-cached batched decode that join and leave at any step (continuous batching).

    Rows of different lengths share one DynamicCache, left-padded and masked; `logits` holds each row's
    next-token logits. `rows` carries the caller's label of each row. Used by `greedy_generate` and by
    the MixSD decoder (`decoder.MixedDecoder`), whose records own two rows each.
    """

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.rows: list = []  # caller's labels, one per row
        self.cache = self.mask = self.positions = self.logits = None

    def add(self, labels: list, prompts: list[list[int]]) -> bool:
        """Prefill `prompts` and append them as rows; False (nothing added) when the cache cannot be spliced."""

        indices = list(labels)
        ids, mask, positions = left_pad(prompts, self.pad_id, self.device)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        out = _forward(
            self.model,
            1,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, mask.sum(dim=1)
            self.logits, self.rows = out.logits[:, -1, :], list(indices)
            return True
        old_layers, new_layers = _spliceable_layers(self.cache), _spliceable_layers(cache)
        if (
            old_layers is None
            or new_layers is None
            or [type(layer) for layer in old_layers] != [type(layer) for layer in new_layers]
        ):
            return False
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(old_layers, new_layers, strict=True):
            # both parts end at the same (last) column once left-padded to `length`; a sliding layer's
            # stored columns are the last ones, so it pads to the longer of the two stored spans only
            stored = max(old.keys.shape[2], new.keys.shape[2]) if _is_sliding(old) else length
            old.keys = torch.cat([_pad_left_to(old.keys, stored, 2), _pad_left_to(new.keys, stored, 2)])
            old.values = torch.cat([_pad_left_to(old.values, stored, 2), _pad_left_to(new.values, stored, 2)])
            if _is_sliding(old):
                old.cumulative_length = length
        self.mask = torch.cat([_pad_left_to(self.mask, length, 1), _pad_left_to(mask, length, 1)])
        self.positions = torch.cat([self.positions, mask.sum(dim=1)])
        self.logits = torch.cat([self.logits, out.logits[:, -1, :]])
        self.rows += indices
        return True

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at positions `keep` (in that order); drop cache columns nobody attends to."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache = [], None
            return
        select = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(select)
        self.mask, self.positions, self.logits = (
            self.mask[select],
            self.positions[select],
            self.logits[select],
        )
        self.rows = [self.rows[r] for r in keep]
        lead = int(self.mask.any(dim=0).int().argmax())
        layers = _spliceable_layers(self.cache)
        if lead > 0 and layers is not None:
            width = self.mask.shape[1] - lead
            for layer in layers:
                # a full layer stores all columns (drop the first `lead`), a sliding one at most the last
                # window - 1, of which only those among the remaining `width` columns stay
                stored = min(layer.keys.shape[2], width)
                layer.keys, layer.values = layer.keys[:, :, -stored:], layer.values[:, :, -stored:]
                if _is_sliding(layer):
                    layer.cumulative_length = width
            self.mask = self.mask[:, lead:]

    def step(self, tokens: list[int]) -> None:
        ids = torch.tensor(tokens, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = _forward(
            self.model,
            1,
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        self.logits = out.logits[:, -1, :]


class ContinuousBatcher(Generic[J]):
    """The one continuous-batching loop: jobs join a `RowBatch` while it has room, leave as they finish.

    Each job owns `rows_per_job` rows (its prompts, `prompts(job)`); every step the caller's
    `choose(jobs, logits)` picks one token per job from the rows' next-token logits (rows of job k are
    `k * rows_per_job ...`), `finish(job, token)` says whether that job is done, and the token is appended
    to every row of the jobs that go on. `run` yields each job as it finishes, in row order; while the
    generator waits at a yield the caller may `requeue` jobs (a retry), which are admitted before the rest.

    Admission: waiting jobs are prefilled and spliced into the running batch when at least `admit_at`
    of its `batch_size` job places are free (or when it is empty); a model whose cache `RowBatch` cannot
    splice runs one batch at a time instead (refill only when the batch has drained).
    """

    def __init__(
        self,
        model,
        pad_id: int,
        *,
        batch_size: int,
        rows_per_job: int,
        prompts: Callable[[J], list[list[int]]],
        choose: Callable[[list[J], torch.Tensor], list[int]],
        finish: Callable[[J, int], bool],
        admit_at: int = 1,
    ):
        if batch_size < 1 or rows_per_job < 1 or admit_at < 1:
            raise ValueError("batch_size, rows_per_job and admit_at must be >= 1")
        self.model, self.pad_id = model, pad_id
        self.batch_size, self.rows_per_job, self.admit_at = batch_size, rows_per_job, admit_at
        self.prompts, self.choose, self.finish = prompts, choose, finish
        self.queue: deque[J] = deque()

    def requeue(self, job: J) -> None:
        """Put `job` at the front of the queue: it is admitted before every job still waiting."""
        self.queue.appendleft(job)

    def run(self, jobs: Iterable[J]) -> Iterator[J]:
        """Decode `jobs` (admitted in this order) until every one has finished; yield each as it finishes."""
        self.queue.extend(jobs)
        batch = RowBatch(self.model, self.pad_id)
        running: list[J] = []
        splice = True
        while self.queue or running:
            free = self.batch_size - len(running)
            if self.queue and free > 0 and (not running or (splice and free >= self.admit_at)):
                admitted = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
                if batch.add(
                    [job for job in admitted for _ in range(self.rows_per_job)], self._rows(admitted)
                ):
                    running.extend(admitted)
                else:  # this model's cache cannot be spliced: refill only when the batch has drained
                    splice = False
                    self.queue.extendleft(reversed(admitted))
            tokens = self.choose(running, batch.logits)
            kept = []
            for position, (job, token) in enumerate(zip(running, tokens, strict=True)):
                if self.finish(job, token):
                    yield job
                else:
                    kept.append(position)
            if len(kept) < len(running):
                running = [running[k] for k in kept]
                batch.keep([k * self.rows_per_job + r for k in kept for r in range(self.rows_per_job)])
            if running:
                batch.step([tokens[k] for k in kept for _ in range(self.rows_per_job)])

    def _rows(self, jobs: list[J]) -> list[list[int]]:
        rows = []
        for job in jobs:
            prompts = self.prompts(job)
            if len(prompts) != self.rows_per_job:
                raise ValueError(
                    f"a job has {len(prompts)} prompts, the batcher runs {self.rows_per_job} per job"
                )
            rows.extend(prompts)
        return rows


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: list[list[int]],
    *,
    stop_ids: Iterable[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int = 16,
    on_row: Callable[[int], None] | None = None,
    text_stop: Callable[[list[int]], int | None] | None = None,
) -> Iterator[tuple[int, list[int], str]]:
    """Greedy continuations of `prompts`; yields (index, new tokens without the stop token, finish reason).

    finish is "stop" (a stop token was emitted) or "length" (max_new_tokens reached). Rows are yielded as
    they finish, in no particular order. Continuous batching (`ContinuousBatcher`): when rows finish,
    waiting prompts are prefilled and spliced into the running batch (models whose cache has layers
    RowBatch cannot splice, e.g. linear-attention or indexer layers, run one batch at a time instead).
    `on_row(index)` is called after each yield.
    `text_stop(tokens)` (e.g. `prompts.AnswerEnd.text_stop`, the plain format's stop rule) returns how many
    of a row's tokens hold its answer once the row has reached a text-level stop, else None; such a row
    ends at once with those tokens and finish "stop_text".
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    stops = set(stop_ids)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished: dict[int, str] = {}

    def finish(index: int, token: int) -> bool:
        if token in stops:
            finished[index] = "stop"
            return True
        tokens[index].append(token)
        cut = text_stop(tokens[index]) if text_stop is not None else None
        if cut is not None:
            del tokens[index][cut:]
            finished[index] = "stop_text"
        elif len(tokens[index]) >= max_new_tokens:
            finished[index] = "length"
        return index in finished

    batcher = ContinuousBatcher(
        model,
        pad_id,
        batch_size=batch_size,
        rows_per_job=1,
        prompts=lambda index: [prompts[index]],
        choose=lambda _indices, logits: logits.argmax(dim=-1).tolist(),
        finish=finish,
        # admit newcomers in groups (a prefill per token step would cost more than it saves)
        admit_at=max(1, batch_size // 4),
    )
    # longest first, so prompts admitted together have similar lengths (little padding)
    for index in batcher.run(sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))):
        yield index, tokens.pop(index), finished.pop(index)
        if on_row is not None:
            on_row(index)


@torch.inference_mode()
def tail_logprobs(
    model,
    sequences: list[list[int]],
    tails: list[int],
    *,
    pad_id: int,
    batch_size: int = 16,
    full: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """For each sequence, the model's log-probs of its last `tail` tokens given everything before them.

    Yields (index, tensor): shape [tail] (the log-prob of each actual token) or, with full=True,
    [tail, vocab] (the whole next-token distribution at each of those positions), in float32.
    Batches come longest first; two calls with the same sequences yield in the same order.
    """
    device = next(model.parameters()).device
    for i, (seq, tail) in enumerate(zip(sequences, tails, strict=True)):
        if not 1 <= tail < len(seq):
            raise ValueError(f"sequence {i}: tail {tail} must be in [1, {len(seq) - 1}]")
    for batch in _batches([len(s) for s in sequences], batch_size):
        ids, mask, positions = left_pad([sequences[i] for i in batch], pad_id, device)
        keep = max(tails[i] for i in batch) + 1
        out = _forward(
            model, keep, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        )
        # position p predicts token p+1, so the last `tail` tokens are predicted by the `tail` positions
        # before the final one
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        for row, index in enumerate(batch):
            tail = tails[index]
            rows = logprobs[row, -tail:]
            if full:
                yield index, rows
            else:
                targets = ids[row, -tail:]
                yield index, rows.gather(1, targets[:, None]).squeeze(1)
