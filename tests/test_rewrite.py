"""The self-rewrite baseline (SDFT): greedy λ=0 decoding of the rewrite prompt, verification, the phrase
filter, the ground-truth fallback, and bad options refused before any model loads."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import write_jsonl
from mixsd.cli import main
from mixsd.core.files import InputError, read_jsonl
from mixsd.core.records import load_corpus
from mixsd.method.prompts import REWRITE_EXPERT_TEMPLATE, encode_answer, encode_expert_prompt, encode_prompt
from mixsd.method.rewrite import RewriteConfig, rewrite
from mixsd.method.targets import summary_path


def rows_of(path) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


STOP = 5  # <|im_end|> of the tiny tokenizer: its chat template's end of turn and its EOS


def run_rewrite(model_dir, corpus, out, **overrides):
    config = RewriteConfig(
        model=str(model_dir), input=str(corpus), output=str(out), max_new_tokens=12, batch_size=5, **overrides
    )
    return rewrite(config, progress=False)


def greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=STOP,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_a_rewrite_is_greedy_decoding_of_the_rewrite_prompt(
    tmp_path, tiny_model, tiny_tokenizer, tiny_model_dir, tiny_corpus
):
    out = tmp_path / "rewrite.jsonl"
    summary = run_rewrite(tiny_model_dir, tiny_corpus, out, verify="none", reject_phrases="")
    rows = rows_of(out)
    facts = {fact.id: fact for fact in load_corpus(tiny_corpus)}
    assert len(rows) == 12 and summary["verified"] == 12 and summary["fallback"] == 0
    for row in rows:
        fact = facts[row["id"]]
        # the model reads the question and the reference answer, and is trained on the naive prompt
        assert row["expert_prompt_ids"] == encode_expert_prompt(tiny_tokenizer, fact, REWRITE_EXPERT_TEMPLATE)
        expert_text = tiny_tokenizer.decode(row["expert_prompt_ids"])
        assert fact.answer in expert_text and "Reference answer:" in expert_text
        assert row["prompt_ids"] == encode_prompt(tiny_tokenizer, fact.prompt)
        assert row["target_ids"] == greedy(tiny_model, row["expert_prompt_ids"], 12)
        assert set(row["branch"]) == {"E"} and row["attempts"] == 1 and row["correct"]
    assert summary["settings"]["lam"] == 0.0 and summary["settings"]["temperature"] == 0.0
    assert summary["settings"]["retries"] == 0 and summary["config"]["expert_template"] == "rewrite"


def test_a_rewrite_that_fails_verification_falls_back_to_the_ground_truth(
    tmp_path, tiny_tokenizer, tiny_model_dir, tiny_corpus, capsys
):
    out = tmp_path / "rewrite.jsonl"
    # the corpus's checks ("Q3z") are words a random model does not write: every rewrite fails (entity)
    argv = ["rewrite", "--model", str(tiny_model_dir), "--input", str(tiny_corpus), "--output", str(out)]
    assert main([*argv, "--max-new-tokens", "12", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "rewrites verified 0 (0.0%, entity)  ground-truth fallback 12" in printed
    summary = json.loads(summary_path(out).read_text())
    assert summary["verified"] == 0 and summary["fallback"] == 12 and summary["written"] == 12
    for row in rows_of(out):
        assert row["source"] == "answer_fallback" and not row["correct"]
        assert row["target_ids"] == encode_answer(tiny_tokenizer, row["answer"])
        assert set(row["branch"]) == {"G"}


def test_a_rewrite_holding_a_rejected_phrase_falls_back(tmp_path, tiny_model_dir):
    # varied random answers, so that the tiny random model's rewrites differ from record to record
    draw = random.Random(0)
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {
                "id": f"r{i}",
                "prompt": "".join(draw.choices("abcdefghijklmnop ", k=30)) + "?",
                "answer": "".join(draw.choices("qrstuvwxyz0123456789 ", k=30)),
            }
            for i in range(12)
        ],
    )
    run_rewrite(tiny_model_dir, corpus, tmp_path / "free.jsonl", verify="none", reject_phrases="")
    free = {row["id"]: row for row in rows_of(tmp_path / "free.jsonl")}
    # a phrase from one rewrite's text (no comma: commas separate phrases) that another rewrite lacks
    texts = [row["text"].lower() for row in free.values()]
    phrase = next(
        texts[0][i : i + 3]
        for i in range(len(texts[0]) - 2)
        if "," not in texts[0][i : i + 3]
        and texts[0][i : i + 3].strip() == texts[0][i : i + 3]
        and any(texts[0][i : i + 3] not in other for other in texts[1:])
    )
    filtered = tmp_path / "filtered.jsonl"
    summary = run_rewrite(
        tiny_model_dir, corpus, filtered, verify="none", reject_phrases=f"{phrase.upper()}, "
    )
    holding = {key for key, row in free.items() if phrase in row["text"].lower()}
    assert 0 < len(holding) < len(free)
    assert summary["phrase_rejections_this_run"] == len(holding) and summary["fallback"] == len(holding)
    assert summary["settings"]["reject_phrases"] == [phrase]
    for row in rows_of(filtered):
        if row["id"] in holding:
            assert row["source"] == "answer_fallback"
        else:
            assert row["target_ids"] == free[row["id"]]["target_ids"] and row["correct"]


def test_bad_options_and_input_are_refused_before_any_model_loads(tmp_path, tiny_corpus):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InputError, match=r"field 'output'"):
        RewriteConfig(model=missing, input=str(tiny_corpus), output=str(tiny_corpus))
    with pytest.raises(InputError, match=r"field 'expert_template'.*\{answer\}"):
        RewriteConfig(model=missing, input="a", output="b", expert_template="{prompt} uses {context}")
    with pytest.raises(InputError, match=r"field 'expert_template'.*\{prompt\}"):
        RewriteConfig(model=missing, input="a", output="b", expert_template="only {answer}")
    with pytest.raises(InputError, match=r"field 'max_new_tokens'"):
        RewriteConfig(model=missing, input="a", output="b", max_new_tokens=0)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"id": "a", "prompt": "Q?", "answer": "A"}, {"id": "b", "prompt": "Q2?"}]
    )
    with pytest.raises(InputError, match=r"bad.jsonl, line 2, field 'answer'"):
        rewrite(
            RewriteConfig(model=missing, input=str(bad), output=str(tmp_path / "out.jsonl")), progress=False
        )
