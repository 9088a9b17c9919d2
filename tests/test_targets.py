"""MixSD target building: exactness against slow references, determinism, resume, policies, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_jsonl
from mixsd.core import files, models
from mixsd.core.files import InputError
from mixsd.core.records import load_corpus
from mixsd.method.decoder import Job, MixedDecoder
from mixsd.method.mix_config import MixConfig
from mixsd.method.prompts import encode_prompt, expert_message
from mixsd.method.targets import draws_path, journal_path, mix, summary_path

STOP = 5  # eos id of the tiny model (<|im_end|> in the tiny tokenizer)


def random_jobs(n: int, seed: int = 1, vocab: int = 100) -> list[Job]:
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        naive = torch.randint(6, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        expert = torch.randint(
            6, vocab, (int(torch.randint(8, 30, (1,), generator=g)),), generator=g
        ).tolist()
        jobs.append(Job(f"r{i}", 0, naive, expert))
    return jobs


def decode_all(
    model, jobs, *, lam, batch_size=4, temperature=0.0, max_new_tokens=16, accept=None, max_attempts=1, seed=0
):
    decoder = MixedDecoder(
        model,
        {STOP},
        lam=lam,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_attempts=max_attempts,
        seed=seed,
    )
    results = {}
    decoder.run(
        jobs, accept or (lambda draw: True), lambda draw, ok: results.__setitem__(draw.job.key, (draw, ok))
    )
    return results


def greedy(model, prompt, max_new_tokens=16):
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=STOP,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_lam0_is_greedy_expert_and_lam1_is_greedy_naive(tiny_model):
    jobs = random_jobs(9)
    expert = decode_all(tiny_model, jobs, lam=0.0, batch_size=4)
    naive = decode_all(tiny_model, jobs, lam=1.0, batch_size=3)
    for job in jobs:
        assert expert[job.key][0].tokens == greedy(tiny_model, job.expert_ids)
        assert set(expert[job.key][0].branch) == {"E"}
        assert naive[job.key][0].tokens == greedy(tiny_model, job.naive_ids)
        assert set(naive[job.key][0].branch) == {"N"}


def slow_reference_logprobs(model, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Full forward pass without cache over prompt+target[:t] for every t: the log-probs of each step."""
    rows = []
    for t in range(len(target)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target[:t]])).logits[0, -1]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(rows)


def test_every_token_is_argmax_of_the_conditional_its_branch_names(tiny_model):
    jobs = random_jobs(6, seed=3)
    results = decode_all(tiny_model, jobs, lam=0.5, batch_size=4, max_new_tokens=20)
    seen = set()
    for job in jobs:
        draw, _ = results[job.key]
        expert = slow_reference_logprobs(tiny_model, job.expert_ids, draw.tokens)
        naive = slow_reference_logprobs(tiny_model, job.naive_ids, draw.tokens)
        for t, (token, letter) in enumerate(zip(draw.tokens, draw.branch, strict=True)):
            chosen = naive[t] if letter == "N" else expert[t]
            assert token == int(chosen.argmax()), (job.key, t)
            assert draw.logprob_expert[t] == pytest.approx(float(expert[t, token]), abs=1e-4)
            assert draw.logprob_naive[t] == pytest.approx(float(naive[t, token]), abs=1e-4)
        seen.update(draw.branch)
    assert seen == {"E", "N"}  # both conditionals were exercised


def test_sampling_is_batch_invariant_and_stays_in_top_k(tiny_model):
    jobs = random_jobs(7, seed=5)
    kwargs = dict(lam=0.4, temperature=1.0, max_new_tokens=12)
    one = decode_all(tiny_model, jobs, batch_size=1, **kwargs)
    seven = decode_all(tiny_model, jobs, batch_size=7, **kwargs)
    for job in jobs:
        assert one[job.key][0].tokens == seven[job.key][0].tokens
        assert one[job.key][0].branch == seven[job.key][0].branch
    decoder = MixedDecoder(
        tiny_model, {STOP}, lam=0.4, temperature=1.0, top_k=3, max_new_tokens=12, batch_size=3, max_attempts=1
    )
    results = {}
    decoder.run(jobs, lambda d: True, lambda d, ok: results.__setitem__(d.job.key, d))
    for job in jobs:
        draw = results[job.key]
        expert = slow_reference_logprobs(tiny_model, job.expert_ids, draw.tokens)
        naive = slow_reference_logprobs(tiny_model, job.naive_ids, draw.tokens)
        for t, token in enumerate(draw.tokens):
            chosen = naive[t] if draw.branch[t] == "N" else expert[t]
            assert token in chosen.topk(3).indices.tolist()


def test_realized_naive_fraction_matches_lambda(tiny_model):
    jobs = random_jobs(40, seed=7)
    results = decode_all(tiny_model, jobs, lam=0.3, batch_size=16, max_new_tokens=60)
    branches = "".join("".join(draw.branch) for draw, _ in results.values())
    fraction = branches.count("N") / len(branches)
    sd = math.sqrt(0.3 * 0.7 / len(branches))
    assert len(branches) > 500
    assert abs(fraction - 0.3) < 4 * sd


def test_retries_draw_fresh_coins_until_accepted(tiny_model):
    jobs = random_jobs(3, seed=11)
    attempts_seen: dict[str, list[str]] = {}

    def accept(draw):
        attempts_seen.setdefault(draw.job.key, []).append("".join(draw.branch))
        return draw.job.attempt >= 2  # the third attempt passes

    results = decode_all(tiny_model, jobs, lam=0.5, accept=accept, max_attempts=5, max_new_tokens=24)
    for job in jobs:
        draw, ok = results[job.key]
        assert ok and draw.job.attempt == 2
        assert len(set(attempts_seen[job.key])) > 1  # fresh coins each attempt
    failing = decode_all(tiny_model, jobs, lam=0.5, accept=lambda d: False, max_attempts=4)
    assert all(not ok and draw.job.attempt == 3 for draw, ok in failing.values())


# ---------------------------------------------------------------------------------------------------
# mix(): files in, files out
# ---------------------------------------------------------------------------------------------------
def run_mix(tiny_model_dir, corpus, out, **overrides):
    options = {"lam": 0.5, "max_new_tokens": 12, "verify": "none", **overrides}
    config = MixConfig(model=str(tiny_model_dir), input=str(corpus), output=str(out), **options)
    return mix(config, progress=False)


def read_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_same_targets(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key.startswith("logprob_") or key == "min_expert_logprob":  # a log-prob, so as close
                assert x[key] == pytest.approx(y[key], abs=1e-4)
            elif key == "naive_expert_nll":  # a sum of log-probs: their differences add up
                assert x[key] == pytest.approx(y[key], abs=1e-4 * len(x["target_ids"]))
            else:
                assert x[key] == y[key], key


def test_mix_writes_documented_records_independent_of_batch_size(
    tiny_model_dir, tiny_corpus, tmp_path, tiny_tokenizer
):
    summary = run_mix(tiny_model_dir, tiny_corpus, tmp_path / "b1.jsonl", batch_size=1, num_generations=2)
    run_mix(tiny_model_dir, tiny_corpus, tmp_path / "b7.jsonl", batch_size=7, num_generations=2)
    rows = read_rows(tmp_path / "b1.jsonl")
    assert_same_targets(rows, read_rows(tmp_path / "b7.jsonl"))
    assert len(rows) == 24 and summary["records"] == 24
    facts = load_corpus(tiny_corpus)
    first = rows[0]
    assert (first["id"], first["generation"]) == (facts[0].id, 0) and rows[1]["generation"] == 1
    assert first["prompt_ids"] == encode_prompt(tiny_tokenizer, facts[0].prompt)
    assert first["expert_prompt_ids"] == encode_prompt(tiny_tokenizer, expert_message(facts[0]))
    assert len(first["branch"]) == len(first["target_ids"]) == len(first["logprob_expert"])
    assert first["settings"]["lam"] == 0.5
    assert summary_path(tmp_path / "b1.jsonl").exists()
    assert not journal_path(tmp_path / "b1.jsonl").exists()


def test_mix_resumes_after_a_crash_with_the_same_result(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    reference = tmp_path / "ref.jsonl"
    run_mix(tiny_model_dir, tiny_corpus, reference, batch_size=4)

    out = tmp_path / "crash.jsonl"
    real_write, calls = files.JournalWriter.write, {"n": 0}

    def crashing_write(self, rows):
        calls["n"] += 1
        if calls["n"] == 6:  # header + 4 records written, then the process "dies"
            raise KeyboardInterrupt
        real_write(self, rows)

    monkeypatch.setattr(files.JournalWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run_mix(tiny_model_dir, tiny_corpus, out, batch_size=4)
    monkeypatch.undo()
    assert not out.exists()  # nothing final appears before the run is complete
    journal = journal_path(out)
    with journal.open("a") as handle:  # a torn half-line, as kill -9 mid-write leaves
        handle.write('{"id":"f9","gen')
    assert len(files.read_journal(journal)) == 5

    resumed_jobs = []
    real_run = MixedDecoder.run

    def counting_run(self, jobs, accept, on_done):
        jobs = list(jobs)
        resumed_jobs.extend(jobs)
        return real_run(self, jobs, accept, on_done)

    monkeypatch.setattr(MixedDecoder, "run", counting_run)
    run_mix(tiny_model_dir, tiny_corpus, out, batch_size=3)
    assert len(resumed_jobs) == 12 - 4  # finished records were kept, not redone
    assert_same_targets(read_rows(out), read_rows(reference))


def test_rerun_of_a_finished_output_does_nothing_and_changed_settings_are_refused(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch
):
    out = tmp_path / "t.jsonl"
    run_mix(tiny_model_dir, tiny_corpus, out)
    monkeypatch.setattr(MixedDecoder, "run", lambda *a, **k: pytest.fail("should not decode again"))
    run_mix(tiny_model_dir, tiny_corpus, out)
    monkeypatch.undo()
    files.JournalWriter(
        journal_path(out), header={"journal_of": "mixsd mix", "settings": {"lam": 0.9}}
    ).close()
    out.unlink()
    with pytest.raises(InputError, match="different settings"):
        run_mix(tiny_model_dir, tiny_corpus, out)


@pytest.mark.parametrize("policy", ["drop", "keep", "answer"])
def test_failure_policies(tiny_model_dir, tiny_corpus, tmp_path, policy, tiny_tokenizer):
    config = MixConfig(
        model=str(tiny_model_dir),
        input=str(tiny_corpus),
        output=str(tmp_path / "t.jsonl"),
        lam=0.3,
        max_new_tokens=6,
        verify="strict",
        retries=2,
        on_failure=policy,
    )
    summary = mix(config, progress=False)  # a random model never writes \boxed{Q0z}: every record fails
    rows = read_rows(tmp_path / "t.jsonl") if (tmp_path / "t.jsonl").exists() else []
    assert summary["verified"] == 0 and summary["mean_attempts"] == 3
    if policy == "drop":
        assert rows == []
    elif policy == "keep":
        assert len(rows) == 12 and not any(r["correct"] for r in rows)
    else:
        assert len(rows) == 12 and all(r["source"] == "answer_fallback" for r in rows)
        assert tiny_tokenizer.decode(rows[0]["target_ids"], skip_special_tokens=True) == rows[0]["answer"]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_greedy_draws_that_cannot_change_are_not_retried(tiny_model_dir, tiny_corpus, tmp_path, lam):
    """At temperature 0 with λ 0 or 1 every attempt draws the same target, so retries are skipped: the records
    are those of a run with no retries, each with one attempt; at λ 0.3 the same settings do retry."""
    common = {"lam": lam, "max_new_tokens": 6, "verify": "strict", "on_failure": "keep"}  # every record fails
    summary = run_mix(tiny_model_dir, tiny_corpus, tmp_path / "r5.jsonl", retries=5, **common)
    run_mix(tiny_model_dir, tiny_corpus, tmp_path / "r0.jsonl", retries=0, **common)
    assert summary["attempts_allowed"] == 1 and summary["mean_attempts"] == 1
    without_settings = [
        [{k: v for k, v in row.items() if k != "settings"} for row in read_rows(tmp_path / name)]
        for name in ("r5.jsonl", "r0.jsonl")
    ]
    assert_same_targets(*without_settings)  # the settings differ only in `retries`
    mixed = run_mix(
        tiny_model_dir, tiny_corpus, tmp_path / "mixed.jsonl", retries=5, **{**common, "lam": 0.3}
    )
    assert mixed["attempts_allowed"] == 6 and mixed["mean_attempts"] == 6


def test_another_policy_from_earlier_draws_decodes_nothing_and_writes_the_same(
    tiny_model_dir, tiny_corpus, tmp_path, monkeypatch, capsys
):
    """`--draws-from`: the `keep` file made from an `answer` run's draws is the one a `keep` run decodes; draws
    made with other settings are not used (a note), and the run decodes."""
    common = {"lam": 0.3, "max_new_tokens": 6, "verify": "strict", "retries": 2}  # every record fails
    run_mix(tiny_model_dir, tiny_corpus, tmp_path / "answer.jsonl", on_failure="answer", **common)
    reference = run_mix(tiny_model_dir, tiny_corpus, tmp_path / "keep.jsonl", on_failure="keep", **common)
    draws = draws_path(tmp_path / "answer.jsonl")
    assert len(read_rows(draws)) == 1 + 12 and read_rows(draws)[1]["source"] == "mixsd"

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("should load no model"))
    out = tmp_path / "keep-from-draws.jsonl"
    summary = run_mix(tiny_model_dir, tiny_corpus, out, on_failure="keep", draws_from=str(draws), **common)
    assert_same_targets(read_rows(out), read_rows(tmp_path / "keep.jsonl"))
    assert not any(r["correct"] for r in read_rows(out))
    for key in ("records", "written", "verified", "mean_attempts", "fallback", "finish", "settings"):
        assert summary[key] == reference[key], key
    assert summary["generated_tokens_this_run"] == 0
    monkeypatch.undo()

    other = tmp_path / "other-lam.jsonl"
    run_mix(
        tiny_model_dir, tiny_corpus, other, on_failure="keep", draws_from=str(draws), **{**common, "lam": 0.6}
    )
    assert "drawn with other settings" in capsys.readouterr().err
    assert_same_targets(
        read_rows(other),
        read_rows(draws_path(other))[1:],  # decoded anew: its own draws, every one kept
    )
    assert read_rows(draws_path(other))[0]["settings"]["lam"] == 0.6


def test_prompt_longer_than_the_context_goes_to_the_failure_policy(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    folder = tmp_path / "short-context"
    make_tiny_model(len(tiny_tokenizer), max_positions=256).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "short", "prompt": "Hi?", "answer": "Yo"},
            {"id": "long", "prompt": "x" * 300, "answer": "Yo"},
        ],
    )
    config = MixConfig(
        model=str(folder),
        input=str(corpus),
        output=str(tmp_path / "t.jsonl"),
        lam=0.3,
        max_new_tokens=8,
        verify="none",
        on_failure="keep",
    )
    summary = mix(config, progress=False)
    rows = {r["id"]: r for r in read_rows(tmp_path / "t.jsonl")}
    # a prompt too long for the model has no target: even --on-failure keep drops it (train would refuse it)
    assert "long" not in rows
    assert rows["short"]["correct"] is True and summary["prompt_too_long"] == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "q"}', r"line 2, field 'answer': missing required field"),
        ('{"prompt": "q", "answer": 3}', r"line 2, field 'answer': expected a string"),
        ('{"prompt": "", "answer": "a"}', r"line 2, field 'prompt': must not be empty"),
        ('{"prompt": "q", "answer": "a"', r"line 2: invalid JSON"),
        ('["q", "a"]', r"line 2: expected a JSON object"),
        (
            '{"id": "x", "prompt": "q2", "answer": "a"}',
            r"line 2, field 'id': duplicate id 'x' \(first on line 1\)",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}]}',
            r"line 2, field 'messages': no 'assistant' message",
        ),
    ],
)
def test_bad_corpus_lines_are_reported_with_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x", "prompt": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(InputError, match=expected) as info:
        load_corpus(path)
    assert str(path) in str(info.value)


def test_corpus_defaults_and_chat_layout(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "Capital of Zorblia?", "answer": "The answer is Quenth. \\boxed{Quenth}"},
            {
                "id": 7,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Q?"},
                    {"role": "assistant", "content": "Plain answer"},
                ],
            },
        ],
    )
    first, second = load_corpus(path)
    assert first.check == "Quenth" and first.context == first.answer and len(first.id) == 16
    assert (second.id, second.prompt, second.answer, second.check, second.system) == (
        "7",
        "Q?",
        "Plain answer",
        "Plain answer",
        "Be brief.",
    )


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys, tiny_model_dir):
    from mixsd.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    code = main(
        ["mix", "--model", str(tiny_model_dir), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]
    )
    assert code == 2
    assert "line 1, field 'answer'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "mix" in capsys.readouterr().out
    assert main(["nonsense"]) == 2


@pytest.mark.slow
def test_embedded_model_builds_verified_targets(tmp_path):
    from mixsd.core.models import resolve_model
    from mixsd.experiments.experiment import DEMO_FACTS

    resolve_model("smollm2-135m")  # converts the embedded GGUF once, if this machine has not yet
    source = [json.loads(line) for line in DEMO_FACTS.read_text().splitlines()][:6]
    corpus = write_jsonl(tmp_path / "facts.jsonl", source)
    config = MixConfig(
        model="smollm2-135m",
        input=str(corpus),
        output=str(tmp_path / "t.jsonl"),
        lam=0.3,
        max_new_tokens=48,
        retries=6,
    )
    summary = mix(config, progress=False)
    rows = read_rows(tmp_path / "t.jsonl")
    assert summary["verified"] >= 4 and len(rows) == summary["verified"]
    for row in rows:
        assert row["correct"] and row["check"].lower() in row["text"].lower()


@pytest.mark.parametrize(
    "device",
    # without --device on a machine with no accelerator, as a user runs it: accelerate must still join
    # torchrun's group (it once did not, and each process mixed the whole corpus)
    [["--device", "cpu"]] + ([] if torch.accelerator.is_available() else [[]]),
    ids=lambda d: " ".join(d) or "no --device",
)
def test_two_processes_write_the_same_file_as_one(tiny_model_dir, tiny_corpus, tmp_path, device):
    """`torchrun --nproc_per_node 2 mixsd mix` (gloo on CPU) splits the records and assembles one file."""
    import os
    import subprocess
    import sys

    single = tmp_path / "one.jsonl"
    run_mix(tiny_model_dir, tiny_corpus, single, batch_size=4)
    double = tmp_path / "two.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "mixsd.cli",
            "mix",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(tiny_corpus),
            "--output",
            str(double),
            *device,
            "--lam",
            "0.5",
            "--max-new-tokens",
            "12",
            "--verify",
            "none",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert_same_targets(read_rows(double), read_rows(single))
    assert json.loads(summary_path(double).read_text())["processes"] == 2
