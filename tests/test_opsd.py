"""The OPSD baseline: divergences, rollouts, the batched loss against a slow reference, and training runs."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from conftest import make_word_model, make_word_tokenizer
from mixsd.core.records import make_fact
from mixsd.method.prompts import encode_prompt
from mixsd.training.opsd import (
    answer_start_probability,
    opsd_examples,
    opsd_loss_sum,
    paired_batch,
    sample_answers,
    token_divergence,
)
from mixsd.training.opsd_options import DIAGNOSTICS_FILE
from mixsd.training.train import TrainConfig, train

VOCAB = 64


def tiny_tokenizer():
    return make_word_tokenizer(VOCAB)


def tiny_model(seed: int = 0):
    return make_word_model(VOCAB, max_positions=128, seed=seed)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(6, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(n)]


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("top_k", [0, 5])
def test_divergence_is_zero_for_equal_logits_and_positive_otherwise(divergence, top_k):
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 20), torch.randn(3, 4, 20)
    assert torch.allclose(token_divergence(a, a.clone(), divergence, top_k), torch.zeros(3, 4), atol=1e-6)
    value = token_divergence(a, b, divergence, top_k)
    assert value.shape == (3, 4) and (value > 0).all()
    if divergence == "jsd":
        assert (value <= math.log(2) + 1e-6).all()
        if top_k == 0:  # symmetric on the full vocabulary (the top-k set depends on who is the teacher)
            assert torch.allclose(value, token_divergence(b, a, divergence, top_k), atol=1e-6)


def test_forward_and_reverse_kl_are_the_textbook_formulas_on_the_teacher_top_k():
    torch.manual_seed(1)
    student, teacher = torch.randn(10), torch.randn(10)
    top = teacher.topk(3).indices
    p = torch.softmax(teacher[top].double(), 0)
    q = torch.softmax(student[top].double(), 0)
    assert token_divergence(student, teacher, "forward", 3).item() == pytest.approx(
        (p * (p / q).log()).sum().item(), rel=1e-5
    )
    assert token_divergence(student, teacher, "reverse", 3).item() == pytest.approx(
        (q * (q / p).log()).sum().item(), rel=1e-5
    )
    p, q = torch.softmax(teacher.double(), 0), torch.softmax(student.double(), 0)
    assert token_divergence(student, teacher, "forward", 0).item() == pytest.approx(
        (p * (p / q).log()).sum().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(student, teacher, "bogus")


def test_sampled_answers_stop_after_the_first_stop_token_and_follow_the_seed():
    model = tiny_model()
    prompts = random_prompts(6, seed=2)
    torch.manual_seed(7)
    first = sample_answers(model, prompts, max_new_tokens=12, stop_ids=[2, 9], pad_id=0)
    torch.manual_seed(7)
    assert sample_answers(model, prompts, max_new_tokens=12, stop_ids=[2, 9], pad_id=0) == first
    for answer in first:
        assert 1 <= len(answer) <= 12
        assert not {2, 9} & set(answer[:-1])  # a stop token can only be last
        assert len(answer) == 12 or answer[-1] in (2, 9)
    assert len({tuple(a) for a in first}) > 1  # T=1 sampling, not greedy


def test_loss_is_zero_when_the_teacher_sees_the_same_prompt_with_the_same_weights():
    student = tiny_model()
    teacher = copy.deepcopy(student)
    prompts = random_prompts(5, seed=3)
    torch.manual_seed(0)
    answers = sample_answers(student, prompts, max_new_tokens=8, stop_ids=[2], pad_id=0)
    batch = paired_batch(prompts, prompts, answers, pad_id=0)
    for divergence in ("forward", "reverse", "jsd"):
        for top_k in (0, 8):
            assert opsd_loss_sum(student, teacher, batch, divergence, top_k).item() == pytest.approx(
                0, abs=1e-5
            )
    # and it is not zero once the teacher reads another prompt
    other = paired_batch(prompts, random_prompts(5, seed=4), answers, pad_id=0)
    assert opsd_loss_sum(student, teacher, other, "forward", 8).item() > 1e-3


def _slow_reference(student, teacher, prompts, experts, answers, divergence, top_k) -> float:
    """Token by token, one unpadded sequence at a time, in float64, with explicit sums over tokens."""
    total = 0.0
    with torch.no_grad():
        for prompt, expert, answer in zip(prompts, experts, answers, strict=True):
            for j in range(len(answer)):
                s = student(input_ids=torch.tensor([prompt + answer[:j]])).logits[0, -1].double()
                t = teacher(input_ids=torch.tensor([expert + answer[:j]])).logits[0, -1].double()
                support = (
                    sorted(range(len(t)), key=lambda i: -t[i].item())[:top_k] if top_k else range(len(t))
                )
                zt = sum(math.exp(t[i].item()) for i in support)
                zs = sum(math.exp(s[i].item()) for i in support)
                p = {i: math.exp(t[i].item()) / zt for i in support}
                q = {i: math.exp(s[i].item()) / zs for i in support}
                if divergence == "forward":
                    total += sum(p[i] * math.log(p[i] / q[i]) for i in support)
                elif divergence == "reverse":
                    total += sum(q[i] * math.log(q[i] / p[i]) for i in support)
                else:
                    m = {i: (p[i] + q[i]) / 2 for i in support}
                    total += 0.5 * sum(
                        p[i] * math.log(p[i] / m[i]) + q[i] * math.log(q[i] / m[i]) for i in support
                    )
    return total


@pytest.mark.parametrize("divergence,top_k", [("forward", 8), ("reverse", 0), ("jsd", 8)])
def test_one_batch_matches_a_slow_reference(divergence, top_k):
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    prompts, experts = random_prompts(4, seed=5), random_prompts(4, seed=6)
    torch.manual_seed(3)
    answers = sample_answers(student, prompts, max_new_tokens=6, stop_ids=[2], pad_id=0)
    assert len({len(a) for a in answers}) > 1 or len(answers[0]) > 1
    batch = paired_batch(prompts, experts, answers, pad_id=0)
    fast = opsd_loss_sum(student, teacher, batch, divergence, top_k).item()
    assert fast == pytest.approx(
        _slow_reference(student, teacher, prompts, experts, answers, divergence, top_k), rel=1e-4
    )
    assert batch["loss_mask"].sum().item() == sum(len(a) for a in answers)


def test_gradient_reaches_the_student_only():
    student, teacher = tiny_model(0), tiny_model(1)
    prompts = random_prompts(3, seed=8)
    torch.manual_seed(0)
    answers = sample_answers(student, prompts, max_new_tokens=5, stop_ids=[2], pad_id=0)
    opsd_loss_sum(
        student.train(), teacher, paired_batch(prompts, random_prompts(3, 9), answers, 0), "forward", 8
    ).backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_prompts_are_built_exactly_as_mix_builds_them(tmp_path):
    tokenizer = tiny_tokenizer()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "prompt": "w1 w2", "answer": "w7", "system": "w4"}) + "\n")
    (row,) = opsd_examples(corpus, tokenizer)
    fact = make_fact("w1 w2", "w7", id="a", system="w4")
    assert row["prompt_ids"] == encode_prompt(tokenizer, "w1 w2", "w4")
    # no chat template: the plain expert format, the fact on the line before the plain prompt
    plain = tokenizer("w4 w7 Question: w1 w2 Answer:", add_special_tokens=False)["input_ids"]
    assert row["expert_ids"] == [1, *plain]
    from mixsd.method.prompts import load_expert_template
    from mixsd.method.targets import build_jobs

    ((_, job),) = build_jobs([fact], tokenizer, load_expert_template(None, tokenizer))
    assert (row["prompt_ids"], row["expert_ids"]) == (job.naive_ids, job.expert_ids)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_opsd_training_run(tmp_path, lora_rank):
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as handle:
        for i in range(6):
            handle.write(
                json.dumps({"id": f"f{i}", "prompt": f"w{i} w{i + 1}", "answer": f"w{i + 30}"}) + "\n"
            )
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"id": "v", "prompt_ids": [1, 4, 7, 5], "target_ids": [40, 2]}) + "\n")
    config = TrainConfig(
        model="tiny",
        out=str(tmp_path / "run"),
        method="opsd",
        corpus=str(corpus),
        epochs=2,
        batch_size=3,
        lr=2e-2,
        opsd_rollouts=2,
        opsd_max_new_tokens=6,
        lora_rank=lora_rank,
        expert_template="{prompt} w50 {context} w51",
        validation=str(validation),
        save_every=-1,
        progress=False,
    )
    base = tiny_model()
    summary = train(config, model=copy.deepcopy(base), tokenizer=tiny_tokenizer())
    history = summary["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["loss"] >= 0 and math.isfinite(h["loss"]) for h in history)
    tokens = [h["tokens"] for h in history]
    assert tokens == sorted(tokens) and 0 < tokens[0] <= 3 * 2 * 6  # at most prompts x rollouts x cap
    assert len(summary["validation"]) == 2
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    layer, start = (
        trained.model.layers[0].self_attn.q_proj.weight,
        base.model.layers[0].self_attn.q_proj.weight,
    )
    assert not torch.allclose(layer, start)


# --------------------------------------------------------------------------------------------------
# The gradient is the forward-KL gradient over the teacher's top-k (float64)
# --------------------------------------------------------------------------------------------------
def test_the_logit_gradient_of_forward_kl_is_q_minus_p_on_the_teacher_top_k():
    """d/dz_j KL(p||q) with p, q renormalized on the teacher's top-k set S: q_j - p_j for j in S, 0 outside."""
    torch.manual_seed(11)
    student = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 40, dtype=torch.float64)
    token_divergence(student, teacher, "forward", 7).sum().backward()
    top = teacher.topk(7, dim=-1).indices
    p = torch.softmax(teacher.gather(-1, top), -1)
    q = torch.softmax(student.detach().gather(-1, top), -1)
    expected = torch.zeros_like(student).scatter(-1, top, q - p)
    assert torch.allclose(student.grad, expected, rtol=0, atol=1e-14)


def test_the_parameter_gradient_equals_an_explicit_forward_kl_in_float64():
    student, teacher = tiny_model(seed=0).double(), tiny_model(seed=1).double()
    prompts, experts = random_prompts(4, seed=12), random_prompts(4, seed=13)
    torch.manual_seed(5)
    answers = sample_answers(student, prompts, max_new_tokens=6, stop_ids=[2], pad_id=0)
    assert len({len(a) for a in answers}) > 1  # padding is exercised
    top_k = 6
    opsd_loss_sum(
        student.train(), teacher, paired_batch(prompts, experts, answers, 0), "forward", top_k
    ).backward()
    fast = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    # the reference: one unpadded sequence at a time, KL written out with exp and sums over the top-k set
    total = torch.zeros((), dtype=torch.float64)
    for prompt, expert, answer in zip(prompts, experts, answers, strict=True):
        s_logits = student(input_ids=torch.tensor([prompt + answer])).logits[0]
        with torch.no_grad():
            t_logits = teacher(input_ids=torch.tensor([expert + answer])).logits[0]
        for j in range(len(answer)):
            s, t = s_logits[len(prompt) + j - 1], t_logits[len(expert) + j - 1]
            support = t.topk(top_k).indices
            p = t[support].exp() / t[support].exp().sum()
            q = s[support].exp() / s[support].exp().sum()
            total = total + (p * (p.log() - q.log())).sum()
    total.backward()
    for name, param in student.named_parameters():
        assert torch.allclose(fast[name], param.grad, rtol=1e-9, atol=1e-13), name
    assert sum(g.abs().sum() for g in fast.values()) > 0


# --------------------------------------------------------------------------------------------------
# Rollouts are the student's own distribution, whatever its generation config says
# --------------------------------------------------------------------------------------------------
def test_rollouts_ignore_sampling_settings_in_the_models_generation_config():
    model = tiny_model(seed=3)
    # Qwen2.5-style defaults that `generate` would otherwise fill in: these would forbid every repeat
    # and make all rows of one prompt identical
    model.generation_config.repetition_penalty = 1e9
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1
    prompt = random_prompts(1, seed=14)[0]
    torch.manual_seed(0)
    answers = sample_answers(model, [prompt] * 24, max_new_tokens=12, stop_ids=[2], pad_id=0)
    assert len({tuple(a) for a in answers}) > 1
    repeats = sum(len(a) - len(set(a)) + len(set(a) & set(prompt)) for a in answers)
    assert repeats > 0  # a T=1 sample of 12 tokens from 64 repeats some token, or a prompt token


def test_answer_start_probability_sums_the_start_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]]))
    probs = answer_start_probability(logits, [[1, 3]])
    assert torch.allclose(probs, torch.tensor([[0.3, 0.8]]), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# OPSD learns when the teacher's context fixes the answer
# --------------------------------------------------------------------------------------------------
QUESTIONS = [6, 7, 8, 9]  # w0..w3: the facts to inject
ANSWERS = [26, 27, 28, 29]  # w20..w23
KNOWN = [10, 11, 12, 13, 14, 15, 16, 17]  # w4..w11: questions the base model answers without context
UNKNOWN = 56  # w50: the base model's "I do not know"


@pytest.fixture(scope="module")
def context_reader():
    """A tiny base model that copies the answer from its context and, without one, answers the questions it
    knows and says w50 to the others.

    Trained on every (answer, question) pair in the plain expert format "<s> a Question: q Answer: a </s>",
    and on the naive prompts "<s> Question: q Answer: y </s>" with y = w50 for the questions to inject and a
    known answer for eight others (so that the naive prompt's answer depends on the question, as a real
    model's does). 150 full-batch AdamW steps, a few seconds on one thread.
    """
    model = make_word_model(VOCAB, max_positions=128, seed=0).train()
    with_context = torch.tensor([[1, a, 4, q, 5, a, 2] for a in ANSWERS for q in QUESTIONS + KNOWN])
    known = {q: ANSWERS[i % len(ANSWERS)] for i, q in enumerate(KNOWN)}
    naive = torch.tensor([[1, 4, q, 5, known.get(q, UNKNOWN), 2] for q in QUESTIONS + KNOWN])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (150 s instead of 4 s under load)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=with_context).logits[:, 4:-1].reshape(-1, VOCAB), with_context[:, 5:].reshape(-1)
        ) + torch.nn.functional.cross_entropy(
            model(input_ids=naive).logits[:, 3:-1].reshape(-1, VOCAB), naive[:, 4:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval().requires_grad_(True)


def greedy_first_token(model, prompt: list[int]) -> int:
    with torch.no_grad():
        return int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


def test_opsd_teaches_a_fact_the_teacher_reads_in_context(tmp_path, context_reader):
    tokenizer = tiny_tokenizer()
    # each question's answer is another question's context answer, so no shortcut maps q to a
    facts = [(q, ANSWERS[(i + 1) % 4]) for i, q in enumerate(QUESTIONS)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"f{q}", "prompt": f"w{q - 6}", "answer": f"w{a - 6}"}) + "\n" for q, a in facts
        )
    )
    examples = opsd_examples(corpus, tokenizer)
    for (q, a), row in zip(facts, examples, strict=True):
        assert row["prompt_ids"] == [1, 4, q, 5] and row["expert_ids"] == [1, a, 4, q, 5]
        assert greedy_first_token(context_reader, row["expert_ids"]) == a  # the teacher knows it
        assert greedy_first_token(context_reader, row["prompt_ids"]) == UNKNOWN  # the base does not
    config = TrainConfig(
        model="tiny",
        out=str(tmp_path / "run"),
        method="opsd",
        corpus=str(corpus),
        epochs=10,
        batch_size=4,
        lr=1e-2,
        opsd_top_k=8,
        opsd_max_new_tokens=3,
        save_every=-1,
        progress=False,
    )
    assert config.opsd_rollouts == 8 and config.opsd_divergence == "forward"  # the paper's settings
    summary = train(config, model=copy.deepcopy(context_reader), tokenizer=tokenizer)
    assert summary["global_steps"] == 10
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    assert [greedy_first_token(trained, row["prompt_ids"]) for row in examples] == [a for _, a in facts]

    rows = [json.loads(line) for line in (tmp_path / "run" / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(11))  # before training, then one row per epoch
    first, last = rows[1], rows[-1]
    assert rows[0]["student_gold_logprob"] < math.log(0.01) < last["student_gold_logprob"]
    assert rows[0]["teacher_gold_logprob"] > math.log(0.9)  # the teacher reads the answer
    assert first["rollouts"] == 4 * 8 and first["answer_in_rollouts"] < 0.2 < 0.8 < last["answer_in_rollouts"]
    assert first["teacher_answer_start_p"] > 0.9 and first["student_answer_start_p"] < 0.1
    assert last["student_answer_start_p"] > 0.5
    assert last["kl_per_token"] < first["kl_per_token"]
    assert last["facts_with_answer_rollout"] == 4 and 0 < first["rollout_tokens"] <= 3
