"""MEMIT (`mixsd edit`): the least-squares update, the edit on a tiny random model, and the command's plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_SIZES, make_causal_lm, make_tiny_tokenizer, write_jsonl
from mixsd.core.files import InputError
from mixsd.editing.edit import EditConfig, default_stats_texts, edit, load_edits, subject_position
from mixsd.editing.memit import (
    EditRequest,
    _context_keys,
    add_to_output,
    answer_scores,
    apply_memit,
    capture_inputs,
    default_layers,
    key_covariance,
    least_squares_update,
    memit_edit,
    projection_template,
    subject_groups,
    target_vectors,
)
from mixsd.method.prompts import encode_prompt


def _model(vocab_size: int = 64, layers: int = 4, seed: int = 0):
    config = {**TINY_SIZES, "num_hidden_layers": layers}
    return make_causal_lm(
        "llama",
        seed=seed,
        sharpen=8.0,
        vocab_size=vocab_size,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **config,
    )


def test_update_equals_a_slow_least_squares_solution():
    """dW = R K^T (w C + K K^T)^-1 minimizes ||dW K - R||^2 + w ||dW C^1/2||^2: solve that problem directly."""
    torch.manual_seed(0)
    d_in, d_out, n, weight = 12, 7, 5, 3.0
    keys, residual = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    a = torch.randn(d_in, 40, dtype=torch.float64)
    covariance = a @ a.T / 40
    fast = least_squares_update(keys, residual, covariance, weight)
    root = torch.linalg.cholesky(weight * covariance)  # w C = L L^T, so w ||dW C^1/2||^2 = ||dW L||^2
    stacked_keys = torch.cat([keys, root], dim=1)  # minimize ||dW [K, L] - [R, 0]||^2
    stacked_targets = torch.cat([residual, torch.zeros(d_out, d_in, dtype=torch.float64)], dim=1)
    slow = torch.linalg.lstsq(stacked_keys.T, stacked_targets.T).solution.T
    torch.testing.assert_close(fast, slow, rtol=1e-8, atol=1e-10)


def test_preserved_keys_enter_the_same_slow_least_squares_problem():
    """With preserved keys P: minimize ||dW K - R||^2 + ||dW P||^2 + w ||dW C^1/2||^2, solved directly."""
    torch.manual_seed(1)
    d_in, d_out, n, m, weight = 12, 7, 4, 6, 2.0
    keys, residual = torch.randn(d_in, n, dtype=torch.float64), torch.randn(d_out, n, dtype=torch.float64)
    preserved = torch.randn(d_in, m, dtype=torch.float64)
    a = torch.randn(d_in, 40, dtype=torch.float64)
    covariance = a @ a.T / 40
    fast = least_squares_update(keys, residual, covariance, weight, preserved)
    root = torch.linalg.cholesky(weight * covariance)
    stacked_keys = torch.cat([keys, preserved, root], dim=1)
    zeros = torch.zeros(d_out, m + d_in, dtype=torch.float64)
    slow = torch.linalg.lstsq(stacked_keys.T, torch.cat([residual, zeros], dim=1).T).solution.T
    torch.testing.assert_close(fast, slow, rtol=1e-8, atol=1e-10)
    assert (fast @ preserved).norm() < (
        least_squares_update(keys, residual, covariance, weight) @ preserved
    ).norm()


def test_projection_template_and_default_layers():
    model = _model(layers=8)
    assert projection_template(model) == "model.layers.{}.mlp.down_proj"
    assert projection_template(model, "mlp.up_proj") == "model.layers.{}.mlp.up_proj"
    with pytest.raises(ValueError, match="no per-layer module named mlp.nothing"):
        projection_template(model, "mlp.nothing")
    layers = default_layers(model)
    assert len(layers) >= 2 and layers[0] > 0 and layers[-1] < 7


def test_gpt2_conv1d_projection_is_found_and_edited_in_its_own_layout():
    model = make_causal_lm("gpt2", seed=0, vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    template = projection_template(model)
    assert template == "transformer.h.{}.mlp.c_proj"
    covariances = key_covariance(model, template, [1], [[3, 4, 5, 6, 7, 8]], max_tokens=100)
    assert covariances[1].shape == (128, 128)  # the Conv1D input size (4 * n_embd), not its output


def _requests(count: int, length: int = 6, seed: int = 1) -> list[EditRequest]:
    """Prompts whose last token is the subject's, each asking for a different single new token."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        prompt = torch.randint(10, 60, (length,), generator=generator).tolist()
        requests.append(EditRequest(prompt, length - 1, [40 + i], [prompt[-1]], 0))
    return requests


def test_edit_makes_the_model_write_the_new_answers_and_barely_moves_unrelated_keys():
    model = _sharp_model()
    template = projection_template(model)
    layers = [1, 2]
    requests = _requests(3)
    generator = torch.Generator().manual_seed(7)
    unrelated = [torch.randint(10, 60, (6,), generator=generator).tolist() for _ in range(20)]
    texts = [torch.randint(3, 64, (32,), generator=generator).tolist() for _ in range(30)]
    lowest = model.get_submodule(template.format(layers[0]))

    def next_tokens(prompts):
        with torch.no_grad():
            return [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]

    def last_keys(prompts):  # inputs of the lowest edited projection: no edit changes them
        keys = []
        for prompt in prompts:
            with torch.no_grad(), capture_inputs({0: lowest}) as seen:
                model(input_ids=torch.tensor([prompt]))
            keys.append(seen[0][0, -1])
        return torch.stack(keys)

    assert all(
        t != r.target_ids[0]
        for t, r in zip(next_tokens([r.prompt_ids for r in requests]), requests, strict=True)
    )
    covariances = key_covariance(model, template, layers, texts, max_tokens=10_000)
    fit = target_vectors(model, template, max(layers), requests)
    assert all(fit.converged)  # every new token at p >= 0.9
    before = lowest.weight.detach().clone()
    norms = apply_memit(
        model, template, layers, requests, fit.z, covariances, covariance_weight=10.0
    )  # tiny keys: a small w
    assert set(norms) == set(layers) and all(v > 0 for v in norms.values())
    assert next_tokens([r.prompt_ids for r in requests]) == [r.target_ids[0] for r in requests]
    update = lowest.weight.detach() - before
    edited_shift = (last_keys([r.prompt_ids for r in requests]) @ update.T).norm(dim=-1).mean()
    unrelated_shift = (last_keys(unrelated) @ update.T).norm(dim=-1).mean()
    assert unrelated_shift < 0.5 * edited_shift, (float(unrelated_shift), float(edited_shift))


def test_preserving_the_context_keeps_the_update_off_the_edits_other_positions():
    """`preserve_context`: the update still writes every edit, and moves the outputs at the other positions of
    the edits' own text (prompt and answer) less than the plain update does."""
    template, layers = "model.layers.{}.mlp.down_proj", [1, 2]
    requests = _requests(3)
    generator = torch.Generator().manual_seed(7)
    texts = [torch.randint(3, 64, (32,), generator=generator).tolist() for _ in range(30)]
    shifts = {}
    for preserve in (False, True):
        model = _sharp_model()
        lowest = model.get_submodule(template.format(layers[0]))
        covariances = key_covariance(model, template, layers, texts, max_tokens=10_000)
        fit = target_vectors(model, template, max(layers), requests)
        context = _context_keys(model, template, layers[0], requests, 0)  # no edit changes the lowest keys
        before = lowest.weight.detach().clone()
        apply_memit(
            model,
            template,
            layers,
            requests,
            fit.z,
            covariances,
            covariance_weight=1.0,
            preserve_context=preserve,
        )
        assert all(score.written for score in answer_scores(model, requests))
        update = (lowest.weight.detach() - before).double()
        shifts[preserve] = float((context @ update.T).norm(dim=-1).mean())
    assert context.shape[0] == sum(len(r.prompt_ids) + len(r.target_ids) - 2 for r in requests)
    assert shifts[True] < 0.5 * shifts[False], shifts


def _tiny_corpus(tmp_path, rows=None):
    rows = rows or [
        {
            "id": f"e{i}",
            "prompt": f"Where does Zor{c}ak live?",
            "answer": f"In Qu{c}x.",
            "subject": f"Zor{c}ak",
        }
        for i, c in enumerate("abc")
    ]
    return write_jsonl(tmp_path / "edits.jsonl", rows)


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "Where is X?", "answer": "Y"}, "subject", "non-empty string"),
        ({"prompt": "Where is X?", "answer": "Y", "subject": "Z"}, "subject", "does not occur"),
        ({"prompt": "Where is X?", "answer": "", "subject": "X"}, "answer", "non-empty string"),
        ({"prompt": "Where is X?", "answer": "Y", "subject": "X", "id": True}, "id", "string"),
    ],
)
def test_bad_records_are_named_by_file_line_and_field(tmp_path, row, field, message):
    good = {"prompt": "Where is X?", "answer": "Y", "subject": "X", "id": "ok"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(InputError, match=f"line 2, field '{field}': .*{message}"):
        load_edits(path)


def test_subject_position_is_the_subjects_last_token():
    tokenizer = make_tiny_tokenizer()
    ids = encode_prompt(tokenizer, "Where does Zorak live?")
    position = subject_position(tokenizer, ids, "Zorak")
    assert tokenizer.decode(ids[: position + 1]).endswith("Zorak")
    assert not tokenizer.decode(ids[:position]).endswith("Zorak")


def test_edit_command_writes_a_model_folder_plain_transformers_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tiny_tokenizer()
    model = _model(vocab_size=len(tokenizer))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    stats = tmp_path / "stats.txt"
    stats.write_text("\n\n".join(f"Ordinary text {i} about places and people." for i in range(40)))
    rows = [
        {"id": f"e{i}", "prompt": f"{question} Zor{c}ak?", "answer": f"Qu{c}x.", "subject": f"Zor{c}ak"}
        for i, (question, c) in enumerate(
            [("Who is", "a"), ("Who is", "b"), ("Who is", "c"), ("Who leads", "a")]
        )
    ]  # two facts of Zorak: one shift for the two
    config = EditConfig(
        model="unused-when-passed-in", input=str(_tiny_corpus(tmp_path, rows)), out=str(tmp_path / "out"),
        layers="1,2", stats=str(stats), steps=5,
    )  # fmt: skip
    summary = edit(config, model=model, tokenizer=tokenizer)
    assert summary["edits"] == 4 and summary["layers"] == [1, 2] and not summary["covariance_cached"]
    assert summary["target_vectors"]["shifts"] == 3
    run_config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert (
        run_config["method"] == "memit" and run_config["module_template"] == "model.layers.{}.mlp.down_proj"
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    changed = {k for k, v in reloaded.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}

    with pytest.raises(InputError, match="finished edit"):
        edit(config, model=model, tokenizer=tokenizer)
    config.overwrite = True
    assert edit(config, model=_model(vocab_size=len(tokenizer)), tokenizer=tokenizer)["covariance_cached"]


class Killed(Exception):
    """Stands for the process being killed (pytest treats a real KeyboardInterrupt as the user's)."""


def test_an_interrupted_edit_resumes_from_its_stored_fits_and_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    """The fits are stored as they are found; a run killed while fitting its refinement pass reloads pass 0's
    fits, replays its update and fits only the rest, and writes the very weights and summary of a run that was
    never stopped. The store is removed once the output is written, and fits of other settings are not used."""
    from safetensors.torch import load_file

    from mixsd.editing import edit as edit_module

    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tiny_tokenizer()
    original = edit_module.FitDirectory.save

    def run(out: str, fail_at_save: int | None = None, **options):
        config = EditConfig(
            model="unused-when-passed-in", input=str(_tiny_corpus(tmp_path)), out=str(tmp_path / out),
            layers="1,2", steps=5, stats_tokens=500, refine_passes=1, covariance_weight=1e6, **options,
        )  # fmt: skip
        saves = []

        def counting_save(store, name, tensors):
            if fail_at_save is not None and len(saves) + 1 == fail_at_save:
                raise Killed  # the run is killed while it fits
            saves.append(name)
            original(store, name, tensors)

        monkeypatch.setattr(edit_module.FitDirectory, "save", counting_save)
        return edit(config, model=_model(vocab_size=len(tokenizer)), tokenizer=tokenizer), saves

    whole, saves = run("whole")
    assert saves == ["pass0-batch0", "pass1-batch0"]  # the update wrote nothing: every edit is refit
    assert whole["target_vectors"]["resumed_batches"] == 0
    with pytest.raises(Killed):
        run("resumed", fail_at_save=2)
    stored = edit_module.fits_path(tmp_path / "resumed")
    assert sorted(p.name for p in stored.glob("*.safetensors")) == ["pass0-batch0.safetensors"]
    resumed, saves = run("resumed")
    assert saves == ["pass1-batch0"] and resumed["target_vectors"]["resumed_batches"] == 1
    assert not stored.exists()
    volatile = ("seconds", "covariance_cached", "target_vectors")
    assert {k: v for k, v in resumed.items() if k not in volatile} == {
        k: v for k, v in whole.items() if k not in volatile
    }
    weights = [load_file(tmp_path / out / "model" / "model.safetensors") for out in ("whole", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    with pytest.raises(Killed):
        run("other", fail_at_save=2)
    changed, saves = run("other", kl_weight=0.5)  # other settings: the stored fit is not theirs
    assert changed["target_vectors"]["resumed_batches"] == 0 and saves == ["pass0-batch0", "pass1-batch0"]


def test_the_default_covariance_text_is_python_documentation_prose(tmp_path, monkeypatch):
    """Without --stats the edit needs no file: the prose of pydoc_data.topics, without its code samples."""
    paragraphs = default_stats_texts()
    assert len(paragraphs) > 200 and all(len(p.split()) >= 25 for p in paragraphs)
    assert not any(">>>" in p or "::=" in p for p in paragraphs)  # no interpreter session, no grammar rule
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tiny_tokenizer()
    config = EditConfig(
        model="unused-when-passed-in", input=str(_tiny_corpus(tmp_path)), out=str(tmp_path / "out"),
        layers="1", steps=3, stats_tokens=500,
    )  # fmt: skip
    summary = edit(config, model=_model(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    assert summary["covariance_text"].startswith("pydoc_data.topics") and not summary["covariance_cached"]


def test_a_missing_stats_file_fails_before_the_model_loads(tmp_path):
    config = EditConfig(
        model="no-such-model", input=str(_tiny_corpus(tmp_path)), out=str(tmp_path / "out"),
        stats=str(tmp_path / "missing.txt"),
    )  # fmt: skip
    with pytest.raises(InputError, match="missing.txt.*file not found"):
        edit(config)


def test_bad_options_fail_before_any_work(tmp_path):
    for kwargs, message in [
        ({"steps": 0}, "steps"),
        ({"lr": float("nan")}, "lr"),
        ({"layers": "a,b"}, "layers"),
        ({"kl_weight": -1.0}, "kl_weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            EditConfig(model="m", input=str(tmp_path / "in.jsonl"), out=str(tmp_path / "o"), **kwargs)


def test_batched_target_vectors_equal_one_at_a_time():
    """Rows of different lengths in one padded batch give the shifts each request gets alone."""
    model = _model()
    template = projection_template(model)
    requests = _requests(2, length=6) + _requests(1, length=9, seed=3)
    requests[1] = EditRequest(
        requests[1].prompt_ids, 3, [44, 45], requests[1].prompt_ids[:4], 3
    )  # subject inside
    alone = target_vectors(model, template, 2, requests, steps=5, batch_size=1)
    together = target_vectors(model, template, 2, requests, steps=5, batch_size=3)
    torch.testing.assert_close(together.z, alone.z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.h, alone.h, rtol=1e-5, atol=1e-5)
    assert together.nll == pytest.approx(alone.nll, rel=1e-4)
    assert together.steps == alone.steps


def _sharp_model():
    """The tiny model with a sharper output layer: its random hidden states are small, and with the plain
    scale no shift at one position gets a token past p = 0.9 (NLL 0.1); here the defaults reach it."""
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def _answer_nll(model, template: str, layer: int, request: EditRequest, shift: torch.Tensor) -> list[float]:
    """NLL of each answer token with `shift` added at the subject's last token (teacher forcing), scored here
    without the optimizer's code."""
    ids = torch.tensor([request.prompt_ids + request.target_ids[:-1]])
    projection = model.get_submodule(template.format(layer))
    with (
        torch.no_grad(),
        add_to_output(projection, torch.tensor([0]), torch.tensor([request.subject_position]), shift[None]),
    ):
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    start = len(request.prompt_ids) - 1
    return [float(-logprobs[start + i, t]) for i, t in enumerate(request.target_ids)]


def test_target_vectors_stop_on_the_declared_criterion_and_the_edit_is_recalled_by_greedy_generation():
    """With the default settings each target vector stops once every answer token has NLL <= stop_nll, before
    the step budget; the NLL it reports is the one its z gives; after the update, greedy generation of the
    edited model writes each new token the tiny model did not write before."""
    model = _sharp_model()
    template, layers = projection_template(model), [1, 2]
    requests = _requests(3)

    def greedy(prompt):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=1, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return int(out[0, -1])

    assert all(greedy(r.prompt_ids) != r.target_ids[0] for r in requests)
    defaults = EditConfig(model="m", input="in.jsonl", out="out")
    fit = target_vectors(
        model, template, max(layers), requests,
        steps=defaults.steps, lr=defaults.lr, stop_nll=defaults.stop_nll,
    )  # fmt: skip
    assert fit.converged == [True, True, True]
    assert all(0 < s < defaults.steps for s in fit.steps)  # stopped on the criterion, not on the budget
    for i, request in enumerate(requests):
        scored = _answer_nll(model, template, max(layers), request, fit.z[i] - fit.h[i])
        assert max(scored) <= defaults.stop_nll
        assert fit.max_token_nll[i] == pytest.approx(max(scored), abs=1e-4)
        assert fit.nll[i] == pytest.approx(sum(scored) / len(scored), abs=1e-4)
    generator = torch.Generator().manual_seed(7)
    texts = [torch.randint(3, 64, (32,), generator=generator).tolist() for _ in range(30)]
    covariances = key_covariance(model, template, layers, texts, max_tokens=10_000)
    apply_memit(
        model, template, layers, requests, fit.z, covariances, covariance_weight=10.0
    )  # tiny keys: a small w
    assert [greedy(r.prompt_ids) for r in requests] == [r.target_ids[0] for r in requests]


def test_target_vectors_report_an_edit_that_misses_the_criterion_within_its_budget():
    model = _sharp_model()
    template = projection_template(model)
    fit = target_vectors(model, template, 2, _requests(2), steps=2, lr=0.01)
    assert fit.converged == [False, False] and all(v > 0.1 for v in fit.max_token_nll)
    assert all(0 <= s <= 2 for s in fit.steps)


def _covariances(model, template: str, layers: list[int]) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    texts = [torch.randint(3, 64, (32,), generator=generator).tolist() for _ in range(30)]
    return key_covariance(model, template, layers, texts, max_tokens=10_000)


def _greedy_next(model, prompts: list[list[int]]) -> list[int]:
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]


@pytest.mark.parametrize("refine_passes", [0, 1])
def test_refinement_writes_the_edits_a_single_update_leaves_unwritten(refine_passes):
    """With a covariance weight that holds the update back (w = 100 on the tiny model), one plain MEMIT update
    writes none of 3 edits although every target vector converged; one refinement pass (new target vectors on
    the edited model, a second update) writes all 3, checked by greedy generation."""
    model = _sharp_model()
    template, layers = projection_template(model), [1, 2]
    requests = _requests(3)
    result = memit_edit(
        model, template, layers, requests, _covariances(model, template, layers),
        refine_passes=refine_passes, covariance_weight=100.0, preserve_context=False,
    )  # fmt: skip
    assert all(result.passes[0].fit.converged)
    written = sum(
        t == r.target_ids[0]
        for t, r in zip(_greedy_next(model, [r.prompt_ids for r in requests]), requests, strict=True)
    )
    assert result.passes[result.kept].written == written
    if refine_passes == 0:
        assert len(result.passes) == 1 and written == 0
    else:
        assert len(result.passes) == 2 and result.passes[1].refit == [0, 1, 2] and written == 3


def test_refinement_keeps_the_first_pass_that_wrote_the_most_edits():
    """At w = 30 the first update writes all 3 edits without meeting stop_nll, so all 3 are refit; the second
    writes them too and meets stop_nll, which ends the refinement before its budget of 2 passes. The model
    keeps the first pass's weights (the first that wrote the most), and its answers score as that pass
    reported, not as the last."""
    model = _sharp_model()
    template, layers = projection_template(model), [1, 2]
    requests = _requests(3)
    result = memit_edit(
        model, template, layers, requests, _covariances(model, template, layers),
        refine_passes=2, covariance_weight=30.0, preserve_context=False,
    )  # fmt: skip
    assert [p.written for p in result.passes] == [3, 3] and result.kept == 0
    assert result.passes[1].refit == [0, 1, 2]
    assert all(max(score.token_nll) <= 0.1 for score in result.passes[1].scores)
    rescored = [score.token_nll for score in answer_scores(model, requests)]
    for now, kept in zip(rescored, result.passes[0].scores, strict=True):
        assert now == pytest.approx(kept.token_nll, abs=1e-5)
    assert result.passes[-1].scores[0].token_nll != pytest.approx(rescored[0], abs=1e-4)


def test_subject_groups_number_shared_subjects_once_and_lone_edits_apart():
    requests = [EditRequest([1], 0, [2], [1], 0, subject=s) for s in ("a", "b", "a", None, None, "b")]
    assert subject_groups(requests) == [0, 1, 0, 2, 3, 1]
    assert subject_groups(requests, joint=False) == [0, 1, 2, 3, 4, 5]


def test_edits_of_one_subject_share_one_shift_and_a_batch_gives_what_each_group_gets_alone():
    """Two edits naming subject "a" get one shift (z - h equal), stop together and report their own NLLs under
    it; the lone edit's shift is what it gets alone; a batch cut at one request still keeps the group whole;
    without joint fitting the named subjects change nothing (the shifts of unnamed edits)."""
    model = _sharp_model()
    template = projection_template(model)
    plain = _requests(3)
    named = [
        EditRequest(*_request_fields(r), subject=s) for r, s in zip(plain, ("a", None, "a"), strict=True)
    ]
    together = target_vectors(model, template, 2, named, steps=6)
    shift = together.z - together.h
    torch.testing.assert_close(shift[0], shift[2])
    assert not torch.allclose(shift[0], shift[1])
    assert together.steps[0] == together.steps[2]
    for i in (0, 2):
        scored = _answer_nll(model, template, 2, named[i], shift[i])
        assert together.max_token_nll[i] == pytest.approx(max(scored), abs=1e-4)
        assert together.nll[i] == pytest.approx(sum(scored) / len(scored), abs=1e-4)
    pair = target_vectors(model, template, 2, [named[0], named[2]], steps=6)
    torch.testing.assert_close(together.z[[0, 2]], pair.z, rtol=1e-4, atol=1e-4)
    lone = target_vectors(model, template, 2, [named[1]], steps=6)
    torch.testing.assert_close(together.z[1], lone.z[0], rtol=1e-4, atol=1e-4)
    cut = target_vectors(model, template, 2, named, steps=6, batch_size=1)
    torch.testing.assert_close(cut.z, together.z, rtol=1e-4, atol=1e-4)
    apart = target_vectors(model, template, 2, named, steps=6, joint_subjects=False)
    torch.testing.assert_close(apart.z, target_vectors(model, template, 2, plain, steps=6).z)


def _request_fields(request: EditRequest) -> tuple:
    return (
        request.prompt_ids,
        request.subject_position,
        request.target_ids,
        request.essence_ids,
        request.essence_subject_position,
    )
