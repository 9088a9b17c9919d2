"""`mixsd train` under `accelerate launch` with the shipped FSDP and DeepSpeed configs, on 2 CPU processes.

FSDP: torch runs FSDP2 on CPU (gloo), but accelerate switches to FSDP only on GPU-like devices and on CPU
trains with plain DDP instead, silently; so on CPU `mixsd train` refuses an FSDP request, in one line.
DeepSpeed ZeRO-2 does run on CPU (its CPU accelerator, gloo): the same trajectory as one process.
docs/training.md "Scaling out" has the measurements and the GPU commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixsd.core.files import InputError
from mixsd.training.train import _has_accelerator
from test_train import config_for, losses, run, tiny_model, tiny_tokenizer, write_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
on_cpu_only = pytest.mark.skipif(_has_accelerator(), reason="the refusal is for machines without a GPU")


def launch(tmp_path: Path, config_file: str, out: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file FILE --num_processes 2 -m mixsd.cli train` on the tiny model."""
    model = tmp_path / "tiny"
    if not model.exists():
        tiny_model().save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
    targets = tmp_path / "targets.jsonl"
    if not targets.exists():
        write_targets(targets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(29600 + os.getpid() % 1000)
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(CONFIGS / config_file), "--num_processes", "2", "--main_process_port", port),
        *("-m", "mixsd.cli", "train", "--model", str(model), "--targets", str(targets)),
        *("--out", str(tmp_path / out), "--batch-size", "4", "--epochs", "2", "--lr", "1e-2"),
        *("--save-every", "-1", "--progress", "false"),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@on_cpu_only
def test_fsdp_config_on_cpu_is_refused_instead_of_running_ddp(tmp_path):
    result = launch(tmp_path, "fsdp.yaml", "fsdp")
    assert result.returncode != 0
    # one error from each process; the two processes share stderr, so their lines may interleave
    assert result.stderr.count("mixsd train: error: field 'fsdp': FSDP runs only on GPUs") == 2
    assert not (tmp_path / "fsdp").exists()


@on_cpu_only
@pytest.mark.parametrize("how", ["option", "accelerate"])
def test_fsdp_request_is_refused_when_the_config_is_built(tmp_path, monkeypatch, how):
    if how == "accelerate":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP file
        options = {}
    else:
        options = {"fsdp": "full_shard auto_wrap"}
    with pytest.raises(InputError, match="field 'fsdp': FSDP runs only on GPUs"):
        config_for(tmp_path, "fsdp", **options)


def test_deepspeed_zero2_on_two_cpu_processes_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")  # optional; `pip install deepspeed` (its first run compiles a comm op)
    single = run(config_for(tmp_path, "single", batch_size=8, save_every=-1))
    result = launch(tmp_path, "deepspeed_zero2.yaml", "zero2", timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "zero2" / "summary.json").read_text())
    assert losses(summary) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert [h["tokens"] for h in summary["history"]] == [h["tokens"] for h in single["history"]]
