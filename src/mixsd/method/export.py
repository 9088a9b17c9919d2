"""`mixsd export trl`: mixsd's targets and corpora as the datasets TRL's trainers read.

Two exports, one folder each (`OUT/train.jsonl` and `OUT/export.json`, see docs/formats.md "TRL export"):

- from a target file (`--targets`, written by `mixsd mix` or `mixsd sft-targets`): the prompt-completion
  dataset of TRL's `SFTTrainer`. Every row holds the *text* view (`prompt`, `completion`: chat messages
  with a chat template, plain strings without) and the *token* view (`input_ids` = prompt_ids +
  target_ids, `completion_mask`). TRL treats a dataset with an `input_ids` column as already tokenized
  and trains on those ids as they are, so the trained tokens are exactly the stored `target_ids`. TRL
  re-tokenizes the text view only when the token columns are dropped; that is not always token-exact
  (ChatML templates write a newline after `<|im_end|>` that TRL then trains on; text can tokenize into
  other merges than the sampled ids), so each row says whether it is (`text_exact`), by the same
  tokenization TRL's SFTTrainer does.
- from a corpus (`--corpus`): the `prompt` + `privileged_context` records of TRL's self-distillation
  trainers (SDFT, SDPO). `export.json` names the `teacher_prompt_template` under which TRL's teacher
  prompt is, character for character, mixsd's expert prompt (`--expert-template`).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixsd.core.files import (
    InputError,
    atomic_write_json,
    atomic_write_jsonl,
    output_lock,
    read_jsonl,
    sha256_file,
)
from mixsd.core.records import Fact, load_corpus, load_targets
from mixsd.method.prompts import (
    answer_end,
    encode_expert_prompt,
    encode_prompt,
    expert_message,
    has_chat_template,
    load_expert_template,
)

# TRL's SFTTrainer reads these two columns as a pre-tokenized dataset (its docs: "pre-tokenized datasets,
# recognized by a required `input_ids` column ... labels are built from `completion_mask`").
TOKEN_COLUMNS = ("input_ids", "completion_mask")
# The teacher prompt templates TRL's self-distillation trainers format with `prompt` and
# `privileged_context`, in the order they are tried; the first is SDFTConfig's default.
TEACHER_TEMPLATES = (
    "{prompt}\n\n{privileged_context}",
    "{prompt}{privileged_context}",
    "{privileged_context}{prompt}",
    "{privileged_context}",
)
_LISTED = 50  # inexact rows listed by id in export.json


@dataclass
class ExportTRLConfig:
    out: str = field(
        metadata={"help": "Folder to write (train.jsonl and export.json); must not exist unless --overwrite."}
    )
    model: str = field(
        metadata={
            "help": "The model whose tokenizer made the targets (alias, folder, .gguf, hub id): only its "
            "tokenizer is loaded, to write the text view and check it against the stored ids."
        }
    )
    targets: str | None = field(
        default=None,
        metadata={"help": "Target file (mixsd mix / sft-targets): export for TRL's SFTTrainer."},
    )
    corpus: str | None = field(
        default=None,
        metadata={
            "help": "Corpus file: export prompt + privileged_context for TRL's self-distillation trainers."
        },
    )
    expert_template: str | None = field(
        default=None,
        metadata={
            "help": "With --corpus: the expert prompt the teacher reads (chat, plain, paper, a template or "
            "a file), as in `mixsd mix`; default: chat with a chat template, plain without."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out folder."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow tokenizer code from the model folder."}
    )

    def __post_init__(self) -> None:
        if (self.targets is None) == (self.corpus is None):
            raise InputError("give exactly one of --targets and --corpus", field="targets")
        if self.expert_template is not None and self.targets is not None:
            raise InputError("applies to --corpus exports only", field="expert_template")


# --------------------------------------------------------------------------------------------------
# Reading the inputs (all checks before the tokenizer loads)
# --------------------------------------------------------------------------------------------------
def read_targets(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A mixsd target file, refused with file, line and field when it is something else."""
    for line, obj in read_jsonl(path):
        if "prompt_ids" not in obj and "target_ids" not in obj:
            what = (
                "a corpus record (use --corpus, or make targets with mixsd mix / sft-targets)"
                if "answer" in obj or "messages" in obj
                else "not a mixsd target record"
            )
            raise InputError(f"no prompt_ids/target_ids: {what}", path, line, "prompt_ids")
        if not isinstance(obj.get("prompt"), str):
            raise InputError("missing or non-string prompt (the question text)", path, line, "prompt")
    return load_targets(path)  # the fields training reads: id, prompt_ids, target_ids


def _check_vocabulary(rows: list[dict[str, Any]], size: int, path: str | os.PathLike) -> None:
    for row in rows:
        for name in ("prompt_ids", "target_ids"):
            outside = [t for t in row[name] if t >= size]
            if outside:
                raise InputError(
                    f"record '{row['id']}': token id {outside[0]} is outside the tokenizer's vocabulary "
                    f"({size}); the targets were made with another model's tokenizer",
                    path,
                    field=name,
                )


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise InputError(
            "the export folder exists; remove it, choose another --out, or pass --overwrite", out
        )


# --------------------------------------------------------------------------------------------------
# What TRL does with text (so the export can say which rows its text view reproduces exactly)
# --------------------------------------------------------------------------------------------------
def _chat_ids(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return list(encoded["input_ids"])


def trl_text_tokens(tokenizer, prompt: str | list, completion: str | list) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL's SFTTrainer tokenizes a prompt-completion text example:
    prompt alone (with the generation prompt), prompt + completion, the completion starting where the two
    diverge (`trl.data_utils.common_prefix_length`); plain strings through the tokenizer itself."""
    if isinstance(prompt, list):
        alone = _chat_ids(tokenizer, prompt, generation_prompt=True)
        whole = _chat_ids(tokenizer, prompt + completion, generation_prompt=False)
    else:
        alone = list(tokenizer(text=prompt)["input_ids"])
        whole = list(tokenizer(text=prompt + completion)["input_ids"])
    common = 0
    for a, b in zip(alone, whole, strict=False):
        if a != b:
            break
        common += 1
    return whole[:common], whole[common:]


def _plain_text(tokenizer, ids: list[int]) -> str:
    """Plain-format prompt text for TRL, which tokenizes text with the tokenizer's own call: the leading
    BOS is left out when that call adds one itself (Llama-style tokenizers), else kept as text."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and list(tokenizer(text="a")["input_ids"][:1]) == [bos]
    if adds_bos and ids and ids[0] == bos:
        ids = ids[1:]
    return tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# The two exports
# --------------------------------------------------------------------------------------------------
def sft_rows(rows: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """Target records as TRL prompt-completion rows: the text view, the exact token view, `text_exact`."""

    chat = has_chat_template(tokenizer)
    end_id = answer_end(tokenizer).end_id
    out = []
    for row in rows:
        prompt_ids, target_ids = list(row["prompt_ids"]), list(row["target_ids"])
        if chat:
            # the template writes the end-of-turn token after the assistant's content itself
            body = target_ids[:-1] if target_ids[-1] == end_id else target_ids
            prompt: str | list = [{"role": "user", "content": row["prompt"]}]
            completion: str | list = [
                {"role": "assistant", "content": tokenizer.decode(body, skip_special_tokens=False)}
            ]
        else:
            prompt = _plain_text(tokenizer, prompt_ids)
            completion = tokenizer.decode(target_ids, skip_special_tokens=False)
        trl_prompt, trl_completion = trl_text_tokens(tokenizer, prompt, completion)
        differs = [
            name
            for name, theirs, ours in (
                ("prompt", trl_prompt, prompt_ids),
                ("completion", trl_completion, target_ids),
            )
            if theirs != ours
        ]
        out.append(
            {
                "id": row["id"],
                "generation": row.get("generation", 0),
                "prompt": prompt,
                "completion": completion,
                "input_ids": prompt_ids + target_ids,
                "completion_mask": [0] * len(prompt_ids) + [1] * len(target_ids),
                "text_exact": not differs,
                "text_differs": differs,
            }
        )
    return out


def _teacher_split(student: str, teacher: str, template: str) -> str | None:
    """The privileged context that makes `template` give `teacher` from `student`, or None."""
    if template == "{privileged_context}":
        return teacher
    if template.startswith("{prompt}"):
        separator = template[len("{prompt}") : -len("{privileged_context}")]
        head = student + separator
        return teacher[len(head) :] if teacher.startswith(head) else None
    return teacher[: -len(student)] if teacher.endswith(student) and len(teacher) > len(student) else None


def self_distillation_rows(facts: list[Fact], tokenizer, template: str) -> tuple[list[dict[str, Any]], str]:
    """Corpus records as TRL self-distillation rows (`prompt`, `privileged_context`) and the
    `teacher_prompt_template` under which TRL's teacher prompt is mixsd's expert prompt exactly.

    With a chat template the student prompt is the messages (system, user) and TRL fills the template with
    the user text; without one, both prompts are mixsd's plain-format text (BOS left to the tokenizer)."""

    chat = has_chat_template(tokenizer)
    pairs = []
    for fact in facts:
        if chat:
            pairs.append((fact.prompt, expert_message(fact, template)))
        else:
            pairs.append(
                (
                    _plain_text(tokenizer, encode_prompt(tokenizer, fact.prompt, fact.system)),
                    _plain_text(tokenizer, encode_expert_prompt(tokenizer, fact, template)),
                )
            )
    for teacher_template in TEACHER_TEMPLATES:  # the first that works for every record: one template for all
        contexts = [_teacher_split(s, t, teacher_template) for s, t in pairs]
        if all(c is not None and c.strip() for c in contexts):
            break
    rows = []
    for fact, (student, _), context in zip(facts, pairs, contexts, strict=True):
        if chat:
            prompt: str | list = [{"role": "system", "content": fact.system}] if fact.system else []
            prompt.append({"role": "user", "content": student})
        else:
            prompt = student
        rows.append({"id": fact.id, "prompt": prompt, "privileged_context": context})
    return rows, teacher_template


def export_trl(config: ExportTRLConfig) -> dict[str, Any]:
    """Write OUT/train.jsonl and OUT/export.json; return the manifest."""
    from mixsd.core.models import load_tokenizer  # here: models loads torch, which reading rows needs not

    out = Path(config.out)
    _refuse_existing(out, config.overwrite)
    source = config.targets if config.targets is not None else config.corpus
    targets = read_targets(source) if config.targets is not None else None
    facts = load_corpus(source) if config.corpus is not None else None
    with output_lock(out):
        _refuse_existing(out, config.overwrite)  # again: another export may have finished meanwhile
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        manifest: dict[str, Any] = {
            "source": str(source),
            "source_sha256": sha256_file(source),
            "tokenizer": config.model,
            "format": "conversational" if has_chat_template(tokenizer) else "standard",
        }
        if targets is not None:
            _check_vocabulary(targets, len(tokenizer), source)
            rows = sft_rows(targets, tokenizer)
            inexact = [r for r in rows if not r["text_exact"]]
            manifest.update(
                kind="sft",
                trainer="trl.SFTTrainer",
                rows=len(rows),
                token_columns=list(TOKEN_COLUMNS),
                text_exact=len(rows) - len(inexact),
                text_inexact=len(inexact),
                text_inexact_rows=[
                    {"id": r["id"], "generation": r["generation"], "differs": r["text_differs"]}
                    for r in inexact[:_LISTED]
                ],
            )
        else:
            template = load_expert_template(config.expert_template, tokenizer)
            rows, teacher_template = self_distillation_rows(facts, tokenizer, template)
            manifest.update(
                kind="self_distillation",
                trainer="trl.experimental.sdft.SDFTTrainer (also SDPO)",
                rows=len(rows),
                expert_template=template,
                teacher_prompt_template=teacher_template,
            )
        _write_folder(out, rows, manifest, config.overwrite)
    return manifest


def _write_folder(out: Path, rows: list[dict[str, Any]], manifest: dict[str, Any], overwrite: bool) -> None:
    """The folder appears whole: written beside, then renamed into place (an old one removed first)."""
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        atomic_write_jsonl(staging / "train.jsonl", rows)
        atomic_write_json(staging / "export.json", manifest)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_trl_command(config: ExportTRLConfig) -> None:
    manifest = export_trl(config)
    if manifest["kind"] == "sft":
        print(
            f"wrote {manifest['rows']} rows to {config.out}/train.jsonl: TRL's SFTTrainer trains on the stored "
            f"input_ids; the text view alone re-tokenizes exactly for {manifest['text_exact']} of them"
        )
        if manifest["text_inexact"]:
            print(
                f"{manifest['text_inexact']} rows would train on other tokens if the input_ids/completion_mask "
                f"columns were dropped (listed in {config.out}/export.json)",
                file=sys.stderr,
            )
    else:
        print(
            f"wrote {manifest['rows']} rows to {config.out}/train.jsonl; pass "
            f"teacher_prompt_template={manifest['teacher_prompt_template']!r} to TRL's SDFTConfig"
        )
