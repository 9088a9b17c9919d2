"""The lm-evaluation-harness hand-off: the export's parity with mixsd's scoring, `eval --lm-eval-tasks`,
and the errors that come before any model loads. Needs the optional lm-eval package."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.core.files import InputError
from mixsd.evaluation.evaluate import EvalConfig, evaluate, format_results, predictions_path
from mixsd.evaluation.lmeval import EXPORT_METRIC, LmEvalExportConfig, export_lm_eval, mc_context, prepare
from mixsd.evaluation.probe_kinds import MULTIPLE_CHOICE, load_probe
from mixsd.evaluation.scoring import choice_tokens
from mixsd.experiments.comparisons import item_scores
from mixsd.experiments.report_sections import lm_eval_markdown
from mixsd.experiments.results import RETENTION_METRIC, cell_row

lm_eval = pytest.importorskip("lm_eval")

# Items that exercise every way mixsd joins a choice to its query: the usual " " + choice, a query that
# ends in whitespace (moved into the continuation), choices that bring their own leading space; choices of
# different lengths, so that acc and acc_norm pick differently.
MC_ITEMS = [
    {
        "id": "plain-0",
        "query": "Question: Which colour is the sky?\nAnswer:",
        "choices": ["blue", "a deep red", "green"],
        "gold": 0,
    },
    {
        "id": "plain-1",
        "query": "Question: 2 + 2 = ?\nAnswer:",
        "choices": ["4", "five", "twenty-two"],
        "gold": 1,
    },
    {
        "id": "plain-2",
        "query": "The capital of France is",
        "choices": ["Paris", "Lyon", "Marseille", "Nice"],
        "gold": 2,
    },
    {"id": "newline", "query": "Question: Pick one.\nAnswer:\n", "choices": ["yes", "no"], "gold": 1},
    {"id": "space-end", "query": "Fill in: the cat sat on the ", "choices": ["mat", "hat"], "gold": 0},
    {
        "id": "own-space",
        "query": "Question: Odd one out?\nAnswer:",
        "choices": [" apple", " car", " pear"],
        "gold": 1,
    },
    {
        "id": "plain-3",
        "query": "Question: What do bees make?\nAnswer:",
        "choices": ["honey", "milk", "silk thread"],
        "gold": 0,
    },
    {"id": "plain-4", "query": "Question: 10 / 2?\nAnswer:", "choices": ["5", "2", "20", "0.5"], "gold": 3},
]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """The base cache and the datasets cache (the harness builds its JSON datasets there) in tmp."""
    import datasets

    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "mixsd-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def probe_dir(tmp_path) -> Path:
    folder = tmp_path / "probes"
    folder.mkdir()
    write_jsonl(folder / "toy_mc.jsonl", MC_ITEMS)
    write_jsonl(folder / "toy_text.jsonl", [{"id": "t0", "text": "The sky is blue. The sea is too."}])
    write_jsonl(folder / "toy_gen.jsonl", [{"id": "g0", "prompt": "Say hi.", "check": "hi"}])
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model and a differently seeded "base", saved as folders, and the shared tokenizer."""
    tokenizer = make_tiny_tokenizer()
    folders = {}
    for name, seed in (("model", 0), ("base", 1)):
        folder = tmp_path_factory.mktemp(name)
        make_tiny_model(len(tokenizer), seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return SimpleNamespace(tokenizer=tokenizer, **folders)


def _run_harness(folder: Path, include: Path, tasks: list[str]) -> dict:
    """lm-eval as a user runs it on a model folder: HFLM loads it, the export is an include path."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=4)
    manager = TaskManager(include_path=str(include), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


def test_mc_context_reproduces_mixsd_split(models):
    """Under the harness's rule (trailing whitespace of the context moves into the continuation), the
    exported context gives exactly mixsd's (context, continuation) tokens."""
    tokenizer = models.tokenizer
    for item in MC_ITEMS:
        context = mc_context(item["query"], item["choices"])
        for choice in item["choices"]:
            stripped = context.rstrip()
            continuation = context[len(stripped) :] + choice
            whole = tokenizer(stripped + continuation)["input_ids"]
            ctx = tokenizer(stripped)["input_ids"]
            assert (ctx, whole[len(ctx) :]) == choice_tokens(tokenizer, item["query"], choice), item["id"]
    assert mc_context("Q:", ["a", " b"]) is None  # no single delimiter fits both


def test_export_scores_equal_mixsd_eval(tmp_path, probe_dir, models):
    """The parity the issue asks for: lm-eval on the export picks what `mixsd eval` picks, per item, with
    log-likelihoods within 1e-4, and reports the same acc / acc_norm."""
    out = tmp_path / "export"
    manifest = export_lm_eval(LmEvalExportConfig(out=str(out), probes=str(probe_dir)))
    assert set(manifest["tasks"]) == {"mixsd_toy_mc", "mixsd_toy_text"}
    assert manifest["skipped"][0]["file"] == "toy_gen.jsonl"

    harness = _run_harness(models.model, out, ["mixsd_toy_mc", "mixsd_toy_text"])
    assert harness["results"]["mixsd_toy_text"]["word_perplexity,none"] > 1  # the text task runs too
    samples = sorted(harness["samples"]["mixsd_toy_mc"], key=lambda s: s["doc_id"])

    results = evaluate(
        EvalConfig(
            model=str(models.model), suite="retention", data=str(probe_dir), out=str(tmp_path / "r.json")
        ),
        progress=False,
    )
    rows = [r for r in map(json.loads, predictions_path(tmp_path / "r.json").read_text().splitlines())]
    mixsd_rows = [r for r in rows if r["split"] == "toy_mc" and r["who"] == "model"]
    assert [r["id"] for r in mixsd_rows] == [s["doc"]["id"] for s in samples]
    assert any(r["pred"] != r["pred_norm"] for r in mixsd_rows)  # acc_norm is really tested
    for ours, theirs in zip(mixsd_rows, samples, strict=True):
        logliks = [float(r[0]) for r in theirs["filtered_resps"]]
        assert logliks == pytest.approx(ours["loglik"], abs=1e-4), ours["id"]
        assert theirs["acc"] == float(ours["correct"]) and theirs["acc_norm"] == float(ours["correct_norm"])
    probe = results["probes"]["toy_mc"]
    assert harness["results"]["mixsd_toy_mc"]["acc,none"] == pytest.approx(probe["acc"]["value"])
    assert harness["results"]["mixsd_toy_mc"]["acc_norm,none"] == pytest.approx(probe["acc_norm"]["value"])


def test_export_refuses_bad_input_before_writing(tmp_path, probe_dir):
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(InputError, match="taken: already exists"):
        export_lm_eval(LmEvalExportConfig(out=str(existing), probes=str(probe_dir)))
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [MC_ITEMS[0], {"id": "m", "query": "Q:", "choices": ["a", " b"], "gold": 0}],
    )
    with pytest.raises(InputError, match=r"mixed.jsonl, line 2, field 'choices': some choices"):
        export_lm_eval(LmEvalExportConfig(out=str(tmp_path / "e1"), probes=str(mixed)))
    empty = write_jsonl(
        tmp_path / "empty.jsonl", [{"id": "e", "query": "", "choices": ["a", "b"], "gold": 0}]
    )
    with pytest.raises(InputError, match=r"empty.jsonl, line 1, field 'query': empty query"):
        export_lm_eval(LmEvalExportConfig(out=str(tmp_path / "e2"), probes=str(empty)))
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_export_metric_matches_results_table():
    """The export names the headline score of each fetched probe as the results table reads it."""
    for probe, metric in RETENTION_METRIC.items():
        if probe != "squad_paragraphs":  # perplexity: lm-eval's units differ, no headline shared
            assert EXPORT_METRIC.get(probe, "acc") == metric


def test_eval_lm_eval_tasks_join_retention(tmp_path, probe_dir, models):
    """`mixsd eval --lm-eval-tasks` on the export: the harness's scores of model and base equal the probe's,
    its per-item right->wrong / wrong->right counts equal mixsd's paired counts, and the task reaches the
    results table, the printed summary and the predictions file."""
    include = tmp_path / "export"
    export_lm_eval(LmEvalExportConfig(out=str(include), probes=str(probe_dir)))
    out = tmp_path / "retention.json"
    kl_prompts = tmp_path / "kl.txt"
    kl_prompts.write_text("Say something.\n")
    config = EvalConfig(
        model=str(models.model),
        base=str(models.base),
        suite="retention",
        data=str(probe_dir),
        out=str(out),
        lm_eval_tasks="mixsd_toy_mc",
        lm_eval_include=str(include),
        kl_prompts=str(kl_prompts),  # the KL probe is not under test: one short answer
        max_new_tokens=4,
    )
    results = evaluate(config, progress=False)
    task, probe = results["lm_eval"]["mixsd_toy_mc"], results["probes"]["toy_mc"]
    assert task["metric"] == "acc,none" and task["n"] == len(MC_ITEMS)
    assert task["metrics"]["acc,none"]["value"] == pytest.approx(probe["acc"]["value"])
    assert task["metrics"]["acc,none"]["base"] == pytest.approx(probe["base"]["acc"]["value"])
    for key in ("right_to_wrong", "wrong_to_right", "both_right", "both_wrong"):
        assert task["paired"][key] == probe["paired"]["acc"][key]
    assert task["chance"] == pytest.approx(probe["chance"])
    assert "lm_eval:mixsd_toy_mc" in format_results(results)

    predictions = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    harness_rows = [p for p in predictions if p["split"] == "lm_eval:mixsd_toy_mc"]
    assert {p["who"] for p in harness_rows} == {"model", "base"} and len(harness_rows) == 2 * len(MC_ITEMS)

    cell = SimpleNamespace(
        name="c", group="g", family="sft", setting="", method="sft", lam=None, seed=0, settings=()
    )
    row = cell_row(cell, {"eval": {}, "retention": results}, {}, None, None)
    assert row["lm_eval_mixsd_toy_mc_acc"] == task["metrics"]["acc,none"]["value"]
    assert row["lm_eval_mixsd_toy_mc_right_to_wrong"] == task["paired"]["right_to_wrong"]
    assert row["lm_eval_mixsd_toy_mc_retention"] == task["retention"]

    # the report: the task's section and its items in the paired comparisons between cells (the eval's
    # files are named as in an experiment cell's folder)
    scores = item_scores(tmp_path)
    harness_items, probe_items = scores["lm_eval:mixsd_toy_mc (acc)"], scores["toy_mc (acc)"]
    assert list(harness_items.values()) == list(probe_items.values())  # same items, same order, same outcomes
    table = lm_eval_markdown([row])
    assert any(line.startswith("| g | 1 | mixsd_toy_mc | acc,none | ") for line in table)

    # the base's harness output is cached: a second model against the same base reuses it
    assert Path(results["lm_eval_base_cache"]).is_file()


def test_lm_eval_errors_name_the_task_before_any_model_loads(tmp_path):
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "far.yaml").write_text(
        "task: far_away\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'not-here.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: g\n"
    )
    missing_model = str(tmp_path / "no-model")  # loading it would fail: the errors must come first
    config = EvalConfig(
        model=missing_model,
        suite="retention",
        data=str(tmp_path),
        out=str(tmp_path / "r.json"),
        lm_eval_tasks="far_away",
        lm_eval_include=str(include),
    )
    with pytest.raises(InputError, match="lm-eval task 'far_away': could not load its data"):
        evaluate(config, progress=False)
    with pytest.raises(InputError, match="use --suite retention"):
        EvalConfig(model=missing_model, suite="qa", out="x.json", lm_eval_tasks="far_away")
    with pytest.raises(InputError, match="needs --lm-eval-tasks"):
        EvalConfig(model=missing_model, suite="retention", out="x.json", lm_eval_include=str(include))
    with pytest.raises(InputError, match="not a folder"):
        prepare("far_away", str(tmp_path / "nowhere"))
    # a task that would execute the model's output is refused too (its data is local here)
    data = write_jsonl(tmp_path / "code.jsonl", [{"q": "def f():", "a": "  return 1"}])
    (include / "code.yaml").write_text(
        f"task: runs_code\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\nunsafe_code: true\n"
    )
    with pytest.raises(InputError, match="lm-eval task 'runs_code' executes the model's generated code"):
        prepare("runs_code", str(include))


def test_unknown_task_name_is_refused(tmp_path):
    """Indexes the harness's built-in tasks (about half a minute on a busy 2-core machine)."""
    with pytest.raises(InputError, match="unknown lm-eval task 'hellaswagg'.*did you mean hellaswag"):
        prepare("hellaswagg", None)


def test_load_probe_reads_exported_data(tmp_path, probe_dir):
    """The exported data file keeps mixsd's fields: it is itself a probe file mixsd reads."""
    out = tmp_path / "export"
    export_lm_eval(LmEvalExportConfig(out=str(out), probes=str(probe_dir), limit=3))
    kind, items = load_probe(out / "mixsd_toy_mc.jsonl", None)
    assert kind is MULTIPLE_CHOICE and len(items) == 3
    assert [i["query"] for i in items] == [i["query"] for i in load_probe(probe_dir / "toy_mc.jsonl", 3)[1]]


def test_cli(tmp_path, probe_dir, capsys):
    """Both commands through `mixsd`: the export (OUT positional), and eval's options parsed, with
    one-line errors (status 2) for an existing export folder and lm-eval tasks outside the retention suite."""
    from mixsd.cli import main

    out = tmp_path / "export"
    assert main(["probes", "export-lm-eval", str(out), "--probes", str(probe_dir)]) == 0
    assert "lm_eval --model hf" in capsys.readouterr().out
    assert (out / "mixsd_toy_mc.yaml").is_file()
    assert main(["probes", "export-lm-eval", str(out), "--probes", str(probe_dir)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("export: already exists; choose a new folder (the export never overwrites)")
    )
    args = ["eval", "--model", "m", "--suite", "qa", "--out", str(tmp_path / "r.json")]
    assert main([*args, "--lm-eval-tasks", "mixsd_toy_mc", "--lm-eval-include", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field 'lm_eval_tasks': lm-eval tasks are retention probes" in err


def test_experiment_reports_lm_eval_retention(tmp_path, probe_dir, tiny_model_dir):
    """`retention: {lm_eval_tasks, lm_eval_include}` in a grid: every cell runs the task, its columns reach
    the results table and the report, a rerun reuses every stage, and a changed task file redoes the
    retention stages (the include folder's files are inputs of the stage)."""
    from mixsd.experiments.experiment import run_experiment
    from test_experiment import log_length, stage_log, tiny_grid

    include = tmp_path / "export"
    export_lm_eval(LmEvalExportConfig(out=str(include), probes=str(probe_dir)))
    retention = {
        "max_new_tokens": 4,
        "probes": False,
        "lm_eval_tasks": "mixsd_toy_mc",
        "lm_eval_include": str(include),
    }
    experiment = tiny_grid(tmp_path, tiny_model_dir, methods=["base", "sft"], retention=retention)
    result = run_experiment(experiment, show_progress=False)
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["base"]["lm_eval_mixsd_toy_mc_right_to_wrong"] == 0  # the base against itself
    assert isinstance(rows["sft-s0"]["lm_eval_mixsd_toy_mc_acc"], float)
    assert "lm_eval_mixsd_toy_mc_retention_raw" in (tmp_path / "run" / "results.csv").read_text()
    assert "## Retention through lm-evaluation-harness" in (tmp_path / "run" / "report.md").read_text()

    out = tmp_path / "run"
    since = log_length(out)
    run_experiment(experiment, show_progress=False)
    assert set(stage_log(out, since).values()) == {"reused"}
    with (include / "mixsd_toy_mc.yaml").open("a") as handle:
        handle.write("# edited\n")
    since = log_length(out)
    run_experiment(experiment, show_progress=False)
    redone = {key for key, action in stage_log(out, since).items() if action == "ran"}
    assert ("sft-s0", "retention") in redone and ("sft-s0", "train") not in redone
