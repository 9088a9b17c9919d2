"""The model resolver (mixsd.core.models.resolve_model): every name form to one handle, resolved once per model
per command, a `mixsd train` output folder accepted by every command, fingerprints cached by mtime."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

import mixsd.core.models
from conftest import write_jsonl
from mixsd.cli import main
from mixsd.core.models import ModelHandle, model_fingerprint, resolve_model
from mixsd.evaluation.analyze import NLLConfig, target_nll
from mixsd.evaluation.evaluate import EvalConfig, evaluate
from mixsd.method.mix_config import MixConfig
from mixsd.method.targets import mix
from mixsd.training.train import train
from mixsd.training.train_config import TrainConfig


@pytest.fixture
def train_output(tmp_path, tiny_model_dir) -> Path:
    """A folder laid out as `mixsd train` leaves it: the model in model/, the run's files beside it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "summary.json").write_text("{}", encoding="utf-8")
    return run


@pytest.fixture
def resolutions(monkeypatch) -> Counter:
    """Every call of the resolver, by the name it was given."""
    calls: Counter = Counter()
    real = mixsd.core.models.resolve_model

    def counting(name):
        calls[str(name)] += 1
        return real(name)

    monkeypatch.setattr(mixsd.core.models, "resolve_model", counting)
    return calls


def _mix_args(model: Path, corpus: Path, output: Path) -> list[str]:
    return [
        "mix",
        "--model", str(model),
        "--input", str(corpus),
        "--output", str(output),
        "--max-new-tokens", "8",
        "--retries", "0",
        "--on-failure", "keep",
        "--batch-size", "4",
        "--device", "cpu",
    ]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_name_form_resolves_to_its_folder(tmp_path, tiny_model_dir, train_output):
    assert resolve_model(tiny_model_dir).folder == tiny_model_dir
    handle = resolve_model(str(train_output))
    assert handle == ModelHandle(str(train_output), train_output / "model", None)
    assert handle.tokenizer_source() == str(train_output / "model") and handle.base() is None
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    lora = resolve_model(adapter)
    assert lora.folder == adapter and lora.base_name == str(tiny_model_dir)
    # an adapter saved without a tokenizer reads its base's; the base is resolved once, when first needed
    assert lora.tokenizer_source() == str(tiny_model_dir) and lora.base() is lora.base()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model(tmp_path / "empty")


def test_mix_takes_a_train_output_folder_like_eval(tmp_path, train_output, tiny_corpus):
    assert main(_mix_args(train_output / "model", tiny_corpus, tmp_path / "by-model.jsonl")) == 0
    assert main(_mix_args(train_output, tiny_corpus, tmp_path / "by-run.jsonl")) == 0
    by_run, by_model = _rows(tmp_path / "by-run.jsonl"), _rows(tmp_path / "by-model.jsonl")
    assert [row.pop("settings")["model"] for row in by_run] == [str(train_output)] * len(by_run)
    assert by_run and by_run == [{k: v for k, v in row.items() if k != "settings"} for row in by_model]
    # eval reads the same folder, and both name the model as written
    assert main(
        ["eval", "--model", str(train_output), "--suite", "qa", "--data", str(tiny_corpus), "--out",
         str(tmp_path / "eval.json"), "--max-new-tokens", "4", "--device", "cpu"]
    ) == 0  # fmt: skip
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["model"] == model_fingerprint(str(train_output))
    assert results["model"]["path"] == str(train_output / "model") and results["model"]["sha256"]


def test_each_command_resolves_each_model_once(
    tmp_path, train_output, tiny_model_dir, tiny_corpus, resolutions
):
    run = str(train_output)
    evaluate(
        EvalConfig(model=run, suite="qa", data=str(tiny_corpus), out=str(tmp_path / "e.json"), device="cpu"),
        progress=False,
    )
    assert resolutions == {run: 1}

    resolutions.clear()
    probes = tmp_path / "probes"
    probes.mkdir()
    write_jsonl(probes / "mc.jsonl", [{"id": "a", "query": "Q", "choices": ["x", "y"], "gold": 0}])
    evaluate(
        EvalConfig(
            model=run,
            base=str(tiny_model_dir),
            suite="retention",
            data=str(probes),
            out=str(tmp_path / "r.json"),
            device="cpu",
            limit=2,
            max_new_tokens=4,
            base_cache=False,
        ),
        progress=False,
    )
    assert resolutions == {run: 1, str(tiny_model_dir): 1}

    resolutions.clear()
    mix(
        MixConfig(
            model=run,
            input=str(tiny_corpus),
            output=str(tmp_path / "t.jsonl"),
            max_new_tokens=4,
            retries=0,
            on_failure="keep",
        ),
        progress=False,
    )
    assert resolutions == {run: 1}

    resolutions.clear()
    targets = _rows(tmp_path / "t.jsonl")
    assert targets
    target_nll(NLLConfig(model=run, targets=str(tmp_path / "t.jsonl"), device="cpu"))
    assert resolutions == {run: 1}

    resolutions.clear()  # training from a `mixsd train` output folder: the tokenizer and weights of one handle
    train(TrainConfig(model=run, targets=str(tmp_path / "t.jsonl"), out=str(tmp_path / "trained"), epochs=1,
                      batch_size=2, progress=False))  # fmt: skip
    assert resolutions == {run: 1}


def test_the_fingerprint_hashes_a_weight_file_once_per_state(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    hashed: Counter = Counter()
    real = mixsd.core.models.sha256_file

    def counting(path):
        hashed[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(mixsd.core.models, "sha256_file", counting)
    first = model_fingerprint(str(folder))
    assert model_fingerprint(str(folder)) == first and hashed["model.safetensors"] == 1
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert model_fingerprint(str(folder)) == first and hashed["model.safetensors"] == 2
    assert model_fingerprint(str(tmp_path / "missing")) == {
        "name": str(tmp_path / "missing"),
        "path": None,
        "sha256": None,
    }
