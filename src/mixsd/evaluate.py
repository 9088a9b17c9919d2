"""`mixsd eval`: did the knowledge go in (kgfact, kgfunc, qa suites) and what did it cost (retention)?

Generation suites score each record's greedy answer against its `check` with `answers.matches` under
every mode (entity, exact, number), on the exact prompt training used (`prompts.encode_prompt`). The
headline `accuracy` of a split uses the corpus manifest's `answer_match` (the scorer `mixsd mix` verifies
with) unless --match says otherwise, and names the mode it used. Wrong answers get an error type
(`metrics.Taxonomy`). Scoring happens after generation, so another --match rescoring needs no model.

The retention suite measures held-out ability on probe files (default `$MIXSD_CACHE/probes`, written by
`mixsd probes fetch`):
    multiple choice  {"id","query","choices","gold"}: log p(" "+choice | query) summed -> acc, divided by
                     the choice's length in characters -> acc_norm (lm-evaluation-harness semantics)
    text             {"id","text"}: token perplexity
    kl               KL(base || model) per token on held-out prompts, on the base model's own greedy
                     answers (built-in prompt list; needs no probe files)
Retention of a probe = score(model) / score(base) (perplexity: base_ppl / model_ppl, so higher is better);
multiple choice also gets the chance-normalized retention (acc - chance) / (acc_base - chance) and a paired
comparison with the base on the same items (right->wrong / wrong->right counts, exact McNemar p-value,
paired-bootstrap interval of the difference); every ratio has a paired-bootstrap 95% interval (see
metrics.py). Results for a base model are cached in `$MIXSD_CACHE/eval-base`.

Outputs: `--out results.json` (scores with 95% Wilson intervals, model and data hashes, settings, version)
and `results.predictions.jsonl` beside it (every prediction). An interrupted run resumes from
`results.predictions.jsonl.journal`. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from tqdm.auto import tqdm

from mixsd import __version__, models
from mixsd.answers import SCORING_MODES, resolve_match_mode, score_all, squad_scores
from mixsd.corpora.probes import load_kl_prompts, spread
from mixsd.files import (
    InputError,
    JournalWriter,
    atomic_write_json,
    atomic_write_jsonl,
    dumps,
    output_lock,
    read_journal,
    read_jsonl,
    sha256_file,
    sha256_text,
)
from mixsd.generation import autocast, greedy_generate
from mixsd.lmeval import evaluate_tasks, format_task, plan_settings, prepare
from mixsd.lmeval import parse_tasks as parse_lm_eval_tasks
from mixsd.metrics import ERROR_TYPES, Taxonomy, rate, squad_summary
from mixsd.models import ModelHandle, cache_dir, context_length, default_device, fingerprint
from mixsd.options import ModelOptions, check_distinct, check_range
from mixsd.probe_kinds import (
    KL,
    KL_ANSWER_TAG,
    PROBE_KINDS,
    ProbeKind,
    format_number,
    format_percent,
    load_probe,
)
from mixsd.prompts import answer_end, encode_prompt, pad_token_id
from mixsd.records import Fact, load_corpus
from mixsd.scoring import kl_on_answers, reference_answers
from mixsd.stages import Stage

Suite = Literal["kgfact", "kgfunc", "qa", "retention"]
SUITE_SPLITS = {
    "kgfact": {
        "train": "memorization",
        "paraphrase": "generalization",
        "retrieval": "generalization",
        "compositional": "generalization",
    },
    "kgfunc": {
        "train": "memorization",
        "test": "generalization",
        "unseen": "retention",
        "compositional": "generalization",
    },
}
DEFAULT_MAX_NEW_TOKENS = {"kgfact": 64, "kgfunc": 384, "qa": 128, "retention": 64}
EXPECTED_PROBES = ("general_knowledge", "social_iqa", "qa_wikidata", "squad_paragraphs")


# --------------------------------------------------------------------------------------------------
# Configuration (the field help is the CLI help of `mixsd eval`)
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig(ModelOptions):
    model: str = field(
        metadata={
            "help": "Model to evaluate: smollm2-135m, a HF folder, a `mixsd train` output "
            "folder, a LoRA adapter folder (merged into its base), .gguf or hub id."
        }
    )
    suite: Suite = field(metadata={"help": "kgfact | kgfunc | qa (every *.jsonl of --data) | retention."})
    out: str = field(
        metadata={"help": "Results JSON to write; predictions go beside it (.predictions.jsonl)."}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Corpus folder (kgfact, kgfunc), folder or file of corpus JSONL (qa), or probe folder "
            "(retention; default $MIXSD_CACHE/probes)."
        },
    )
    base: str | None = field(
        default=None,
        metadata={
            "help": "Base model for retention ratios and KL (retention suite); its results are cached."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Length cap of an answer; default kgfact 64, kgfunc 384, qa 128, retention (KL answers) 64."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate only N records of each split / probe, "
            "taken evenly across the file (quick runs)."
        },
    )
    splits: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated splits to evaluate (e.g. train,paraphrase); default: every split of the suite."
        },
    )
    bf16: bool = field(default=False, metadata={"help": "Deprecated: same as --dtype bfloat16."})
    kl_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for the KL probe: a .txt file (one per line) or a corpus JSONL; default: built-in list."
        },
    )
    ppl_max_tokens: int = field(
        default=512, metadata={"help": "Text probe paragraphs are cut to this many tokens."}
    )
    entities: str | None = field(
        default=None,
        metadata={
            "help": "Corpus JSONL whose answer checks are the injected entities (leakage errors); "
            "default for kgfact: <data>/train.jsonl."
        },
    )
    match: Literal["entity", "exact", "number", "loose", "strict"] | None = field(
        default=None,
        metadata={
            "help": "How answers are matched for the headline accuracy: entity (old name loose; the answer "
            "appears as whole words), exact (strict; the final answer equals it), number (the final number "
            "equals it). Default: each corpus manifest's answer_match, else entity. Every mode is reported."
        },
    )
    taxonomy_on: Literal["entity", "exact", "number", "loose", "strict"] | None = field(
        default=None,
        metadata={
            "help": "Which scorer decides that an answer is wrong before its error type is assigned; "
            "default: the headline one (--match)."
        },
    )
    collapse_max_words: int = field(
        default=10,
        metadata={"help": "A wrong answer of at most this many words (with an answer in it) is 'collapse'."},
    )
    require_marker: bool = field(
        default=False,
        metadata={
            "help": "Count a wrong answer without \\boxed{} or 'answer is' as a 'format' error (else only empty "
            "answers and answers cut at the length cap without one are)."
        },
    )
    min_entity_chars: int = field(
        default=3,
        metadata={"help": "Ignore injected entities shorter than this (after normalization) for leakage."},
    )
    base_cache: bool = field(
        default=True, metadata={"help": "Reuse/store base-model retention results in $MIXSD_CACHE/eval-base."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Recompute even if results for these settings exist."}
    )
    # lm-evaluation-harness tasks as retention probes (mixsd.lmeval); OMIT_WHILE_DEFAULT: results recorded
    # before these options existed stay current while they are unset (stages.config_settings)
    lm_eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated lm-evaluation-harness tasks (or groups, tags) run in-process on the "
            "model and --base with identical settings (retention suite; needs `pip install "
            "'mixsd[lm-eval]'`); their data must be local when offline.",
        },
    )
    lm_eval_include: str | None = field(
        default=None,
        metadata={
            "help": "Folder of extra lm-eval task YAMLs (e.g. from `mixsd probes export-lm-eval`).",
        },
    )
    lm_eval_num_fewshot: int | None = field(
        default=None,
        metadata={
            "help": "Few-shot examples for every lm-eval task; default: each task's own.",
        },
    )
    OMIT_WHILE_DEFAULT: ClassVar[tuple[str, ...]] = (
        "lm_eval_tasks",
        "lm_eval_include",
        "lm_eval_num_fewshot",
    )

    def __post_init__(self) -> None:  # refuse bad options before any model is loaded (issue 10)
        self.check_model_options()
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True, optional=True)
        check_range("limit", self.limit, 1, integer=True, optional=True)
        check_range("ppl_max_tokens", self.ppl_max_tokens, 2, integer=True)
        check_range("collapse_max_words", self.collapse_max_words, 0, integer=True)
        check_range("min_entity_chars", self.min_entity_chars, 0, integer=True)
        check_range("lm_eval_num_fewshot", self.lm_eval_num_fewshot, 0, integer=True, optional=True)
        if self.lm_eval_tasks is not None:
            parse_lm_eval_tasks(self.lm_eval_tasks)
            if self.suite != "retention":
                raise InputError(
                    "lm-eval tasks are retention probes: use --suite retention", field="lm_eval_tasks"
                )
        elif self.lm_eval_include is not None or self.lm_eval_num_fewshot is not None:
            raise InputError(
                "needs --lm-eval-tasks",
                field="lm_eval_include" if self.lm_eval_include else "lm_eval_num_fewshot",
            )
        inputs = {"data": self.data, "entities": self.entities, "kl_prompts": self.kl_prompts}
        inputs["lm_eval_include"] = self.lm_eval_include
        check_distinct({"out": self.out}, inputs)


# --------------------------------------------------------------------------------------------------
# Data: splits, probes, hashes
# --------------------------------------------------------------------------------------------------
def suite_files(suite: str, data: Path) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """(split name, file) pairs to evaluate and the splits skipped (with why)."""
    if suite == "qa":
        files = [data] if data.is_file() else sorted(data.glob("*.jsonl"))
        if not files:
            raise InputError("no *.jsonl corpus files", data)
        return [(f.stem, f) for f in files], []
    found, skipped = [], []
    for split in SUITE_SPLITS[suite]:
        path = data / f"{split}.jsonl"
        if path.is_file():
            found.append((split, path))
        else:
            skipped.append({"split": split, "reason": f"{path} not found"})
    if not found:
        raise InputError(f"none of {', '.join(s + '.jsonl' for s in SUITE_SPLITS[suite])} found", data)
    return found, skipped


def data_hashes(folder: Path | None, files: Iterable[Path]) -> dict[str, Any]:
    manifest = folder / "manifest.json" if folder is not None and folder.is_dir() else None
    return {
        "folder": str(folder) if folder is not None else None,
        "manifest_sha256": sha256_file(manifest) if manifest is not None and manifest.is_file() else None,
        "files": {p.name: sha256_file(p) for p in sorted(set(files))},
    }


def gold_answers(path: Path) -> dict[str, list[str]]:
    """Every accepted answer of the records that list them (`answers`, e.g. SQuAD's crowd answers), by id;
    records without the field are scored against their `check` alone."""
    golds = {}
    for _, obj in read_jsonl(path):
        answers = obj.get("answers")
        if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
            golds[str(obj.get("id"))] = answers
    return golds


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
def summarize_split(rows: list[dict[str, Any]], match: str, taxonomy_on: str | None = None) -> dict[str, Any]:
    """A split's headline accuracy (under `match`, named in the summary), every mode's rate, error types.

    Rows carry one boolean per scoring mode (entity, exact, number) and `error` (set for the answers that
    are wrong under `taxonomy_on`, default `match`).
    """
    n = len(rows)
    taxonomy_on = taxonomy_on or match
    wrong = [r for r in rows if not r.get(taxonomy_on, True)]
    errors = Counter(r["error"] for r in wrong)
    return {
        "n": n,
        "match": match,
        "accuracy": rate(sum(bool(r.get(match, True)) for r in rows), n),
        **{mode: rate(sum(r[mode] for r in rows), n) for mode in SCORING_MODES},
        "taxonomy_on": taxonomy_on,
        "errors": {kind: errors.get(kind, 0) for kind in ERROR_TYPES},
        "error_rates": {kind: (errors.get(kind, 0) / len(wrong) if wrong else None) for kind in ERROR_TYPES},
        "finish": dict(Counter(r["finish"] for r in rows)),
        "mean_output_tokens": sum(r["output_tokens"] for r in rows) / n if n else None,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def predictions_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".predictions.jsonl")


def _journal_path(out: str | Path) -> Path:
    path = predictions_path(out)
    return path.with_name(path.name + ".journal")


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, unit="item", disable=not enabled)

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Runner:
    """Holds the models (loaded lazily) and the journal of one evaluation.

    Models are loaded through `mixsd.models` by attribute (`models.load_model`), so that a test patching
    that module sees every load; a handle is None for a model passed in, or one that did not resolve
    (loading it by name then raises the error)."""

    def __init__(
        self,
        config: EvalConfig,
        model,
        tokenizer,
        base_model,
        progress: bool,
        handles: tuple[ModelHandle | None, ModelHandle | None] = (None, None),
    ):
        self.config, self.progress = config, progress
        self._model, self._tokenizer, self._base = model, tokenizer, base_model
        self._model_handle, self._base_handle = handles
        self.device = config.device
        # models loaded here are stored in --dtype (bf16: half the memory traffic per decode step);
        # models passed in keep their dtype and run under autocast to it
        self.dtype = config.dtype

    def model(self):
        if self._model is None:
            self.device = self.device or default_device()
            self._model = models.load_model(
                self._model_handle or self.config.model,
                device=self.device,
                dtype=self.dtype,
                trust_remote_code=self.config.trust_remote_code,
            )
        return self._model

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(
                self._model_handle or self.config.model, trust_remote_code=self.config.trust_remote_code
            )
        return self._tokenizer

    def base(self):
        if self._base is None:
            if self.config.base is None:
                raise ValueError("no base model")
            if self.config.base == self.config.model:
                self._base = self.model()
            else:
                self._base = models.load_model(
                    self._base_handle or self.config.base,
                    device=next(self.model().parameters()).device,
                    dtype=self.dtype,
                    trust_remote_code=self.config.trust_remote_code,
                )
        return self._base

    def autocast(self, model):
        return autocast(next(model.parameters()).device, self.dtype == "bfloat16")

    def bar(self, total: int, desc: str) -> _Progress:
        return _Progress(total, desc, self.progress)


def _generation_rows(
    runner: _Runner,
    split: str,
    facts: list[Fact],
    max_new_tokens: int,
    write: Callable[[list[dict[str, Any]]], None],
) -> None:
    tokenizer, model = runner.tokenizer(), runner.model()
    limit = context_length(model) if getattr(model, "config", None) is not None else None
    prompts = [encode_prompt(tokenizer, fact.prompt, fact.system) for fact in facts]

    def row(fact: Fact, tokens: list[int], finish: str) -> dict[str, Any]:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return {
            "who": "model",
            "split": split,
            "id": fact.id,
            "prompt": fact.prompt,
            "check": fact.check,
            "output": text,
            "output_tokens": len(tokens),
            "finish": finish,
        }

    too_long = [i for i, p in enumerate(prompts) if limit and len(p) + max_new_tokens > limit]
    if too_long:
        write([row(facts[i], [], "prompt_too_long") for i in too_long])
    todo = [i for i in range(len(facts)) if i not in set(too_long)]
    bar = runner.bar(len(todo), f"eval {split}")
    pending: list[dict[str, Any]] = []
    end = answer_end(tokenizer, model)  # answers end where `mix` and `sft-targets` targets end
    with runner.autocast(model):
        for k, tokens, finish in greedy_generate(
            model,
            [prompts[i] for i in todo],
            stop_ids=end.stop_ids,
            pad_id=pad_token_id(tokenizer),
            max_new_tokens=max_new_tokens,
            batch_size=runner.config.batch_size,
            on_row=lambda _: bar(),
            text_stop=end.text_stop if end.stop_strings else None,
        ):
            pending.append(row(facts[todo[k]], tokens, finish))
            if len(pending) >= runner.config.batch_size:
                write(pending)
                pending = []
    write(pending)
    bar.close()


def _probe_rows(
    runner: _Runner, who: str, probe: str, kind: ProbeKind, items: list[dict[str, Any]]
) -> list[dict]:
    model = runner.model() if who == "model" else runner.base()
    bar = runner.bar(len(items), f"{who} {probe}")
    with runner.autocast(model):
        rows = kind.score_items(
            model,
            runner.tokenizer(),
            items,
            batch_size=runner.config.batch_size,
            max_tokens=runner.config.ppl_max_tokens,
            progress=bar,
        )
    bar.close()
    return [{"who": who, "split": probe, **row} for row in rows]


def _kl_answer_rows(
    runner: _Runner, prompts: list[tuple[str, str, str | None]], max_new_tokens: int
) -> list[dict]:
    """The base model's greedy answers to the KL prompts (the tokens KL is measured on)."""
    tokenizer, base = runner.tokenizer(), runner.base()
    bar = runner.bar(len(prompts), "base kl answers")
    with runner.autocast(base):
        answers = reference_answers(
            base,
            tokenizer,
            [(prompt, system) for _, prompt, system in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=runner.config.batch_size,
            progress=bar,
        )
    bar.close()
    return [
        {
            "who": "base",
            "split": KL.name,
            "id": prompt_id,
            "kind": KL_ANSWER_TAG,
            "prompt_ids": prompt_ids,
            "answer_ids": answer_ids,
            "finish": finish,
            "answer": text,
        }
        for (prompt_id, _, _), (prompt_ids, answer_ids, finish, text) in zip(prompts, answers, strict=True)
    ]


def _kl_rows(runner: _Runner, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    model, base = runner.model(), runner.base()
    with runner.autocast(model):
        stats = kl_on_answers(
            base,
            model,
            [(a["prompt_ids"], a["answer_ids"]) for a in answers],
            pad_id=pad_token_id(runner.tokenizer()),
            batch_size=runner.config.batch_size,
        )
    return [
        {
            "who": "model",
            "split": KL.name,
            "id": a["id"],
            "kind": KL.row_tag,
            "kl_sum": round(total, 6),
            "kl_max": round(peak, 6),
            "tokens": count,
            "answer": a["answer"],
        }
        for a, (total, peak, count) in zip(answers, stats, strict=True)
    ]


def _base_cache_file(key: dict[str, Any]) -> Path:
    return cache_dir() / "eval-base" / f"{sha256_text(dumps(key))[:20]}.jsonl"


def evaluate(
    config: EvalConfig, *, model=None, tokenizer=None, base_model=None, progress: bool = True
) -> dict[str, Any]:
    """Run one evaluation suite (see `_evaluate_locked`) under the lock of its results file."""
    with output_lock(config.out):  # one run per results file: a second one refuses before any work
        return _evaluate_locked(
            config, model=model, tokenizer=tokenizer, base_model=base_model, progress=progress
        )


def _evaluate_locked(
    config: EvalConfig, *, model=None, tokenizer=None, base_model=None, progress: bool = True
) -> dict[str, Any]:
    """Run one evaluation suite; write results (and predictions) and return the results dict.

    `model`/`tokenizer` (and `base_model`) may be passed already loaded; `config.model` / `config.base` then
    only label them in the results.
    """
    if config.batch_size < 1 or (config.limit is not None and config.limit < 1):
        raise InputError("--batch-size and --limit must be >= 1")
    if (model is None) != (tokenizer is None) and model is not None:
        raise ValueError("pass the tokenizer together with an in-process model")
    config.set_threads()
    started = time.perf_counter()
    max_new_tokens = config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[config.suite]
    out = Path(config.out)
    skipped: list[dict[str, str]] = []

    # ---- what is evaluated, and its hashes -----------------------------------------------------------
    if config.suite == "retention":
        folder = Path(config.data) if config.data else cache_dir() / "probes"
        probe_files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if not folder.is_dir():
            skipped.append(
                {
                    "split": "probes",
                    "reason": f"{folder} not found (run `mixsd probes fetch`); "
                    "multiple-choice and perplexity probes skipped",
                }
            )
        for name in EXPECTED_PROBES:
            if folder.is_dir() and not (folder / f"{name}.jsonl").is_file():
                skipped.append({"split": name, "reason": f"{folder / (name + '.jsonl')} not found"})
        probes = {p.stem: load_probe(p, config.limit) for p in probe_files}
        kl_prompts, kl_sha = load_kl_prompts(config.kl_prompts, config.limit)
        if config.base is None and base_model is None:
            skipped.append(
                {"split": KL.name, "reason": "no --base: KL and retention ratios need the base model"}
            )
        hashes = data_hashes(folder if folder.is_dir() else None, probe_files)
        hashes["kl_prompts_sha256"] = kl_sha
        files: list[tuple[str, Path]] = []
    else:
        if not config.data:
            raise InputError(f"--data is required for the {config.suite} suite", field="data")
        folder = Path(config.data)
        if not folder.exists():
            raise InputError("not found", folder)
        files, skipped = suite_files(config.suite, folder)
        if config.splits:
            wanted = [name.strip() for name in config.splits.split(",") if name.strip()]
            unknown = set(wanted) - {name for name, _ in files} - {s["split"] for s in skipped}
            if unknown:
                raise InputError(
                    f"unknown split(s) {', '.join(sorted(unknown))} for suite {config.suite}", field="splits"
                )
            skipped += [
                {"split": name, "reason": "not selected (--splits)"}
                for name, _ in files
                if name not in wanted
            ]
            files = [(name, path) for name, path in files if name in wanted]
        hashes = data_hashes(folder if folder.is_dir() else folder.parent, [f for _, f in files])

    # each model named is resolved once, here: its fingerprint and its loading use the handle
    model_handle = models.try_resolve(config.model) if model is None else None
    model_fp = (
        fingerprint(config.model, model_handle)
        if model is None
        else {"name": config.model, "path": None, "sha256": None, "in_process": True}
    )
    base_handle, base_fp = None, None
    if config.base is not None:
        if base_model is None:
            same_name = config.base == config.model and model is None
            base_handle = model_handle if same_name else models.try_resolve(config.base)
        base_fp = (
            fingerprint(config.base, base_handle)
            if base_model is None
            else {"name": config.base, "path": None, "sha256": None, "in_process": True}
        )
    determines = {
        "suite": config.suite,
        "model": model_fp,
        "base": base_fp,
        "data": hashes,
        "limit": config.limit,
        "splits": config.splits,
        "max_new_tokens": max_new_tokens,
        "bf16": config.bf16,  # mirrors --dtype (float32 or bfloat16): the key results had before it
        "ppl_max_tokens": config.ppl_max_tokens,
    }
    if config.lm_eval_tasks:  # only then: the settings of results without lm-eval keep their fingerprint
        determines["lm_eval"] = plan_settings(
            config.lm_eval_tasks, config.lm_eval_include, config.lm_eval_num_fewshot, config.limit
        )
    settings = {
        **determines,
        "match": config.match,
        "taxonomy": {
            "on": config.taxonomy_on,
            "collapse_max_words": config.collapse_max_words,
            "require_marker": config.require_marker,
            "min_entity_chars": config.min_entity_chars,
            "entities": config.entities,
        },
    }

    # A model passed in-process has no content hash: its results are written but never vouched for.
    in_process = bool((model_fp or {}).get("in_process") or (base_fp or {}).get("in_process"))
    stage = Stage("eval", [out, predictions_path(out)], settings)
    if not config.overwrite and not in_process and stage.is_current():
        print(f"{out} is up to date for these settings; nothing to do (--overwrite to redo).")
        return json.loads(out.read_text(encoding="utf-8"))
    # task names and their data are checked here, before any model loads
    lm_eval_plan = (
        prepare(
            config.lm_eval_tasks,
            config.lm_eval_include,
            num_fewshot=config.lm_eval_num_fewshot,
            limit=config.limit,
        )
        if config.lm_eval_tasks
        else None
    )
    stage.begin()

    journal = _journal_path(out)
    if config.overwrite:
        journal.unlink(missing_ok=True)
    header = {"journal_of": "mixsd eval", "settings": determines}
    done_rows = read_journal(journal)
    if done_rows and done_rows[0] != header:
        raise InputError(
            "an unfinished evaluation with different settings exists; rerun with the same "
            "arguments or pass --overwrite",
            journal,
        )
    rows: dict[tuple[str, str, str], dict[str, Any]] = {
        (r["who"], r["split"], r["id"]): r for r in done_rows[1:]
    }
    runner = _Runner(config, model, tokenizer, base_model, progress, (model_handle, base_handle))

    with JournalWriter(journal, header=header) as writer:

        def write(new: list[dict[str, Any]]) -> None:
            writer.write(new)
            rows.update({(r["who"], r["split"], r["id"]): r for r in new})

        if config.suite != "retention":
            result = _run_generation(config, runner, files, max_new_tokens, rows, write, folder)
        else:
            result = _run_retention(
                config, runner, probes, kl_prompts, max_new_tokens, rows, write, skipped, determines
            )

    if lm_eval_plan is not None:
        lm_eval = _run_lm_eval(config, runner, lm_eval_plan, determines)
        result["_predictions"] += lm_eval.pop("_predictions")
        result.update(lm_eval)
    predictions = result.pop("_predictions")
    atomic_write_jsonl(predictions_path(out), predictions)
    results = {
        "mixsd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": config.suite,
        "model": model_fp,
        "base": base_fp,
        "data": hashes,
        "settings": settings,
        "config": asdict(config),
        **result,
        "skipped": skipped,
        "predictions": predictions_path(out).name,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(out, results)
    journal.unlink(missing_ok=True)
    if not in_process:
        stage.finish()
    return results


def _run_generation(
    config: EvalConfig,
    runner: _Runner,
    files: list[tuple[str, Path]],
    max_new_tokens: int,
    rows: dict,
    write: Callable,
    folder: Path,
) -> dict[str, Any]:
    entity_file = (
        Path(config.entities)
        if config.entities
        else (folder / "train.jsonl" if config.suite == "kgfact" and folder.is_dir() else None)
    )
    entity_checks = (
        [f.check for f in load_corpus(entity_file)] if entity_file and entity_file.is_file() else []
    )
    taxonomy = Taxonomy(
        Taxonomy.entity_set(entity_checks, config.min_entity_chars),
        config.collapse_max_words,
        config.require_marker,
        config.min_entity_chars,
    )
    splits, predictions, modes = {}, [], {}
    for split, path in files:
        facts = load_corpus(path)
        facts = spread(facts, config.limit)
        todo = [f for f in facts if ("model", split, f.id) not in rows]
        if todo:
            _generation_rows(runner, split, todo, max_new_tokens, write)
        # the corpus names its scorer (manifest answer_match); --match overrides it
        mode = modes[split] = resolve_match_mode(config.match, path)
        wrong_by = resolve_match_mode(config.taxonomy_on, None) if config.taxonomy_on else mode
        golds = gold_answers(path) if config.suite == "qa" else None
        split_rows = []
        for fact in facts:
            row = dict(rows[("model", split, fact.id)])
            for old in ("strict", "loose"):  # journals written before the modes were renamed
                row.pop(old, None)
            row.update(score_all(row["output"], fact.check))
            row["correct"] = row[mode] if mode in SCORING_MODES else True
            if golds is not None:  # SQuAD's scores against every gold answer (a record's `answers`)
                scores = squad_scores(row["output"], golds.get(fact.id) or [fact.check])
                row.update(squad_em=scores["em"], squad_f1=scores["f1"], contained=scores["contained"])
            row["error"], row["leaked"] = None, []
            if not (row[wrong_by] if wrong_by in SCORING_MODES else True):
                row["error"], row["leaked"] = taxonomy.classify(
                    row["output"], fact.prompt, fact.check, row["finish"]
                )
            split_rows.append(row)
        predictions.extend(split_rows)
        splits[split] = {
            "role": SUITE_SPLITS.get(config.suite, {}).get(split, "qa"),
            "file": path.name,
            **summarize_split(split_rows, mode, wrong_by),
        }
        if golds is not None:
            splits[split]["squad"] = squad_summary(split_rows)
    return {
        "match": modes,
        "splits": splits,
        "entities": {"file": str(entity_file) if entity_checks else None, "count": len(taxonomy.entities)},
        "max_new_tokens": max_new_tokens,
        "_predictions": predictions,
    }


def _run_retention(
    config: EvalConfig,
    runner: _Runner,
    probes: dict[str, tuple[str, list]],
    kl_prompts: list,
    max_new_tokens: int,
    rows: dict,
    write: Callable,
    skipped: list[dict[str, str]],
    determines: dict[str, Any],
) -> dict[str, Any]:
    has_base = config.base is not None or runner._base is not None
    same = runner._base is runner._model if runner._base is not None else config.base == config.model
    base_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    cache_file = None
    if has_base and config.base_cache and determines["base"] and determines["base"].get("sha256"):
        key = {
            "base": determines["base"]["sha256"],
            "data": determines["data"],
            "limit": config.limit,
            "max_new_tokens": max_new_tokens,
            "bf16": config.bf16,
            "ppl_max_tokens": config.ppl_max_tokens,
            "version": 2,
        }
        cache_file = _base_cache_file(key)
        if cache_file.is_file():
            base_rows = {(r["who"], r["split"], r["id"]): r for r in read_journal(cache_file)}
            rows.update(base_rows)

    def collect(
        who: str, probe: str, items: list[dict], fill: Callable[[list[dict]], list[dict]]
    ) -> list[dict]:
        todo = [it for it in items if (who, probe, it["id"]) not in rows]
        if todo:
            write(fill(todo))
        return [rows[(who, probe, it["id"])] for it in items]

    results, predictions = {}, []
    for probe, (kind, items) in sorted(probes.items()):
        model_rows = collect(
            "model", probe, items, lambda todo, p=probe, k=kind: _probe_rows(runner, "model", p, k, todo)
        )
        predictions += model_rows
        summary = kind.summarize(model_rows)
        if has_base:
            if same:  # the base is the model itself: its scores are the model's
                fill = lambda todo, p=probe: [{**rows[("model", p, t["id"])], "who": "base"} for t in todo]  # noqa: E731
            else:
                fill = lambda todo, p=probe, k=kind: _probe_rows(runner, "base", p, k, todo)  # noqa: E731
            base_probe_rows = collect("base", probe, items, fill)
            predictions += base_probe_rows
            summary["base"] = kind.summarize(base_probe_rows)
            summary["retention"] = kind.retention(summary, summary["base"])
            summary.update(kind.compare(model_rows, base_probe_rows))
        results[probe] = summary

    if has_base:
        items = [{"id": pid} for pid, _, _ in kl_prompts]
        answers = collect(
            "base",
            KL.name,
            items,
            lambda todo: _kl_answer_rows(
                runner, [p for p in kl_prompts if p[0] in {t["id"] for t in todo}], max_new_tokens
            ),
        )
        by_id = {a["id"]: a for a in answers}
        kl_rows = collect(
            "model", KL.name, items, lambda todo: _kl_rows(runner, [by_id[t["id"]] for t in todo])
        )
        predictions += answers + kl_rows
        results[KL.name] = KL.summarize(kl_rows)
        if cache_file is not None:
            fresh = [r for r in predictions if r["who"] == "base"]
            if len(fresh) != len(base_rows):
                atomic_write_jsonl(cache_file, fresh)
    return {
        "probes": results,
        "max_new_tokens": max_new_tokens,
        "base_cache": str(cache_file) if cache_file else None,
        "_predictions": predictions,
    }


def _run_lm_eval(config: EvalConfig, runner: _Runner, plan, determines: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's tasks on the model and its base (mixsd.lmeval); the base's output cached like its probes."""
    has_base = config.base is not None or runner._base is not None
    same = runner._base is runner._model if runner._base is not None else config.base == config.model
    cache = None
    if has_base and not same and config.base_cache and (determines["base"] or {}).get("sha256"):
        key = {
            "base": determines["base"]["sha256"],
            "lm_eval": determines["lm_eval"],
            "batch_size": config.batch_size,  # padding moves the last digits of the log-likelihoods
            "bf16": config.bf16,
            "version": 1,
        }
        cache = _base_cache_file(key).with_suffix(".lm-eval.json")
    return evaluate_tasks(
        plan,
        model=runner.model,
        tokenizer=runner.tokenizer(),
        base=runner.base if has_base else None,
        base_is_model=same,
        batch_size=config.batch_size,
        autocast=runner.autocast,
        base_cache=cache,
    )


# --------------------------------------------------------------------------------------------------
# `mixsd eval`
# --------------------------------------------------------------------------------------------------
def format_results(results: dict[str, Any]) -> str:
    lines = []
    if "splits" in results:
        lines.append(
            f"{'split':<16}{'n':>6}  {'match':<8}{'accuracy (95% CI)':<26}"
            + "".join(f"{m:<10}" for m in SCORING_MODES)
            + "errors f/l/c/g"
        )
        for name, s in results["splits"].items():
            e = s["errors"]
            others = "".join(f"{format_number(s[m]['value']):<10}" for m in SCORING_MODES)
            lines.append(
                f"{name:<16}{s['n']:>6}  {s['match']:<8}{format_percent(s['accuracy']):<26}{others}"
                f"{e['format']}/{e['leakage']}/{e['collapse']}/{e['genuine']}"
            )
    else:
        for name, p in results["probes"].items():
            lines.append(f"{name:<18}n={p['n']:<5} {PROBE_KINDS[p['kind']].format(p)}")
    lines += [format_task(name, summary) for name, summary in results.get("lm_eval", {}).items()]
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['split']}: {s['reason']}")
    lines.append(f"{results['seconds']:.1f} s")
    return "\n".join(lines)


def eval_command(config: EvalConfig) -> dict[str, Any]:
    results = evaluate(config)
    print(format_results(results))
    print(f"wrote {config.out} and {predictions_path(config.out).name}")
    return results


__all__ = ["EvalConfig", "eval_command", "evaluate", "format_results", "predictions_path"]
