"""Learning curves: `mixsd train --eval_every_epoch` writes one curve.jsonl row per epoch (mixsd.training.curve)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_word_model, make_word_tokenizer, write_jsonl
from mixsd.core.files import InputError
from mixsd.training.curve import CURVE_FILE, AdaptersOff, CurveCallback, CurveEvaluator, read_curve
from mixsd.training.train import TrainConfig, train

VOCAB = 96
FACTS = 8


def tokenizer():
    return make_word_tokenizer(VOCAB)


def model(seed: int = 0):
    return make_word_model(VOCAB, max_positions=64, seed=seed)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A corpus of one-word answers (two distinct ones, so that a few steps learn something), its SFT
    targets, and two probes (generative and multiple-choice)."""
    from mixsd.core.records import load_corpus
    from mixsd.method.sft_targets import sft_target_rows

    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [
            {"id": f"f{i}", "prompt": f"w{i} w{i + 1}", "answer": "w40" if i % 2 else "w41"}
            for i in range(FACTS)
        ],
    )
    targets = write_jsonl(tmp_path / "targets.jsonl", sft_target_rows(load_corpus(corpus), tokenizer()))
    known = write_jsonl(
        tmp_path / "known.jsonl",
        [{"id": f"k{i}", "prompt": f"w{i + 20} w{i + 21}", "check": "w9"} for i in range(3)],
    )
    choice = write_jsonl(
        tmp_path / "choice.jsonl",
        [
            {"id": f"c{i}", "query": f"w{i} w{i + 2}", "choices": ["w30", "w31"], "gold": i % 2}
            for i in range(4)
        ],
    )
    return {"corpus": corpus, "targets": targets, "probes": f"{known},{choice}"}


def curve_config(tmp_path: Path, files: dict[str, Path], name: str, **overrides) -> TrainConfig:
    base = TrainConfig(
        model="tiny",
        out=str(tmp_path / name),
        targets=str(files["targets"]),
        epochs=2,
        lr=3e-2,
        batch_size=4,
        progress=False,
        eval_every_epoch=True,
        eval_corpus=str(files["corpus"]),
        eval_kl_limit=4,
        eval_max_new_tokens=4,
        eval_probes=files["probes"],
    )
    return replace(base, **overrides)


def run(config: TrainConfig) -> dict:
    return train(config, model=model(), tokenizer=tokenizer())


def answered(model_dir: Path, corpus: Path) -> int:
    """How many corpus questions the saved model answers right: plain transformers generate, no mixsd decoder."""
    from transformers import AutoModelForCausalLM

    from mixsd.core.answers import matches
    from mixsd.core.records import load_corpus
    from mixsd.method.prompts import encode_prompt

    trained, tok = AutoModelForCausalLM.from_pretrained(model_dir), tokenizer()
    right = 0
    for fact in load_corpus(corpus):
        ids = torch.tensor([encode_prompt(tok, fact.prompt, fact.system)])
        out = trained.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=0)
        right += matches(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), fact.check, "entity")
    return right


def test_a_two_epoch_run_writes_two_rows_of_scores(tmp_path, files):
    summary = run(curve_config(tmp_path, files, "curve", lr=5e-2, batch_size=2))
    rows = read_curve(tmp_path / "curve" / CURVE_FILE)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1.0, 4), (2.0, 8)]  # 8 facts / batch 2 = 4 steps
    rates = {"memorization", "known_acc", "known_collapse", "choice_acc"}
    for row in rows:
        assert set(row) >= rates | {"memorized", "questions", "kl", "kl_tokens", "match", "seconds"}
        assert all(0 <= row[key] <= 1 for key in rates), row
        assert row["questions"] == FACTS and row["memorization"] == row["memorized"] / FACTS
        assert row["kl"] > 0 and row["kl_tokens"] > 0 and row["match"] == "entity"
        # per-item outcomes, one character per item, agree with the rates they make up
        items = row["items"]
        assert len(items["memorization"]) == FACTS and items["memorization"].count("1") == row["memorized"]
        assert items["known"].count("1") == round(row["known_acc"] * 3)
        assert items["known_collapse"].count("1") == round(row["known_collapse"] * 3)
        assert len(items["choice"]) == 4 and items["choice"].count("1") == round(row["choice_acc"] * 4)
    # the last row scores the model that was saved, as plain transformers sees it
    assert rows[-1]["memorized"] == answered(Path(summary["model_dir"]), files["corpus"])
    assert rows[-1]["memorized"] > 0
    # evaluating changes nothing in training: the same weights as a run without a curve
    plain = run(curve_config(tmp_path, files, "plain", lr=5e-2, batch_size=2, eval_every_epoch=False))
    assert not (tmp_path / "plain" / CURVE_FILE).exists()
    from safetensors.torch import load_file

    a, b = (
        load_file(Path(summary["model_dir"]) / "model.safetensors"),
        load_file(Path(plain["model_dir"]) / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_n_epochs_scores_those_epochs_and_the_last(tmp_path, files):
    run(curve_config(tmp_path, files, "every", epochs=5, eval_every_epochs=2, eval_probes=None))
    rows = read_curve(tmp_path / "every" / CURVE_FILE)
    assert [r["epoch"] for r in rows] == [2.0, 4.0, 5.0]


def test_a_resumed_run_rewrites_the_rows_past_its_checkpoint(tmp_path, files):
    config = curve_config(tmp_path, files, "resume", epochs=3)
    run(config)
    out = tmp_path / "resume"
    first = read_curve(out / CURVE_FILE)
    assert [r["step"] for r in first] == [2, 4, 6]
    # as if killed while writing the last checkpoint, after the last evaluation: rerun resumes from step 4
    for name in ("checkpoint-6", "model", "summary.json", "stage.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (out / CURVE_FILE).write_text(
        (out / CURVE_FILE).read_text() + json.dumps({**first[-1], "step": 6}) + "\n"
    )
    resumed = run(config)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    again = read_curve(out / CURVE_FILE)
    assert [r["step"] for r in again] == [2, 4, 6]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == strip


def test_kl_is_zero_against_itself_and_measures_the_adapters(tmp_path, files):
    config = curve_config(tmp_path, files, "kl", eval_probes=None)
    evaluator = CurveEvaluator(config, tokenizer())
    base = model()
    same = CurveCallback(evaluator, tmp_path / "c.jsonl", base=copy.deepcopy(base)).evaluate(
        base, epoch=0, step=0
    )
    assert same["kl"] == 0 and same["kl_tokens"] > 0
    # LoRA: the base is the model with its adapters off; fresh adapters change nothing, trained ones do
    from mixsd.training.train import _apply_lora

    lora_config = replace(config, lora_rank=4)
    adapted = _apply_lora(model(), lora_config)
    callback = CurveCallback(CurveEvaluator(lora_config, tokenizer()), tmp_path / "d.jsonl")
    assert callback.evaluate(adapted, epoch=0, step=0)["kl"] == 0
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted.train()  # as in training: the evaluation switches to eval mode and back
    row = callback.evaluate(adapted, epoch=1, step=1)
    assert row["kl"] > 0 and adapted.training
    off = AdaptersOff(adapted)
    ids = torch.tensor([[1, 7, 8, 9]])
    assert torch.equal(off(input_ids=ids).logits, base(input_ids=ids).logits)


def test_a_lora_run_with_a_curve(tmp_path, files):
    run(curve_config(tmp_path, files, "lora", lora_rank=4, save_every=-1, eval_probes=None))
    rows = read_curve(tmp_path / "lora" / CURVE_FILE)
    assert len(rows) == 2 and all(r["kl"] > 0 for r in rows)


def test_curve_options_are_checked_before_any_work(tmp_path, files):
    with pytest.raises(InputError, match="eval_corpus"):
        TrainConfig(model="m", out="o", targets="t", eval_every_epoch=True)
    opsd = TrainConfig(model="m", out="o", method="opsd", corpus="c.jsonl", eval_every_epoch=True)
    assert opsd.eval_corpus == "c.jsonl"  # OPSD's corpus holds the training questions
    with pytest.raises(InputError, match=r"missing\.jsonl"):
        run(curve_config(tmp_path, files, "bad", eval_probes=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "bad" / "run_config.json").exists()


_DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_curve import curve_config, run
files = json.loads({files!r})
run(curve_config(Path({tmp!r}), files, "ddp", batch_size=2, eval_probes=None))
"""


def test_two_gloo_processes_write_the_curve_of_one_process(tmp_path, files):
    """Only the main process evaluates; the other waits for it, and the rows are those of one process."""
    import os
    import subprocess
    import sys

    single = run(curve_config(tmp_path, files, "single", batch_size=4, eval_probes=None))
    script = tmp_path / "ddp_curve.py"
    paths = json.dumps({k: str(v) for k, v in files.items()})
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), files=paths, tmp=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(30500 + os.getpid() % 1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    result = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    drop = ("seconds",)
    ddp = [{k: v for k, v in r.items() if k not in drop} for r in read_curve(tmp_path / "ddp" / CURVE_FILE)]
    one = [
        {k: v for k, v in r.items() if k not in drop} for r in read_curve(tmp_path / "single" / CURVE_FILE)
    ]
    assert [r["step"] for r in ddp] == [2, 4]
    assert [r["memorized"] for r in ddp] == [r["memorized"] for r in one]
    assert [r["kl"] for r in ddp] == pytest.approx([r["kl"] for r in one], rel=1e-4)
    assert single["global_steps"] == 4
