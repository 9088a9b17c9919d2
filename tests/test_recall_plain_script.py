"""scripts/recall_plain_transformers.py: its hand-built prompt and stop rule are mixsd's, and it runs on a
saved folder with plain transformers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.method.prompts import answer_end, encode_prompt

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recall_plain_transformers.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("recall_plain_transformers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_prompt_is_mixsd_encode_prompt(script, chat, system):
    tokenizer = make_tiny_tokenizer(chat=chat)
    question = "In which city does Vedux Vudratrox live?"
    ids = script.prompt_ids(tokenizer, question, system)
    assert ids == encode_prompt(tokenizer, question, system)
    if not chat:  # the plain format: BOS, then "Question: ...\nAnswer:"
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids[1:]).endswith(f"Question: {question}\nAnswer:")


@pytest.mark.parametrize(
    "text",
    [
        " Paris.\n\nQuestion: next",
        "\n\n Paris\nQuestion: x",  # blank lines before the answer begins do not end it
        " Paris\nAnswer: Paris",
        " Paris\nand more",  # a single line break does not end it
        " Paris",
        "   ",
        "",
    ],
)
def test_stop_rule_is_mixsd_plain_rule(script, text):
    end = answer_end(make_tiny_tokenizer(chat=False))
    assert script.answer_length(text, plain=True) == end.answer_length(text)
    assert script.answer_length(text, plain=False) is None


def test_runs_on_saved_folder_and_cuts_answers(script, tmp_path, capsys):
    tokenizer = make_tiny_tokenizer(chat=False)
    model = make_tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = [{"id": f"f{i}", "prompt": f"Where is place {i}?", "answer": f"Q{i}z"} for i in range(3)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "predictions.jsonl"

    code = script.main(
        ["--model", str(folder), "--corpus", str(corpus), "--max-new-tokens", "12", "--out", str(out)]
    )

    assert code == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["f0", "f1", "f2"]
    for p in predictions:
        assert p["finish"] in {"stop_text", "eos", "length"}
        assert p["new_tokens"] <= 12
        assert script.answer_length(p["output"], plain=True) is None  # nothing left past the answer's end
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert summary["records"] == 3 and summary["format"] == "plain"
    assert summary["correct"] == sum(p["correct"] for p in predictions)
    assert sum(summary["finish"].values()) == 3
