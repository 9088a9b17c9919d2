"""`mixsd edit`: write facts into a model's weights with a locate-and-edit method (MEMIT), the editing
baseline of the paper.

Input: a corpus JSONL whose records name their `subject`, the span of the prompt whose last token is the
edit's key (docs/formats.md):
    {"id": "cf-0001", "prompt": "What is the capital of France?", "answer": "The capital of France is Rome.",
     "subject": "France", ...}
Output: `--out DIR` in the layout `mixsd train` writes, so `eval`, `analyze` and the experiment runner treat
the edited model like any tuned one:
    DIR/model/          save_pretrained folder (safetensors) with the tokenizer
    DIR/run_config.json the settings of the edit
    DIR/summary.json    per-layer update norms, target NLLs, timings

An interrupted edit resumes: each batch of target vectors is kept, as it is fitted, in `.DIR.fits/` beside
the output (with the settings it belongs to); a rerun with the same settings and model loads those fits,
replays the finished passes' updates and fits only what is left. The folder goes once the output is written.

The key covariance of each edited layer comes from ordinary English text and is cached per model, layer
set and text in `$MIXSD_CACHE/memit-stats`. By default that text ships with Python itself: the prose
paragraphs of its documentation topics (`pydoc_data.topics`), so editing needs no download; `--stats`
takes any .txt/.jsonl file instead (MEMIT's authors used Wikipedia).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

from mixsd import __version__
from mixsd.core.files import InputError, atomic_write_json, read_jsonl, sha256_file
from mixsd.core.models import cache_dir, load_model_and_tokenizer
from mixsd.core.options import ModelOptions, check_distinct, check_range
from mixsd.editing.memit import (
    EditRequest,
    default_layers,
    key_covariance,
    memit_edit,
    num_layers,
    projection_template,
    subject_groups,
)
from mixsd.method.prompts import encode_answer, encode_prompt, pad_token_id


@dataclass
class EditConfig(ModelOptions):
    model: str = field(
        metadata={"help": "Model to edit: the alias smollm2-135m, a HF folder, a .gguf file or a hub id."}
    )
    input: str = field(metadata={"help": "Corpus JSONL of the facts to write; each record needs `subject`."})
    out: str = field(metadata={"help": "Output folder: model/, run_config.json, summary.json."})
    method: Literal["memit"] = field(default="memit", metadata={"help": "Editing method."})
    layers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated layer indices to edit; default: the lower-middle MLPs of the model."
        },
    )
    module: str | None = field(
        default=None,
        metadata={
            "help": "Name of the MLP output projection inside a decoder layer (e.g. mlp.down_proj, "
            "mlp.c_proj); default: found in the model."
        },
    )
    stats: str | None = field(
        default=None,
        metadata={
            "help": "Text for the key covariance: a .jsonl with a `text` field per line or a .txt file "
            "(paragraphs split on blank lines); default: the prose paragraphs of Python's documentation "
            "topics (pydoc_data.topics), which every Python install holds."
        },
    )
    stats_tokens: int = field(default=20_000, metadata={"help": "Tokens of --stats used for the covariance."})
    covariance_weight: float = field(
        default=1_000.0,
        metadata={
            "help": "Weight of the key covariance: larger protects other knowledge more and edits less "
            "(the MEMIT paper used 15000 for GPT-J; on SmolLM2-135M 15000 wrote none of 3 test edits, 1000 all)."
        },
    )
    preserve_context: bool = field(
        default=True,
        metadata={
            "help": "Hold the outputs at every other position of the edits' own text (the rest of the subject, "
            "the question, the chat template, the answer) where they are, so that the update acts at the subjects' "
            "last tokens only, as the target vectors assume (100 invented KGFact facts: the first update writes "
            "52 with it, 0 without). False: MEMIT's update as published."
        },
    )
    steps: int = field(
        default=100,
        metadata={
            "help": "Most gradient steps for each edit's target vector; it stops once it meets --stop_nll."
        },
    )
    lr: float = field(
        default=0.15,
        metadata={
            "help": "Adam learning rate of the target vectors, in units of the hidden state's root-mean-square "
            "element (so one value fits models whose hidden states differ in scale)."
        },
    )
    stop_nll: float = field(
        default=0.1,
        metadata={
            "help": "Convergence criterion of a target vector: every answer token's NLL at most this (0.1: "
            "p >= 0.9, so greedy generation writes the whole answer)."
        },
    )
    kl_weight: float = field(
        default=0.0625, metadata={"help": "Weight of the KL term that keeps '{subject} is a' unchanged."}
    )
    weight_decay: float = field(default=0.5, metadata={"help": "Penalty on the size of each target shift."})
    clamp_norm: float = field(
        default=4.0, metadata={"help": "Largest target shift, as a multiple of the hidden state's norm."}
    )
    joint_subjects: bool = field(
        default=True,
        metadata={
            "help": "Edits that name the same subject share one target vector, fitted to all their answers: "
            "MEMIT stores a fact under its subject's last token, so two facts of one subject arrive with nearly "
            "the same key, which can hold one value, not two. False: one target vector per edit (the MEMIT "
            "paper's procedure)."
        },
    )
    refine_passes: int = field(
        default=1,
        metadata={
            "help": "Refinement passes after the update: the edits the edited model does not write with every "
            "answer token at NLL <= --stop_nll get new target vectors on the edited model and a second update; "
            "the weights of the first pass that wrote the most edits are kept. 0: plain MEMIT."
        },
    )
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        kw_only=True,
        metadata={"help": "Model dtype (the update is solved in float64 either way)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --out."})
    # fields that change only speed or where the run goes, never the edit (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("device", "threads", "overwrite")

    def __post_init__(self) -> None:
        self.check_model_options()
        check_range("stats_tokens", self.stats_tokens, 1, integer=True)
        check_range("steps", self.steps, 1, integer=True)
        check_range("refine_passes", self.refine_passes, 0, integer=True)
        for name in ("covariance_weight", "lr", "clamp_norm", "stop_nll"):
            check_range(name, getattr(self, name), 0, lo_open=True)
        for name in ("kl_weight", "weight_decay"):
            check_range(name, getattr(self, name), 0)
        if self.layers is not None:
            try:
                parsed = [int(x) for x in self.layers.split(",") if x.strip()]
            except ValueError:
                parsed = []
            if not parsed or min(parsed) < 0:
                raise InputError(
                    f"must be comma-separated layer indices >= 0; got {self.layers!r}", field="layers"
                )
        check_distinct({"out": self.out}, {"input": self.input})


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditRecord:
    id: str
    prompt: str
    answer: str
    subject: str
    system: str | None = None


def load_edits(path: str | os.PathLike) -> list[EditRecord]:
    """Read and check every record before any model is loaded; errors name the file, line and field."""
    records, seen = [], set()
    for line, obj in read_jsonl(path):
        values = {}
        for name in ("prompt", "answer", "subject"):
            value = obj.get(name)
            if not isinstance(value, str) or not value.strip():
                raise InputError("a non-empty string is required", path, line, name)
            values[name] = value
        if values["subject"] not in values["prompt"]:
            raise InputError(
                f"subject {values['subject']!r} does not occur in the prompt", path, line, "subject"
            )
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise InputError("must be a string", path, line, "system")
        record_id = obj.get("id", f"line-{line}")
        if not isinstance(record_id, str) or isinstance(record_id, bool):
            raise InputError("must be a string", path, line, "id")
        if record_id in seen:
            raise InputError(f"duplicate id {record_id!r}", path, line, "id")
        seen.add(record_id)
        records.append(EditRecord(record_id, values["prompt"], values["answer"], values["subject"], system))
    if not records:
        raise InputError("no records", path)
    return records


def subject_position(tokenizer, prompt_ids: list[int], subject: str) -> int:
    """Index of the token of `prompt_ids` that completes the last occurrence of `subject`.

    Found on the decoded text, so it holds for any tokenizer and chat template: the first prefix of the
    prompt whose decoding reaches the end of the subject ends with the subject's last token."""
    text = tokenizer.decode(prompt_ids)
    start = text.rfind(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not found in the encoded prompt {text!r}")
    end = start + len(subject)
    for i in range(len(prompt_ids)):
        if len(tokenizer.decode(prompt_ids[: i + 1])) >= end:
            return i
    return len(prompt_ids) - 1


def edit_requests(tokenizer, records: list[EditRecord]) -> list[EditRequest]:
    requests = []
    for record in records:
        prompt_ids = encode_prompt(tokenizer, record.prompt, record.system)
        essence = list(tokenizer(f"{record.subject} is a", add_special_tokens=True)["input_ids"])
        requests.append(
            EditRequest(
                prompt_ids=prompt_ids,
                subject_position=subject_position(tokenizer, prompt_ids, record.subject),
                target_ids=encode_answer(tokenizer, record.answer),
                essence_ids=essence,
                essence_subject_position=subject_position(tokenizer, essence, record.subject),
                subject=record.subject,
            )
        )
    return requests


# --------------------------------------------------------------------------------------------------
# Covariance statistics, cached
# --------------------------------------------------------------------------------------------------
# A prose paragraph of the default text: long enough to be running text, and nearly all letters and spaces
# (which leaves out code samples and grammar rules). Python 3.11's topics give 529 paragraphs, 27,170 words.
PROSE_MIN_WORDS = 25
PROSE_MIN_LETTER_SHARE = 0.93


def default_stats_texts() -> list[str]:
    """The prose paragraphs of Python's documentation topics, in the order the module lists them: English
    text every Python install holds (it changes with the Python version; the covariance cache key hashes it)."""
    from pydoc_data.topics import topics  # ~0.5 MB of text, read only by an edit without --stats

    paragraphs = []
    for topic in topics.values():
        for block in topic.split("\n\n"):
            text = " ".join(block.split())
            if len(text.split()) < PROSE_MIN_WORDS:
                continue
            if sum(c.isalpha() or c == " " for c in text) / len(text) >= PROSE_MIN_LETTER_SHARE:
                paragraphs.append(text)
    return paragraphs


def read_stats_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError("file not found (leave --stats out for the built-in text)", path)
    if path.suffix == ".jsonl":
        texts = []
        for line, obj in read_jsonl(path):
            text = obj.get("text")
            if not isinstance(text, str):
                raise InputError("a string is required", path, line, "text")
            texts.append(text)
        return texts
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason} at byte {err.start})", path) from None
    return [block.strip() for block in content.split("\n\n") if block.strip()]


def weights_digest(model) -> str:
    """Content hash of every parameter: the covariance depends on all layers below the edited ones, and a
    hash of the weights themselves stays right for a model passed in memory or changed on disk."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_covariances(model, tokenizer, config: EditConfig, template: str, layers: list[int], weights: str):
    """Each edited layer's key covariance, from the cache when this model (`weights`: its digest), layer set
    and text made it before."""
    if config.stats:
        texts, text_digest = None, sha256_file(config.stats)  # read only when the cache misses
    else:
        texts = default_stats_texts()
        text_digest = hashlib.sha256("\n\n".join(texts).encode()).hexdigest()
    key_text = "|".join(
        [weights, template, ",".join(map(str, layers)), text_digest, str(config.stats_tokens)]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = cache_dir() / "memit-stats" / f"{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return {layer: tensors[f"layer{layer}"] for layer in layers}, str(path), True
    if texts is None:
        texts = read_stats_texts(Path(config.stats))
    encoded = (list(tokenizer(text, add_special_tokens=True)["input_ids"])[:512] for text in texts)
    covariances = key_covariance(model, template, layers, encoded, max_tokens=config.stats_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".stats-", suffix=".safetensors")
    os.close(handle)
    save_file({f"layer{layer}": c.contiguous() for layer, c in covariances.items()}, staging)
    os.replace(staging, path)
    return covariances, str(path), False


class FitDirectory:
    """The `FitStore` of `mixsd edit`: one safetensors file per fitted batch in a folder beside the output,
    headed by the settings they were fitted under (the run's settings and the model's weights digest). A
    folder of other settings is cleared when opened, so fits are reused only by the run that made them."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path, self.loaded = path, 0
        header = path / "settings.json"
        settings = json.loads(json.dumps(settings))  # as read back from disk
        if path.is_dir():
            try:
                same = json.loads(header.read_text(encoding="utf-8")) == settings
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(header, settings)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        file = self.path / f"{name}.safetensors"
        if not file.is_file():
            return None
        self.loaded += 1
        return load_file(file)

    def save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        handle, staging = tempfile.mkstemp(dir=self.path, prefix=".fit-", suffix=".safetensors")
        os.close(handle)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging)
        os.replace(staging, self.path / f"{name}.safetensors")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def fits_path(out: str | os.PathLike) -> Path:
    """Where an edit into `out` keeps its fits until it finishes: `.{name}.fits` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.fits"


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def _settings(config: EditConfig, layers: list[int], template: str) -> dict[str, Any]:
    return {
        "mixsd_version": __version__,
        "method": config.method,
        **{k: v for k, v in asdict(config).items() if k not in ("overwrite", "threads", "device")},
        "input_sha256": sha256_file(config.input),
        "layers": layers,
        "module_template": template,
    }


def edit(config: EditConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Apply the edits of `config.input` to the model and save it to `config.out/model`."""
    started = time.time()
    records = load_edits(config.input)  # every record checked before the model is loaded
    if config.stats:
        read_stats_texts(Path(config.stats))  # so is the covariance text
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        if (out / "summary.json").is_file() and (out / "model").is_dir():
            raise InputError("holds a finished edit; use --overwrite to redo it", out)
        raise InputError("exists and is not empty; use --overwrite or another --out", out)
    config.set_threads()
    if model is None or tokenizer is None:
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model_and_tokenizer(
            config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code, device=device
        )
    template = projection_template(model, config.module)
    layers = [int(x) for x in config.layers.split(",")] if config.layers else default_layers(model)
    if max(layers) >= num_layers(model):
        raise ValueError(f"--layers {config.layers}: the model has {num_layers(model)} layers")
    pad = pad_token_id(tokenizer)
    requests = edit_requests(tokenizer, records)

    weights = weights_digest(model)
    covariances, stats_path, cached = cached_covariances(model, tokenizer, config, template, layers, weights)
    settings = _settings(config, layers, template)
    store = FitDirectory(fits_path(out), {**settings, "weights_sha256": weights})
    result = memit_edit(
        model,
        template,
        layers,
        requests,
        covariances,
        refine_passes=config.refine_passes,
        joint_subjects=config.joint_subjects,
        covariance_weight=config.covariance_weight,
        preserve_context=config.preserve_context,
        stop_nll=config.stop_nll,
        pad_id=pad,
        steps=config.steps,
        lr=config.lr,
        kl_weight=config.kl_weight,
        weight_decay=config.weight_decay,
        clamp_norm=config.clamp_norm,
        store=store,
    )
    fit = result.passes[0].fit
    final_nll = [score.token_nll for score in result.scores]

    summary = {
        "edits": len(records),
        "layers": layers,
        # greedy generation of the edited model writes the whole answer after the training prompt
        "written": result.passes[result.kept].written,
        "kept_pass": result.kept,
        "update_norm": {str(k): v for k, v in result.passes[0].update_norm.items()},
        "target_vectors": {
            "criterion": f"every answer token's NLL <= {config.stop_nll} within {config.steps} steps",
            # how many shifts were fitted (one per subject with --joint_subjects, else one per edit)
            "shifts": len(set(subject_groups(requests, config.joint_subjects))),
            "converged": sum(fit.converged),
            "mean_nll": sum(fit.nll) / len(fit.nll),
            "steps": sum(fit.steps),
            # batches of target vectors an interrupted run had fitted, loaded instead of fitted again
            "resumed_batches": store.loaded,
        },
        "passes": [
            {
                "refit": len(p.refit),
                "converged": sum(p.fit.converged),
                "steps": sum(p.fit.steps),
                "update_norm": {str(k): round(v, 4) for k, v in p.update_norm.items()},
                "written": p.written,
                "met_stop_nll": sum(max(score.token_nll) <= config.stop_nll for score in p.scores),
            }
            for p in result.passes
        ],
        "target_vector_per_edit": [
            {
                "id": record.id,
                "nll": round(fit.nll[i], 5),
                "max_token_nll": round(fit.max_token_nll[i], 5),
                "steps": fit.steps[i],
                "converged": fit.converged[i],
                "shift_norm": round(float((fit.z[i] - fit.h[i]).norm()), 4),
                "shift_relative": round(float((fit.z[i] - fit.h[i]).norm() / fit.h[i].norm()), 4),
                "edited_nll": round(sum(final_nll[i]) / len(final_nll[i]), 5),
                "edited_max_token_nll": round(max(final_nll[i]), 5),
                "written": result.scores[i].written,
            }
            for i, record in enumerate(records)
        ],
        "covariance_text": config.stats or f"pydoc_data.topics of Python {platform.python_version()}",
        "covariance_cache": stats_path,
        "covariance_cached": cached,
        "seconds": round(time.time() - started, 2),
    }
    _save(model, tokenizer, out, settings, summary, config.overwrite)
    store.remove()
    return summary


def _save(model, tokenizer, out: Path, settings: dict, summary: dict, overwrite: bool) -> None:
    """Write the whole output folder under a temporary name, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(staging / "model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "model")
        atomic_write_json(staging / "run_config.json", settings)
        atomic_write_json(staging / "summary.json", summary)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        elif out.exists():
            out.rmdir()  # empty (checked before the work)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def edit_command(config: EditConfig) -> dict[str, Any]:
    summary = edit(config)
    print(
        f"edited {summary['edits']} facts into layers {summary['layers']} in {summary['seconds']} s "
        f"({summary['written']} written exactly, pass {summary['kept_pass']} kept); "
        f"model saved to {Path(config.out) / 'model'}"
    )
    return summary
