"""`mixsd eval`'s generation suites (kgfact, kgfunc, qa): did the knowledge go in?

Each record's greedy answer, on the exact prompt training used (`prompts.encode_prompt`), is scored
against its `check` with `answers.matches` under every mode (entity, exact, number). The headline
`accuracy` of a split uses the corpus manifest's `answer_match` (the scorer `mixsd mix` verifies with)
unless --match says otherwise, and names the mode it used. Wrong answers get an error type
(`taxonomy.Taxonomy`). Scoring happens after generation, so another --match rescoring needs no model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixsd.core.answers import SCORING_MODES, resolve_match_mode, score_all, squad_scores
from mixsd.core.files import InputError, read_jsonl
from mixsd.core.metrics import rate, squad_summary
from mixsd.core.models import context_length
from mixsd.core.records import Fact, load_corpus
from mixsd.corpora.probes import spread
from mixsd.evaluation.eval_config import EvalConfig
from mixsd.evaluation.eval_models import EvalModels
from mixsd.evaluation.taxonomy import ERROR_TYPES, Taxonomy
from mixsd.method.generation import greedy_generate
from mixsd.method.prompts import answer_end, encode_prompt, pad_token_id

# each suite's splits (the files of its corpus folder) and what each measures
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
# Answers and their scores
# --------------------------------------------------------------------------------------------------
def generation_rows(
    models: EvalModels,
    split: str,
    facts: list[Fact],
    max_new_tokens: int,
    write: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Greedy answers of the model to the facts' prompts, written in batches as they finish."""
    tokenizer, model = models.tokenizer(), models.model()
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
    bar = models.bar(len(todo), f"eval {split}")
    pending: list[dict[str, Any]] = []
    end = answer_end(tokenizer, model)  # answers end where `mix` and `sft-targets` targets end
    with models.autocast(model):
        for k, tokens, finish in greedy_generate(
            model,
            [prompts[i] for i in todo],
            stop_ids=end.stop_ids,
            pad_id=pad_token_id(tokenizer),
            max_new_tokens=max_new_tokens,
            batch_size=models.config.batch_size,
            on_row=lambda _: bar(),
            text_stop=end.text_stop if end.stop_strings else None,
        ):
            pending.append(row(facts[todo[k]], tokens, finish))
            if len(pending) >= models.config.batch_size:
                write(pending)
                pending = []
    write(pending)
    bar.close()


def run_generation(
    config: EvalConfig,
    models: EvalModels,
    files: list[tuple[str, Path]],
    max_new_tokens: int,
    rows: dict,
    write: Callable,
    folder: Path,
) -> dict[str, Any]:
    """Every split's answers (those not in `rows` yet generated and passed to `write`), scored and
    summarized; wrong answers typed against the entities the corpus injects."""
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
            generation_rows(models, split, todo, max_new_tokens, write)
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
