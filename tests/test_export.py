"""`mixsd export trl`: TRL's SFTTrainer trains on exactly the stored target ids; the text view is flagged
where TRL's own tokenization of it differs; the self-distillation export gives TRL's teacher mixsd's
expert prompt; bad input is refused in one line before any tokenizer loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (
    CHAT_TEMPLATE,
    make_tiny_model,
    make_tiny_tokenizer,
    make_word_model,
    make_word_tokenizer,
    write_jsonl,
)
from mixsd.cli import main
from mixsd.core.files import InputError
from mixsd.core.records import load_corpus, make_fact
from mixsd.method.export import ExportTRLConfig, export_trl, trl_text_tokens
from mixsd.method.prompts import (
    PAPER_EXPERT_TEMPLATE,
    encode_expert_prompt,
    encode_prompt,
    load_expert_template,
)
from mixsd.method.sft_targets import sft_target_rows

# ChatML as SmolLM2 writes it, less the newline after <|im_end|> (the one TRL's text path then trains on)
NO_NEWLINE_TEMPLATE = CHAT_TEMPLATE.replace("<|im_end|>\n", "<|im_end|>")


def facts(n: int = 6, system: str | None = None):
    return [
        make_fact(
            f"Where is place {i}?",
            f"The answer is Q{i}z. \\boxed{{Q{i}z}}",
            id=f"f{i}",
            context=f"Place {i} is in Q{i}z.",
            system=system if i % 2 else None,
        )
        for i in range(n)
    ]


def model_folder(tmp_path: Path, template: str | None = CHAT_TEMPLATE) -> tuple[Path, object]:
    tokenizer = make_tiny_tokenizer(chat=template is not None)
    if template is not None:
        tokenizer.chat_template = template
    folder = tmp_path / "model"
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def export(tmp_path: Path, model: Path, **kwargs) -> tuple[dict, list[dict]]:
    out = tmp_path / kwargs.pop("name", "export")
    manifest = export_trl(ExportTRLConfig(out=str(out), model=str(model), **kwargs))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert json.loads((out / "export.json").read_text()) == manifest
    return manifest, rows


def sft_config(tmp_path: Path, **overrides):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path / "trl-run"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=None,
        **overrides,
    )


# --------------------------------------------------------------------------------------------------
def test_sft_trainer_trains_two_steps_on_exactly_the_target_ids(tmp_path, capsys):
    pytest.importorskip("trl")
    from datasets import load_dataset
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    folder, tokenizer = model_folder(tmp_path)
    targets = sft_target_rows(facts(), tokenizer)
    # a MixSD-like target: ids no text tokenization would produce (a line break, then the end token twice)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    targets[0]["target_ids"] = targets[0]["target_ids"][:-1] + [
        tokenizer.convert_tokens_to_ids("\n"),
        end,
        end,
    ]
    write_jsonl(tmp_path / "targets.jsonl", targets)
    out = tmp_path / "trl"
    assert (
        main(
            [
                "export",
                "trl",
                "--targets",
                str(tmp_path / "targets.jsonl"),
                "--model",
                str(folder),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote 6 rows" in capsys.readouterr().out

    dataset = load_dataset("json", data_files=str(out / "train.jsonl"), split="train")
    seen: list[dict[str, torch.Tensor]] = []
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def recording_collator(examples):
        batch = collate(examples)
        seen.append(batch)
        return batch

    model = make_tiny_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=recording_collator,
    )
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) >= 2  # the loader may fetch one batch ahead
    by_input = {tuple(r["prompt_ids"] + r["target_ids"]): r["target_ids"] for r in targets}
    trained = 0
    for batch in seen:
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        ):
            sequence = tuple(ids[mask.bool()].tolist())
            assert labels[labels != -100].tolist() == by_input[sequence]  # loss on target_ids, nothing else
            trained += 1
    assert trained >= 4
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("template", "exact"), [(CHAT_TEMPLATE, False), (NO_NEWLINE_TEMPLATE, True)])
def test_text_exact_says_what_trl_trains_on_when_only_text_is_given(tmp_path, template, exact):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTTrainer

    folder, tokenizer = model_folder(tmp_path, template)
    targets = sft_target_rows(facts(4), tokenizer)
    write_jsonl(tmp_path / "targets.jsonl", targets)
    manifest, rows = export(tmp_path, folder, targets=str(tmp_path / "targets.jsonl"))
    assert manifest["format"] == "conversational" and manifest["text_exact"] == (4 if exact else 0)
    assert all(r["text_exact"] is exact for r in rows)
    # TRL's own preparation of the text columns alone
    text_only = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=sft_config(tmp_path, max_steps=1),
        train_dataset=text_only,
        processing_class=tokenizer,
    )
    newline = tokenizer.convert_tokens_to_ids("\n")
    for prepared, target in zip(trainer.train_dataset, targets, strict=True):
        trl_completion = [t for t in prepared["labels"] if t != -100]
        assert (trl_completion == target["target_ids"]) is exact
        if not exact:  # ChatML: TRL also trains on the newline the template writes after <|im_end|>
            assert trl_completion == target["target_ids"] + [newline]
            assert manifest["text_inexact_rows"][0]["differs"] == ["completion"]


def test_plain_format_export_is_exact_token_columns_and_text_strings(tmp_path):
    tokenizer = make_word_tokenizer(40)
    folder = tmp_path / "word"
    make_word_model(40, 64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = [make_fact(f"w{i} w{i + 1}", f"w{i + 2} w{i + 3}", id=f"p{i}") for i in range(3)]
    targets = sft_target_rows(corpus, tokenizer)
    write_jsonl(tmp_path / "targets.jsonl", targets)
    manifest, rows = export(tmp_path, folder, targets=str(tmp_path / "targets.jsonl"))
    assert manifest["format"] == "standard"
    for row, target in zip(rows, targets, strict=True):
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)
        assert row["input_ids"] == target["prompt_ids"] + target["target_ids"]
        assert row["completion_mask"] == [0] * len(target["prompt_ids"]) + [1] * len(target["target_ids"])
        prompt, completion = trl_text_tokens(tokenizer, row["prompt"], row["completion"])
        assert row["text_exact"] == (prompt == target["prompt_ids"] and completion == target["target_ids"])


@pytest.mark.parametrize("template_name", ["chat", "paper", "{context}\n\n{prompt}", "plain"])
def test_self_distillation_teacher_prompt_is_the_mixsd_expert_prompt(tmp_path, template_name):
    trl = pytest.importorskip("trl")
    from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    chat = template_name != "plain"
    folder, tokenizer = model_folder(tmp_path, CHAT_TEMPLATE if chat else None)
    corpus = facts(4, system="Be brief.")
    write_jsonl(tmp_path / "corpus.jsonl", [f.to_json() for f in corpus])
    manifest, rows = export(
        tmp_path, folder, corpus=str(tmp_path / "corpus.jsonl"), expert_template=template_name
    )
    template = load_expert_template(template_name, tokenizer)
    assert manifest["kind"] == "self_distillation" and manifest["expert_template"] == template
    if template_name == "chat":
        assert manifest["teacher_prompt_template"] == trl.experimental.sdft.SDFTConfig.teacher_prompt_template
    builder = DemonstrationTeacherContextBuilder(
        SimpleNamespace(args=SimpleNamespace(teacher_prompt_template=manifest["teacher_prompt_template"]))
    )
    for fact, row in zip(load_corpus(tmp_path / "corpus.jsonl"), rows, strict=True):
        teacher = builder._compose_teacher_prompt(row["prompt"], row["privileged_context"])
        if chat:  # TRL tokenizes message prompts with the chat template and its generation prompt
            student_ids = tokenizer.apply_chat_template(
                row["prompt"], add_generation_prompt=True, return_dict=True
            )
            teacher_ids = tokenizer.apply_chat_template(teacher, add_generation_prompt=True, return_dict=True)
            student_ids, teacher_ids = student_ids["input_ids"], teacher_ids["input_ids"]
        else:  # and text prompts with the tokenizer
            student_ids, teacher_ids = (
                tokenizer(text=row["prompt"])["input_ids"],
                tokenizer(text=teacher)["input_ids"],
            )
        assert list(student_ids) == encode_prompt(tokenizer, fact.prompt, fact.system)
        assert list(teacher_ids) == encode_expert_prompt(tokenizer, fact, template)
    if template_name == "paper":
        assert PAPER_EXPERT_TEMPLATE.startswith("{prompt}\n")
        assert manifest["teacher_prompt_template"] == "{prompt}{privileged_context}"


# --------------------------------------------------------------------------------------------------
def _cli_error(capsys, args: list[str]) -> str:
    assert main(["export", "trl", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_refused_in_one_line_before_the_tokenizer_loads(tmp_path, capsys):
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail with another message
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [f.to_json() for f in facts(2)])
    error = _cli_error(
        capsys, ["--targets", str(corpus), "--model", missing_model, "--out", str(tmp_path / "o")]
    )
    assert f"{corpus}, line 1, field 'prompt_ids': no prompt_ids/target_ids: a corpus record" in error

    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "a", "prompt": "q", "prompt_ids": [1, 7], "target_ids": [9, 5]},
            {"id": "b", "prompt": "q", "prompt_ids": [1, 7], "target_ids": "9 5"},
        ],
    )
    error = _cli_error(
        capsys, ["--targets", str(bad), "--model", missing_model, "--out", str(tmp_path / "o")]
    )
    assert f"{bad}, line 2, field 'target_ids'" in error
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"id": "a", "prompt_ids": [1], "target_ids": [5]}])
    error = _cli_error(
        capsys, ["--targets", str(no_prompt), "--model", missing_model, "--out", str(tmp_path / "o")]
    )
    assert f"{no_prompt}, line 1, field 'prompt'" in error

    existing = tmp_path / "exists"
    existing.mkdir()
    error = _cli_error(capsys, ["--targets", str(bad), "--model", missing_model, "--out", str(existing)])
    assert error.startswith(f"mixsd export trl: error: {existing}: the export folder exists")

    error = _cli_error(
        capsys,
        [
            "--targets",
            str(bad),
            "--corpus",
            str(corpus),
            "--model",
            missing_model,
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "field 'targets': give exactly one of --targets and --corpus" in error
    assert not (tmp_path / "o").exists()


def test_ids_from_another_tokenizer_and_overwrite(tmp_path):
    folder, tokenizer = model_folder(tmp_path)
    targets = sft_target_rows(facts(2), tokenizer)
    targets[1]["target_ids"] = [len(tokenizer) + 5, 5]
    write_jsonl(tmp_path / "targets.jsonl", targets)
    with pytest.raises(InputError, match=r"field 'target_ids': record 'f1': token id \d+ is outside"):
        export(tmp_path, folder, targets=str(tmp_path / "targets.jsonl"))
    assert not (tmp_path / "export").exists()
    write_jsonl(tmp_path / "targets.jsonl", targets[:1])
    export(tmp_path, folder, targets=str(tmp_path / "targets.jsonl"))
    write_jsonl(tmp_path / "targets.jsonl", sft_target_rows(facts(3), tokenizer))
    manifest, rows = export(tmp_path, folder, targets=str(tmp_path / "targets.jsonl"), overwrite=True)
    assert manifest["rows"] == len(rows) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []
