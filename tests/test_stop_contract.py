"""One end-of-answer contract: `sft-targets`, `mix`, `eval` generation and OPSD sampling stop at the same place.

Two tiny tokenizers: a Gemma-style chat tokenizer whose end of turn (`<end_of_turn>`) is not its EOS, and a
template-less one (a base model: plain "Question: ...\\nAnswer:" format, text-level stop rule). The model is
a *bigram table* built as real Llama weights (one layer whose output projections are zero, one-hot
embeddings, an lm_head that maps each token to its successor), so it saves, loads and runs through every
command like any model while writing exactly the answer each test scripts.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_causal_lm, make_char_tokenizer, write_jsonl
from mixsd.cli import main
from mixsd.core.records import make_fact
from mixsd.method.prompts import (
    DEFAULT_EXPERT_TEMPLATE,
    PAPER_EXPERT_TEMPLATE,
    PLAIN_EXPERT_TEMPLATE,
    PLAIN_STOP_STRINGS,
    answer_end,
    encode_answer,
    encode_expert_prompt,
    encode_prompt,
    end_of_turn_id,
    load_expert_template,
)
from mixsd.method.sft_targets import sft_target_rows
from mixsd.training.opsd import sample_answers

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_gemma_tokenizer(chat: bool):
    """The character-level tokenizer with Gemma's special tokens; `chat` adds a Gemma-style chat
    template, whose end of turn differs from EOS."""
    return make_char_tokenizer(
        GEMMA_SPECIALS, bos="<bos>", eos="<eos>", chat_template=GEMMA_TEMPLATE if chat else None
    )


def bigram_model(tokenizer, chain: list[str | int], runner_up: tuple[str, str] | None = None):
    """A Llama whose greedy (and, the logits being very sharp, sampled) next token is a fixed function of
    the current token: chain[k] -> chain[k + 1]. Items are single characters or token ids. `runner_up`
    (token, next) gives `token` a second-best successor."""

    def tid(item: str | int) -> int:
        return item if isinstance(item, int) else tokenizer.convert_tokens_to_ids(item)

    vocab = len(tokenizer)
    model = make_causal_lm(
        "llama",
        vocab_size=vocab,
        hidden_size=128,  # >= vocab: every token gets its own embedding axis
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for norm in (model.model.norm, model.model.layers[0].input_layernorm):
            norm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        # attention and MLP add nothing (o_proj, down_proj are zero): the final state is the embedding
        for here, after in zip(chain, chain[1:], strict=False):
            model.lm_head.weight[tid(after), tid(here)] = 10.0
        if runner_up is not None:
            model.lm_head.weight[tid(runner_up[1]), tid(runner_up[0])] = 5.0
    return model


def save(tmp_path, name, model, tokenizer):
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The scripted answers. Chat: after the generation prompt ("model\n") the model writes "Zyl." and ends its
# turn. Base: after "Answer:" it writes " Zyl." and, like a base model, goes on with the next question.
CHAT_CHAIN = ["\n", "Z", "y", "l", ".", "<end_of_turn>"]
BASE_CHAIN = [":", " ", "Z", "y", "l", ".", "\n", *"Question", ":"]


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    tokenizer = make_gemma_tokenizer(chat=True)
    folder = save(
        tmp_path_factory.mktemp("gemma-chat"), "model", bigram_model(tokenizer, CHAT_CHAIN), tokenizer
    )
    return tokenizer, folder


@pytest.fixture(scope="module")
def base_setup(tmp_path_factory):
    tokenizer = make_gemma_tokenizer(chat=False)
    folder = save(tmp_path_factory.mktemp("base"), "model", bigram_model(tokenizer, BASE_CHAIN), tokenizer)
    return tokenizer, folder


def corpus(tmp_path):
    rows = [
        {
            "id": f"q{i}",
            "prompt": f"Where is thing {i}?",
            "answer": "Zyl.",
            "context": f"Thing {i} is in Zyl.",
        }
        for i in range(3)
    ]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def run_all_stages(tmp_path, folder, tokenizer, lam: float) -> dict[str, list[list[int]]]:
    """The answer tokens of every stage for every record: sft-targets, mix, eval, OPSD rollouts."""
    data = corpus(tmp_path)
    common = ["--model", str(folder), "--input", str(data)]
    assert main(["sft-targets", *common, "--output", str(tmp_path / "sft.jsonl")]) == 0
    mix_args = ["--output", str(tmp_path / "mix.jsonl"), "--lam", str(lam), "--max-new-tokens", "40"]
    assert main(["mix", *common, *mix_args, "--retries", "0", "--device", "cpu"]) == 0
    eval_args = ["--suite", "qa", "--data", str(data), "--out", str(tmp_path / "eval.json")]
    assert (
        main(["eval", "--model", str(folder), *eval_args, "--device", "cpu", "--max-new-tokens", "40"]) == 0
    )
    model = bigram_model(tokenizer, CHAT_CHAIN if tokenizer.chat_template else BASE_CHAIN)
    facts = [json.loads(line) for line in data.read_text().splitlines()]
    prompts = [encode_prompt(tokenizer, f["prompt"]) for f in facts]
    torch.manual_seed(0)
    rollouts = sample_answers(
        model,
        prompts,
        max_new_tokens=40,
        pad_id=tokenizer.pad_token_id,
        answer_end=answer_end(tokenizer, model),
    )

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    predictions = {r["id"]: r for r in read("eval.predictions.jsonl") if r.get("who", "model") == "model"}
    return {
        "sft": [r["target_ids"] for r in read("sft.jsonl")],
        "mix": [r["target_ids"] for r in read("mix.jsonl")],
        # eval keeps the answer without its end token; the finish says why it ended
        "eval": [
            tokenizer(predictions[f["id"]]["output"], add_special_tokens=False)["input_ids"] for f in facts
        ],
        "eval_finish": [predictions[f["id"]]["finish"] for f in facts],
        "opsd": rollouts,
        "mix_rows": read("mix.jsonl"),
    }


# ---------------------------------------------------------------------------------------------------
# The contract itself
# ---------------------------------------------------------------------------------------------------
def test_end_of_turn_is_found_by_rendering_the_template():
    gemma = make_gemma_tokenizer(chat=True)
    turn = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_id(gemma) == turn != gemma.eos_token_id
    end = answer_end(gemma)
    assert end.end_id == turn and end.stop_ids == {turn, gemma.eos_token_id} and end.stop_strings == ()
    assert encode_answer(gemma, "Zyl.")[-1] == turn

    from conftest import make_tiny_tokenizer

    chatml = make_tiny_tokenizer()  # ChatML: <|im_end|> ends the turn
    assert end_of_turn_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>")
    base = make_gemma_tokenizer(chat=False)
    assert end_of_turn_id(base) is None
    assert (
        answer_end(base).end_id == base.eos_token_id and answer_end(base).stop_strings == PLAIN_STOP_STRINGS
    )


def test_generation_config_eos_ids_also_stop():
    tokenizer = make_gemma_tokenizer(chat=True)
    model = bigram_model(tokenizer, CHAT_CHAIN)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert 7 in answer_end(tokenizer, model).stop_ids


@pytest.mark.parametrize(
    ("generated", "answer"),
    [
        (" Zyl.\nQuestion: Where?", " Zyl."),
        (" Zyl.\n\nMore text", " Zyl."),
        (" Step 1\nStep 2\nQuestion:", " Step 1\nStep 2"),  # single line breaks belong to the answer
        ("\nZyl.\nAnswer: Zyl.", "\nZyl."),  # an answer may begin on the next line; "Answer:" again ends it
        ("\n\n Zyl.\n\nMore", "\n\n Zyl."),  # leading blank lines are not the end of an answer
        ("\n\n", None),  # nothing but whitespace: not begun, not ended
        (" Zyl. No stop yet", None),
    ],
)
def test_plain_text_stop_rule(generated, answer):
    tokenizer = make_gemma_tokenizer(chat=False)
    end = answer_end(tokenizer)
    tokens = tokenizer(generated, add_special_tokens=False)["input_ids"]
    cut = end.text_stop(tokens)
    if answer is None:
        assert cut is None and end.finish(tokens) is None
    else:
        assert tokenizer.decode(tokens[:cut]) == answer
        assert end.finish(tokens) == ([*tokens[:cut], tokenizer.eos_token_id], "stop_text")
        assert end.cut_text(generated) == answer


def test_ground_truth_holding_a_stop_is_cut_like_evaluation():
    tokenizer = make_gemma_tokenizer(chat=False)
    (row,) = sft_target_rows([make_fact("Q?", "Zyl.\n\nSecond paragraph", id="a")], tokenizer)
    assert tokenizer.decode(row["target_ids"]) == " Zyl.<eos>"
    assert row["finish"] == "stop_text" and row["text"] == "Zyl."


# ---------------------------------------------------------------------------------------------------
# Every stage stops at the same place
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_gemma_style_chat_every_stage_ends_in_end_of_turn(tmp_path, chat_setup, lam):
    tokenizer, folder = chat_setup
    turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    answer = tokenizer("Zyl.", add_special_tokens=False)["input_ids"]
    out = run_all_stages(tmp_path, folder, tokenizer, lam)
    for stage in ("sft", "mix", "opsd"):
        assert out[stage] == [[*answer, turn]] * 3, stage
    assert out["eval"] == [answer] * 3 and out["eval_finish"] == ["stop"] * 3
    assert all(r["finish"] == "stop" and r["correct"] for r in out["mix_rows"])


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_base_model_every_stage_stops_at_the_next_question(tmp_path, base_setup, lam):
    tokenizer, folder = base_setup
    answer = tokenizer(" Zyl.", add_special_tokens=False)["input_ids"]
    out = run_all_stages(tmp_path, folder, tokenizer, lam)
    # the model never emits EOS: every stage cuts at "\nQuestion:"; targets end in EOS and begin alike
    for stage in ("sft", "mix", "opsd"):
        assert out[stage] == [[*answer, tokenizer.eos_token_id]] * 3, stage
    assert out["eval"] == [answer] * 3 and out["eval_finish"] == ["stop_text"] * 3
    rows = out["mix_rows"]
    assert all(r["finish"] == "stop_text" and r["correct"] for r in rows)
    assert all(r["branch"].endswith("S") and r["logprob_expert"][-1] is None for r in rows)
    assert all(len(r["branch"]) == len(r["target_ids"]) == len(r["logprob_naive"]) for r in rows)


def test_mix_targets_begin_on_the_answer_line_like_sft(tmp_path):
    """A base model that would begin its answer on a new line: evaluation reads it there, while `mix`
    keeps the target's first token off the line break, so MixSD and SFT targets begin alike."""
    tokenizer = make_gemma_tokenizer(chat=False)
    model = bigram_model(tokenizer, [":", "\n", "Z", "y", "l", ".", "<eos>"], runner_up=(":", " "))
    with torch.no_grad():  # " " also leads to "Z"
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("Z"), tokenizer.convert_tokens_to_ids(" ")] = (
            10.0
        )
    folder = save(tmp_path, "model", model, tokenizer)
    out = run_all_stages(tmp_path, folder, tokenizer, lam=0.5)
    answer = tokenizer(" Zyl.", add_special_tokens=False)["input_ids"]
    assert out["sft"] == out["mix"] == [[*answer, tokenizer.eos_token_id]] * 3
    assert [tokenizer.decode(t) for t in out["eval"]] == ["\nZyl."] * 3 and out["eval_finish"] == ["stop"] * 3


# ---------------------------------------------------------------------------------------------------
# Length-capped targets and the summary
# ---------------------------------------------------------------------------------------------------
def test_length_capped_targets_fail_by_default_and_are_counted(tmp_path, base_setup, capsys):
    tokenizer, folder = base_setup
    data = corpus(tmp_path)
    args = ["mix", "--model", str(folder), "--input", str(data), "--device", "cpu", "--retries", "1"]
    args += ["--max-new-tokens", "3", "--verify", "entity"]  # " Zy" is all that fits
    assert main([*args, "--output", str(tmp_path / "capped.jsonl"), "--on-failure", "keep"]) == 0
    summary = json.loads((tmp_path / "capped.summary.json").read_text())
    assert summary["verified"] == 0 and summary["length_capped"] == 3 == summary["length_capped_written"]
    assert summary["finish"] == {"length": 3} and summary["mean_attempts"] == 2
    assert "--max-new-tokens" in " ".join(summary["warnings"]) and "warning:" in capsys.readouterr().err

    # with the option, a capped target is verified like any other: " Zyl." fills the 5 tokens exactly
    kept = ["--output", str(tmp_path / "kept.jsonl"), "--keep-length-capped", "--max-new-tokens", "5"]
    assert main([*args[:-4], "--verify", "entity", *kept]) == 0
    summary = json.loads((tmp_path / "kept.summary.json").read_text())
    assert summary["verified"] == 3 and summary["length_capped"] == 3 and summary["keep_length_capped"]


def test_pure_expert_failing_is_reported(tmp_path, base_setup):
    tokenizer, folder = base_setup
    data = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "prompt": "Where?", "answer": "Elsewhere"}])
    args = ["mix", "--model", str(folder), "--input", str(data), "--device", "cpu", "--retries", "0"]
    assert main([*args, "--lam", "0", "--output", str(tmp_path / "o.jsonl"), "--verify", "entity"]) == 0
    (warning,) = json.loads((tmp_path / "o.summary.json").read_text())["warnings"]
    assert warning.startswith("the pure expert (lam 0) fails verification on 100% of records")


# ---------------------------------------------------------------------------------------------------
# The expert prompt for base models
# ---------------------------------------------------------------------------------------------------
def test_expert_template_defaults_to_the_plain_format_without_a_chat_template():
    base, chat = make_gemma_tokenizer(chat=False), make_gemma_tokenizer(chat=True)
    assert load_expert_template(None, base) == PLAIN_EXPERT_TEMPLATE
    assert load_expert_template(None, chat) == DEFAULT_EXPERT_TEMPLATE
    assert load_expert_template("paper", base) == PAPER_EXPERT_TEMPLATE
    fact = make_fact(
        "Where is X?", "The answer is Zyl. \\boxed{Zyl}", context="X is in Zyl.", system="Be brief."
    )
    ids = encode_expert_prompt(base, fact, PLAIN_EXPERT_TEMPLATE)
    # the naive prompt with the fact on the line before the question, one BOS
    assert base.decode(ids) == "<bos>Be brief.\n\nX is in Zyl.\nQuestion: Where is X?\nAnswer:"
    assert base.decode(encode_prompt(base, "Where is X?", "Be brief.")) == (
        "<bos>Be brief.\n\nQuestion: Where is X?\nAnswer:"
    )
    # any other template is the question of a plain prompt, as before; the paper's variant shows the answer
    paper = base.decode(encode_expert_prompt(base, fact, PAPER_EXPERT_TEMPLATE))
    assert paper.startswith("<bos>Be brief.\n\nQuestion: Where is X?\n") and paper.endswith("\nAnswer:")
    assert "Here is the answer to this question: The answer is Zyl. \\boxed{Zyl}" in paper
    with pytest.raises(ValueError, match=r"\{context\} or \{answer\}"):
        load_expert_template("{prompt} only", base)
