"""MEMIT: mass-editing factual associations in the MLPs of a transformer (Meng et al., 2023).

Written from the paper. The view it takes: an MLP's output projection W (d_out x d_in) is a linear
key-value memory. The key of a fact is the projection's input k at the last token of the subject; the value
is W k. An edit asks for a new value. For a batch of edits:

1. Target vectors (`target_vectors`). For each edit, gradient steps find a vector delta that, added to the
   MLP output of the last edited layer L at the subject's last token, makes the model write the new answer.
   A KL term keeps the model's view of the subject itself ("{subject} is a") unchanged and the size of delta
   is penalized and clamped. The target is z = h_L + delta, h_L the output of layer L at that token.
2. The update spread over the layers R = [l_1 .. L] (`apply_memit`). From the lowest layer up: recompute the
   keys K_l and how far the output of layer L still is from z (the residual), give this layer a 1/(L-l+1)
   share of it, and solve the regularized least-squares problem
        min_dW  ||(W + dW) K_l - (W K_l + R_l)||^2 + lambda * ||dW C_l^(1/2)||^2
   whose solution is dW = R_l K_l^T (lambda C_l + K_l K_l^T)^-1 (`least_squares_update`). C_l = E[k k^T] is
   the covariance of the layer's keys over ordinary text (`key_covariance`): it says which key directions
   carry everyday knowledge, so the update avoids them. Our addition (`preserve_context`, on in `memit_edit`):
   the keys at every other position of the edits' own text join the problem with a zero residual,
   + ||dW P_l||^2, since the target vectors assume the shift happens at the key alone; in a batch of many
   invented names, the edits' own prompts are full of keys like the edited ones, and without this the
   update's shifts there undo the writing (100 KGFact facts: 0 written by the first update, 52 with it).
3. Refinement (`memit_edit`). The target vectors are found on the unedited model, but the update changes
   every token's MLP output, the answer's own positions included, and realizes only most of each shift at
   the key. So each edit's answer is re-scored through the edited model; for the edits it no longer meets
   the criterion for, new target vectors are found on the edited model and a second update is solved on
   that residual, with the edits already written pinned to their current outputs.

The projection is any nn.Linear (Llama, Qwen2, Gemma: `mlp.down_proj`) or transformers' Conv1D (GPT-2:
`mlp.c_proj`, weight stored transposed).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------------
# Locating the edited projections
# --------------------------------------------------------------------------------------------------
_KNOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h")


def projection_template(model, module: str | None = None) -> str:
    """The name pattern of the layers' MLP output projections, with `{}` for the layer index.

    `module` is the name inside one decoder layer ("mlp.down_proj"); by default the first known name that the
    model has.
    """
    names = [name for name, _ in model.named_modules()]
    candidates = (module,) if module else _KNOWN_PROJECTIONS
    for candidate in candidates:
        pattern = re.compile(r"^(.*\.)(\d+)\." + re.escape(candidate) + "$")
        for name in names:
            match = pattern.match(name)
            if match:
                return f"{match.group(1)}{{}}.{candidate}"
    raise ValueError(
        f"no per-layer module named {module or ' or '.join(_KNOWN_PROJECTIONS)} in {type(model).__name__}; "
        "name the MLP output projection with --module"
    )


def num_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def default_layers(model) -> list[int]:
    """The lower-middle MLPs, where the locate-and-edit papers find subject knowledge: about the second
    eighth to the third eighth of the depth, at least two layers (GPT-J's 3..8 of 28 is this shape)."""
    n = num_layers(model)
    first = max(1, round(n * 0.12))
    last = max(first + 1, round(n * 0.3))
    return list(range(first, min(last, n - 1) + 1))


def _weight_out_in(module) -> torch.Tensor:
    """The projection's weight as (d_out, d_in), a view: Conv1D stores it transposed."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


def decoder_layers(model, template: str) -> list[torch.nn.Module]:
    container = template.split(".{}.")[0]
    return list(model.get_submodule(container))


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------
@contextmanager
def capture_inputs(modules: dict[int, torch.nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each module at its next forward call, by key."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0]))
        for key, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_to_output(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor):
    """Add delta[i] to the module's output at (rows[i], positions[i])."""

    def hook(_module, _args, output):
        output = output.clone()
        output[rows, positions] = output[rows, positions] + delta.to(output.dtype)
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_outputs(modules: dict[int, torch.nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    seen: dict[int, torch.Tensor] = {}

    def keep(key):
        def hook(_module, _args, output):
            seen[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(keep(key)) for key, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# The edits
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditRequest:
    """One fact to write: the prompt's token ids and the position of the subject's last token in it, the new
    answer's token ids (what the model should write after the prompt), and the essence prompt of the KL term
    ("{subject} is a") with the position of the subject's last token in it."""

    prompt_ids: list[int]
    subject_position: int
    target_ids: list[int]
    essence_ids: list[int]
    essence_subject_position: int
    # Edits that name the same subject share one target shift when fitted jointly (`target_vectors`);
    # None: the edit is its own group.
    subject: str | None = None


def subject_groups(requests: list[EditRequest], joint: bool = True) -> list[int]:
    """Each request's group index: requests naming the same subject share one (when `joint`), every other
    request has its own. Groups are numbered in order of first appearance."""
    index: dict[object, int] = {}
    return [
        index.setdefault(r.subject if joint and r.subject is not None else ("row", i), len(index))
        for i, r in enumerate(requests)
    ]


def _padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch (positions of real tokens are unchanged, so subject positions stay valid)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def key_covariance(
    model, template: str, layers: list[int], texts: Iterable[list[int]], *, max_tokens: int, pad_id: int = 0
) -> dict[int, torch.Tensor]:
    """E[k k^T] of each layer's projection input over the tokens of `texts` (float64, on the CPU)."""
    device = next(model.parameters()).device
    modules = {layer: model.get_submodule(template.format(layer)) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    with tqdm(total=max_tokens, desc="key covariance", unit="tok", leave=False) as bar:
        for ids in texts:
            ids = ids[: max_tokens - count]
            if not ids:
                break
            batch = torch.tensor([ids], device=device)
            with capture_inputs(modules) as seen:
                model(input_ids=batch)
            for layer, keys in seen.items():
                k = keys[0].float()
                # One text's sum in float32 (fast), the running total in float64 (no drift over many texts).
                sums[layer] = sums.get(layer, 0) + (k.T @ k).double().cpu()
            count += len(ids)
            bar.update(len(ids))
            if count >= max_tokens:
                break
    if count == 0:
        raise ValueError("no text to estimate the key covariance from")
    return {layer: total / count for layer, total in sums.items()}


@dataclass(frozen=True)
class TargetFit:
    """The target vectors of a batch of edits and how the optimization that found them ended.

    z, h: (n, d_model), the target output of the last edited layer at each subject's last token and its
    output there now. Per edit: `nll` the mean NLL of the answer tokens under z, `max_token_nll` the NLL of its
    least likely answer token, `steps` the gradient steps it took, `converged` whether it met the criterion
    (`max_token_nll <= stop_nll`) within the step budget."""

    z: torch.Tensor
    h: torch.Tensor
    nll: list[float]
    max_token_nll: list[float]
    steps: list[int]
    converged: list[bool]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fit as named tensors (what a `FitStore` keeps)."""
        return {
            "z": self.z.contiguous(),
            "h": self.h.contiguous(),
            "nll": torch.tensor(self.nll, dtype=torch.float64),
            "max_token_nll": torch.tensor(self.max_token_nll, dtype=torch.float64),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "converged": torch.tensor(self.converged, dtype=torch.bool),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TargetFit:
        return cls(
            z=tensors["z"],
            h=tensors["h"],
            nll=tensors["nll"].tolist(),
            max_token_nll=tensors["max_token_nll"].tolist(),
            steps=tensors["steps"].tolist(),
            converged=tensors["converged"].tolist(),
        )


class FitStore(Protocol):
    """Where the fits of finished batches are kept, so that an interrupted edit resumes instead of refitting
    them (fitting is most of an edit's time: about 45 s an edit for SmolLM2 on one CPU core). The files and
    when they are valid are the caller's concern (`mixsd.editing.edit.FitDirectory`); names are unique
    within one edit."""

    def load(self, name: str) -> dict[str, torch.Tensor] | None: ...

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None: ...


def target_vectors(
    model,
    template: str,
    last_layer: int,
    requests: list[EditRequest],
    *,
    steps: int = 100,
    lr: float = 0.15,
    stop_nll: float = 0.1,
    kl_weight: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm: float = 4.0,
    pad_id: int = 0,
    batch_size: int = 16,
    joint_subjects: bool = True,
    store: FitStore | None = None,
    store_prefix: str = "",
) -> TargetFit:
    """For each request, the target output z of layer `last_layer` at the subject's last token.

    With `joint_subjects`, requests that name the same subject get one shared shift, fitted to all their
    answers at once (the sum of their losses) and converged only when every one of them meets the criterion.
    Why: MEMIT's key is the subject's last token, which the rest of the question hardly moves, so two facts of
    one subject arrive with nearly the same key; asked for two different values there, the least-squares update
    can only pay for the small difference between the keys with a large change of the weights. One value
    per subject that carries all its facts is what the key can hold.

    Each edit's shift is optimized until every token of its answer has NLL <= `stop_nll` under teacher forcing
    (then each answer token is the model's likeliest next token, so greedy generation writes the whole answer),
    or until `steps` gradient steps; an edit that meets the criterion stops and leaves the batch. `lr` is
    Adam's step relative to the hidden state's root-mean-square element, so one setting fits models whose
    hidden states differ in scale. Requests are optimized `batch_size` at a time: each row has its own shift,
    its own loss terms and its own Adam moments, so a batch gives the shifts one-at-a-time optimization would.

    With a `store`, each batch's fit is saved under `{store_prefix}batch{i}` once found, and a batch the store
    already holds (for the same requests) is loaded instead of fitted: the fit is a function of the model's
    weights and the batch, so a rerun on the same weights would find it again."""
    for p in model.parameters():
        p.requires_grad_(False)
    groups = subject_groups(requests, joint_subjects)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # Batches of whole groups, about `batch_size` requests each (a group larger than that is one batch).
    batches: list[list[int]] = [[]]
    for rows in members.values():
        if batches[-1] and len(batches[-1]) + len(rows) > batch_size:
            batches.append([])
        batches[-1].extend(rows)
    settings = (steps, lr, stop_nll, kl_weight, weight_decay, clamp_norm, pad_id)
    device = next(model.parameters()).device
    fits: dict[int, tuple[TargetFit, int]] = {}  # request index -> (its batch's fit, its row there)
    with tqdm(total=len(requests), desc="target vectors", unit="edit", leave=False) as bar:
        for number, rows in enumerate(batches):
            chunk = [requests[i] for i in rows]
            name = f"{store_prefix}batch{number}"
            identity = torch.tensor(rows + [_requests_digest(chunk)], dtype=torch.int64)
            stored = store.load(name) if store is not None else None
            if stored is not None and torch.equal(stored["requests"], identity):
                fit = TargetFit.from_tensors({k: v.to(device) for k, v in stored.items()})
            else:
                local = subject_groups(chunk, joint_subjects)
                fit = _target_batch(model, template, last_layer, chunk, local, *settings)
                if store is not None:
                    store.save(name, {**fit.tensors(), "requests": identity})
            fits.update({i: (fit, row) for row, i in enumerate(rows)})
            bar.update(len(chunk))
    order = [fits[i] for i in range(len(requests))]  # back to the requests' order
    return TargetFit(
        z=torch.stack([fit.z[row] for fit, row in order]),
        h=torch.stack([fit.h[row] for fit, row in order]),
        nll=[fit.nll[row] for fit, row in order],
        max_token_nll=[fit.max_token_nll[row] for fit, row in order],
        steps=[fit.steps[row] for fit, row in order],
        converged=[fit.converged[row] for fit, row in order],
    )


def _requests_digest(requests: list[EditRequest]) -> int:
    """A 63-bit digest of what the requests ask (a stored fit is reused only for the very same batch)."""
    text = repr(
        [(r.prompt_ids, r.subject_position, r.target_ids, r.essence_ids, r.subject) for r in requests]
    )
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def _target_batch(
    model,
    template,
    last_layer,
    requests,
    group,
    steps,
    lr,
    stop_nll,
    kl_weight,
    weight_decay,
    clamp_norm,
    pad_id,
) -> TargetFit:
    """The target vectors of one batch. `group[i]` is request i's group (0 .. G-1): a group's requests share
    one shift, its loss is the sum of theirs, and it stops once all of them meet `stop_nll`. Every group has its
    own shift, loss terms and Adam moments, so a batch gives the shifts one group at a time would."""
    device = next(model.parameters()).device
    projection = model.get_submodule(template.format(last_layer))
    n = len(requests)
    group = torch.tensor(group, device=device)
    n_groups = int(group.max()) + 1
    # The prompt followed by the new answer (teacher forcing); the loss is on the answer tokens only.
    ids, mask = _padded([r.prompt_ids + r.target_ids[:-1] for r in requests], pad_id, device)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(requests):
        start = len(r.prompt_ids) - 1  # the logits at position t predict token t + 1
        labels[i, start : start + len(r.target_ids)] = torch.tensor(r.target_ids, device=device)
    positions = torch.tensor([r.subject_position for r in requests], device=device)
    essence, essence_mask = _padded([r.essence_ids for r in requests], pad_id, device)
    essence_subject = torch.tensor([r.essence_subject_position for r in requests], device=device)
    essence_last = essence_mask.sum(dim=1) - 1

    def essence_logprobs(rows: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        local = torch.arange(len(rows), device=device)
        hook = (
            nullcontext() if shift is None else add_to_output(projection, local, essence_subject[rows], shift)
        )
        with hook:
            logits = model(input_ids=essence[rows], attention_mask=essence_mask[rows]).logits
        return torch.log_softmax(logits[local, essence_last[rows]].float(), dim=-1)

    every = torch.arange(n, device=device)
    with torch.no_grad(), capture_outputs({0: decoder_layers(model, template)[last_layer]}) as seen:
        model(input_ids=ids, attention_mask=mask)
        h = seen[0][every, positions].float()
        base_essence = essence_logprobs(every)
    # A group's scale: the mean norm of its members' hidden states (a lone request: its own).
    sizes = torch.zeros(n_groups, device=device).index_add_(0, group, torch.ones(n, device=device))
    h_norm = (torch.zeros(n_groups, device=device).index_add_(0, group, h.norm(dim=-1)) / sizes)[:, None]
    step_size = lr * h_norm / h.shape[-1] ** 0.5  # lr in units of the hidden state's RMS element
    max_norm = clamp_norm * h_norm
    delta = torch.zeros(n_groups, h.shape[-1], device=device)
    moment1, moment2 = torch.zeros_like(delta), torch.zeros_like(delta)
    answer_tokens = (labels != -100).sum(dim=1)
    # The best shift each group has seen (lowest worst-token NLL over its requests): an Adam run that
    # overshoots late, after nearly meeting the criterion, returns what it had reached rather than where it
    # ended. Per request, its NLLs under that shift.
    best_delta = delta.clone()
    best_worst = torch.full((n_groups,), float("inf"), device=device)
    best_step = torch.zeros(n_groups, dtype=torch.long, device=device)
    row_nll = torch.full((n,), float("nan"), device=device)
    row_worst = torch.full((n,), float("inf"), device=device)
    slot = torch.zeros(n_groups, dtype=torch.long, device=device)  # a group's index among the active ones
    active = torch.arange(n_groups, device=device)
    for step in range(steps + 1):  # `steps` updates; the last pass only scores the final shifts
        rows = every[torch.isin(group, active)]
        slot[active] = torch.arange(len(active), device=device)
        of_row = slot[group[rows]]  # each active request's group, as an index into `active`
        shift = delta[active].clone().requires_grad_(True)
        local = torch.arange(len(rows), device=device)
        with add_to_output(projection, local, positions[rows], shift[of_row]):
            logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits.float()
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[rows], ignore_index=-100, reduction="none"
        )
        nll = token_nll.sum(dim=1) / answer_tokens[rows]  # per request: mean over its answer tokens
        worst_row = token_nll.max(dim=1).values.detach()
        worst = torch.zeros(len(active), device=device).scatter_reduce(
            0, of_row, worst_row, "amax", include_self=False
        )
        with torch.no_grad():
            better = worst < best_worst[active]
            improved = active[better]
            best_delta[improved], best_worst[improved], best_step[improved] = (
                delta[improved],
                worst[better],
                step,
            )
            row_better = better[of_row]
            row_nll[rows[row_better]] = nll.detach()[row_better]
            row_worst[rows[row_better]] = worst_row[row_better]
        done = (worst <= stop_nll) | (step == steps)
        if bool(done.all()):
            break
        edited = essence_logprobs(rows, shift[of_row])
        kl = torch.nn.functional.kl_div(edited, base_essence[rows], log_target=True, reduction="none").sum(
            dim=-1
        )
        decay = shift.norm(dim=-1) ** 2 / h_norm[active, 0] ** 2
        moving_rows = ~done[of_row]
        loss = (nll + kl_weight * kl)[moving_rows].sum() + (weight_decay * decay)[~done].sum()
        loss.backward()
        with torch.no_grad():  # Adam, group by group: a group's moments see only its own gradients
            keep = ~done
            moving, grad = active[keep], shift.grad[keep]
            moment1[moving] = _ADAM_BETAS[0] * moment1[moving] + (1 - _ADAM_BETAS[0]) * grad
            moment2[moving] = _ADAM_BETAS[1] * moment2[moving] + (1 - _ADAM_BETAS[1]) * grad**2
            t = step + 1
            denominator = (moment2[moving] / (1 - _ADAM_BETAS[1] ** t)).sqrt() + _ADAM_EPS
            moved = (
                delta[moving] - step_size[moving] * moment1[moving] / (1 - _ADAM_BETAS[0] ** t) / denominator
            )
            norms = moved.norm(dim=-1, keepdim=True)  # clamp each shift to its own largest size
            delta[moving] = moved * torch.where(norms > max_norm[moving], max_norm[moving] / norms, 1.0)
        active = active[keep]
    return TargetFit(
        z=h + best_delta[group],
        h=h,
        nll=row_nll.tolist(),
        max_token_nll=row_worst.tolist(),
        steps=best_step[group].tolist(),
        converged=(row_worst <= stop_nll).tolist(),
    )


def least_squares_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    covariance: torch.Tensor,
    weight: float,
    preserved: torch.Tensor | None = None,
):
    """dW = R K^T (weight * C + K K^T + P P^T)^-1 for keys K (d_in, n) and residuals R (d_out, n), in float64.

    `preserved` P (d_in, m): keys whose outputs the update must leave as they are (the other positions of the
    edits' own text), i.e. the term ||dW P||^2 added to the objective."""
    keys, residual, covariance = keys.double(), residual.double(), covariance.double()
    system = weight * covariance + keys @ keys.T
    if preserved is not None:
        preserved = preserved.double()
        system = system + preserved @ preserved.T
    # (system) X = K  =>  X = system^-1 K;  dW = R X^T (system is symmetric)
    return residual @ torch.linalg.solve(system, keys).T


@torch.no_grad()
def _keys_and_outputs(model, template, layer, last_layer, requests, pad_id):
    device = next(model.parameters()).device
    ids, mask = _padded([r.prompt_ids for r in requests], pad_id, device)
    rows = torch.arange(len(requests), device=device)
    positions = torch.tensor([r.subject_position for r in requests], device=device)
    projection = model.get_submodule(template.format(layer))
    with (
        capture_inputs({0: projection}) as keys,
        capture_outputs({0: decoder_layers(model, template)[last_layer]}) as out,
    ):
        model(input_ids=ids, attention_mask=mask)
    return keys[0][rows, positions].double(), out[0][rows, positions].double()


@torch.no_grad()
def _context_keys(model, template, layer, requests, pad_id, batch_size: int = 16) -> torch.Tensor:
    """The projection's input at every position of each edit's text (prompt and answer, teacher forced) except
    its key, the subject's last token: (positions, d_in), float64 on the CPU."""
    device = next(model.parameters()).device
    projection = model.get_submodule(template.format(layer))
    found = []
    for first in range(0, len(requests), batch_size):
        chunk = requests[first : first + batch_size]
        ids, mask = _padded([r.prompt_ids + r.target_ids[:-1] for r in chunk], pad_id, device)
        with capture_inputs({0: projection}) as keys:
            model(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        keep[torch.arange(len(chunk), device=device), [r.subject_position for r in chunk]] = False
        found.append(keys[0][keep].double().cpu())
    return torch.cat(found)


@torch.no_grad()
def apply_memit(
    model,
    template: str,
    layers: list[int],
    requests: list[EditRequest],
    z: torch.Tensor,
    covariances: dict[int, torch.Tensor],
    *,
    covariance_weight: float = 15000.0,
    preserve_context: bool = False,
    pad_id: int = 0,
) -> dict[int, float]:
    """Spread the edits over `layers` (in place). Returns the norm of each layer's update.

    With `preserve_context`, the keys at every other position of the edits' own text (the rest of the subject,
    the question, the chat template, the answer) are held to their current outputs (`least_squares_update`'s
    `preserved`). Why: the target vectors are fitted as a shift at the key alone, but the update acts on every
    position whose key resembles an edited one; in a batch of many invented names those are everywhere in the
    edits' own prompts (shared word pieces), and their shifts undo what the key's shift writes."""
    layers = sorted(layers)
    last = layers[-1]
    norms = {}
    for i, layer in enumerate(layers):
        keys, current = _keys_and_outputs(model, template, layer, last, requests, pad_id)
        residual = (z.double() - current) / (len(layers) - i)
        weight = _weight_out_in(model.get_submodule(template.format(layer)))
        preserved = _context_keys(model, template, layer, requests, pad_id).T if preserve_context else None
        update = least_squares_update(
            keys.T.cpu(), residual.T.cpu(), covariances[layer], covariance_weight, preserved
        )
        weight.add_(update.to(weight.dtype).to(weight.device))
        norms[layer] = float(update.norm())
    return norms


@dataclass(frozen=True)
class AnswerScore:
    """An edit's answer through the model as it is, teacher forced: the NLL of each answer token, and whether
    each answer token is the likeliest next token after the ones before it, which is exactly when greedy
    generation after the prompt writes the whole answer."""

    token_nll: list[float]
    written: bool


@torch.no_grad()
def answer_scores(
    model, requests: list[EditRequest], *, pad_id: int = 0, batch_size: int = 16
) -> list[AnswerScore]:
    """Each request's answer scored through the model as it is (no shift), teacher forced."""
    device = next(model.parameters()).device
    scores: list[AnswerScore] = []
    for first in range(0, len(requests), batch_size):
        chunk = requests[first : first + batch_size]
        ids, mask = _padded([r.prompt_ids + r.target_ids[:-1] for r in chunk], pad_id, device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, r in enumerate(chunk):
            start = len(r.prompt_ids) - 1  # the logits at position t predict token t + 1
            rows = logprobs[i, start : start + len(r.target_ids)]
            target = torch.tensor(r.target_ids, device=device)
            nll = -rows.gather(1, target[:, None])[:, 0]
            scores.append(AnswerScore(nll.tolist(), bool((rows.argmax(dim=-1) == target).all())))
    return scores


@dataclass(frozen=True)
class MemitPass:
    """One update: which edits had new target vectors (`refit`, indices into the requests), their fit, the
    norm of each layer's update, and after it the NLL of each answer token of every edit (teacher forced)."""

    refit: list[int]
    fit: TargetFit
    update_norm: dict[int, float]
    scores: list[AnswerScore]

    @property
    def written(self) -> int:
        """Edits that greedy generation of the edited model writes exactly."""
        return sum(score.written for score in self.scores)


@dataclass(frozen=True)
class MemitResult:
    """Every pass, and the one whose weights the model keeps (the first that wrote the most edits)."""

    passes: list[MemitPass]
    kept: int

    @property
    def scores(self) -> list[AnswerScore]:
        return self.passes[self.kept].scores


def memit_edit(
    model,
    template: str,
    layers: list[int],
    requests: list[EditRequest],
    covariances: dict[int, torch.Tensor],
    *,
    refine_passes: int = 1,
    covariance_weight: float = 15000.0,
    preserve_context: bool = True,
    stop_nll: float = 0.1,
    pad_id: int = 0,
    joint_subjects: bool = True,
    store: FitStore | None = None,
    **target_options,
) -> MemitResult:
    """MEMIT with refinement (in place): target vectors and the update, then up to `refine_passes` times:
    re-score every edit through the edited model and, for those with an answer token above `stop_nll`, find
    new target vectors on the edited model and solve another update for them, the other edits pinned where
    they are (their target is their current output, so the update keeps their keys' values).

    With `joint_subjects` the edits of one subject are refit together (they share one target shift).

    With a `store` (see `FitStore`) every pass's fits are kept as they are found, so a rerun after an
    interruption replays the finished passes' updates from stored fits and fits only what is left; each pass
    starts from the weights the passes before it left, which the replay reproduces.

    A refinement pass moves every edit a little, so it can unwrite one while writing others: the model keeps
    the weights of the first pass that wrote the most edits (scored teacher forced, which here is exact for
    greedy generation: every answer token the likeliest one)."""
    last = max(layers)
    edited = {layer: _weight_out_in(model.get_submodule(template.format(layer))) for layer in layers}
    groups = subject_groups(requests, joint_subjects)
    refit = list(range(len(requests)))
    passes: list[MemitPass] = []
    best: dict[int, torch.Tensor] = {}
    kept = 0
    while True:
        chosen = [requests[i] for i in refit]
        fit = target_vectors(
            model, template, last, chosen, stop_nll=stop_nll, pad_id=pad_id, joint_subjects=joint_subjects,
            store=store, store_prefix=f"pass{len(passes)}-", **target_options,
        )  # fmt: skip
        if len(refit) == len(requests):
            z = fit.z
        else:  # the edits already written keep their current output at the last edited layer
            _, current = _keys_and_outputs(model, template, last, last, requests, pad_id)
            z = current.float()
            z[refit] = fit.z.to(z.dtype)
        norms = apply_memit(
            model,
            template,
            layers,
            requests,
            z,
            covariances,
            covariance_weight=covariance_weight,
            preserve_context=preserve_context,
            pad_id=pad_id,
        )
        passes.append(MemitPass(refit, fit, norms, answer_scores(model, requests, pad_id=pad_id)))
        if len(passes) == 1 or passes[-1].written > passes[kept].written:
            kept = len(passes) - 1
            best = {layer: weight.detach().clone() for layer, weight in edited.items()}
        missed = {groups[i] for i, score in enumerate(passes[-1].scores) if max(score.token_nll) > stop_nll}
        refit = [i for i, g in enumerate(groups) if g in missed]
        if not refit or len(passes) > refine_passes:
            break
    if kept != len(passes) - 1:
        with torch.no_grad():
            for layer, weight in edited.items():
                weight.copy_(best[layer])
    return MemitResult(passes, kept)
