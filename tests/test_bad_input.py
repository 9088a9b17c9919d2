"""Bad input on the paths every command shares (issue 22): damaged weight files, models that need custom
code, YAML the strict reader refuses, renamed and misspelt options, inputs that are folders, symlink loops
or unreadable. Each case runs `mixsd` in-process and checks the one-line message and status 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from mixsd.cli import describe_error, main
from mixsd.core.files import InputError, read_yaml
from mixsd.core.weights import check_gguf, check_safetensors


def _refused(argv: list[str], capsys, *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# --------------------------------------------------------------------------------------------------
# Damaged weight files: every command that loads a model says which file and what is wrong
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Copies of the tiny model whose model.safetensors is cut in half or replaced by random bytes."""
    root = tmp_path_factory.mktemp("damaged")
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    damaged = {
        "truncated": weights[: len(weights) // 2],
        "garbage": rng.integers(0, 256, len(weights), dtype=np.uint8).tobytes(),
    }
    folders = {}
    for name, content in damaged.items():
        folder = root / name
        shutil.copytree(tiny_model_dir, folder)
        (folder / "model.safetensors").write_bytes(content)
        folders[name] = folder
    return folders


@pytest.fixture
def corpus_with_subjects(tmp_path) -> Path:
    rows = [
        {"id": "f0", "prompt": "Where is Zorb?", "answer": "The answer is Qz. \\boxed{Qz}", "subject": "Zorb"}
    ]
    return write_jsonl(tmp_path / "facts.jsonl", rows)


COMMANDS_THAT_LOAD = [
    ["mix", "--model", "{m}", "--input", "{c}", "--output", "{t}/o.jsonl", "--device", "cpu"],
    ["train", "--model", "{m}", "--targets", "{targets}", "--out", "{t}/run"],
    ["eval", "--model", "{m}", "--suite", "qa", "--data", "{c}", "--out", "{t}/eval.json", "--device", "cpu"],
    ["analyze", "nll", "--model", "{m}", "--targets", "{targets}", "--out", "{t}/nll.json"],
    ["analyze", "fisher", "--base", "{m}", "--model", "{m}", "--probe", "{c}", "--out", "{t}/f.json"],
    ["edit", "--model", "{m}", "--input", "{c}", "--out", "{t}/edit"],
]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("argv", COMMANDS_THAT_LOAD, ids=lambda argv: "-".join(argv[:2]).strip("-"))
def test_a_damaged_safetensors_file_is_one_line_in_every_command(
    tmp_path, tiny_model_dir, damaged_models, corpus_with_subjects, capsys, argv, damage
):
    targets = tmp_path / "targets.jsonl"
    assert main(["sft-targets", "--model", str(tiny_model_dir), "--input", str(corpus_with_subjects),
                 "--output", str(targets)]) == 0  # fmt: skip
    model = damaged_models[damage]
    values = {"m": model, "c": corpus_with_subjects, "t": tmp_path, "targets": targets}
    argv = [word.format(**values) for word in argv]
    expected = "truncated: its tensors need" if damage == "truncated" else "not a safetensors file"
    _refused(argv, capsys, str(model / "model.safetensors"), expected)


def _tiny_gguf(path: Path) -> Path:
    """A small, well-formed GGUF file (two tensors): what the checks must accept before they refuse."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((8, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_weight_checks_accept_whole_files(tmp_path, tiny_model_dir):
    check_safetensors(tiny_model_dir / "model.safetensors")
    check_gguf(_tiny_gguf(tmp_path / "whole.gguf"))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("garbage", "not a GGUF file: it does not start with the bytes GGUF"),
        ("header", "truncated: the file ends inside its header"),
        ("last byte", "truncated: its tensors need 416 bytes, the file holds 415"),
    ],
)
def test_a_damaged_gguf_file_is_one_line(tmp_path, tiny_corpus, capsys, monkeypatch, damage, expected):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    assert len(whole) == 416
    content = {
        "garbage": np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "header": whole[:40],
        "last byte": whole[:-1],
    }[damage]
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    argv = ["mix", "--model", str(model), "--input", str(tiny_corpus), "--output", str(tmp_path / "o.jsonl")]
    _refused(argv, capsys, f"mixsd mix: error: {model}: {expected}")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_model_that_needs_custom_code_names_the_option(tmp_path, tiny_model_dir, tiny_corpus, capsys):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "zorblet"
    config["auto_map"] = {"AutoConfig": "modeling_zorblet.ZorbletConfig",
                          "AutoModelForCausalLM": "modeling_zorblet.ZorbletForCausalLM"}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    for argv in (
        ["mix", "--model", str(model), "--input", str(tiny_corpus), "--output", str(tmp_path / "o.jsonl")],
        ["eval", "--model", str(model), "--suite", "qa", "--data", str(tiny_corpus), "--out", str(tmp_path / "e.json")],
    ):  # fmt: skip
        err = _refused(argv, capsys, str(model), "--trust-remote-code")
        assert "trust_remote_code=True" not in err


# --------------------------------------------------------------------------------------------------
# YAML: the key as written, its line; duplicates and scalars for lists refused
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("methods: sft\n", "line 2, field 'methods': expected a list of methods"),
        ("seeds: [0]\nseeds: [1]\n", "line 3: key 'seeds' is written twice in one mapping (first on line 2)"),
        ("train: {epochs: 2, epochs: 3}\n", "line 2: key 'epochs' is written twice"),
        ("curves:\n  limit: 5\n  every: 0\n", "line 4, field 'curves.every': must be >= 1"),
        ("curves: {limit: many}\n", "line 2, field 'curves.limit': expected an integer"),
        ("methods:\n  - base\n  - sft: {lr: [-1]}\n", "line 4, field 'methods[1].lr': must be >= 0"),
        ("train:\n  lr: -1\n", "line 3, field 'train.lr': must be >= 0"),
        ("retention: {data: [a]}\n", "line 2, field 'retention.data': expected text"),
        ("train: {lr: [}\n", "line 2: invalid YAML"),
    ],
)
def test_experiment_yaml_errors_name_the_key_as_written_and_its_line(
    tmp_path, tiny_model_dir, capsys, text, expected
):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"model: {tiny_model_dir}\n{text}")
    _refused(["experiment", str(grid), "--status"], capsys, f"{grid}, {expected}")


def test_read_yaml_records_the_line_of_every_key(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("name: x\nmethods:\n  - base\n  - mixsd: {lam: [0.3, 0.5]}\ntrain:\n  lr: 1.0e-4\n")
    document = read_yaml(path)
    assert document.data["methods"][1] == {"mixsd": {"lam": [0.3, 0.5]}}
    assert document.line(("methods", 1, "mixsd", "lam")) == 4
    assert document.line(("train", "lr")) == 6
    assert document.line(("train", "batch_size")) == 5  # not written: its section's line
    path.write_text("a: 1\nb: &base {x: 1}\nc:\n  <<: *base\n  x: 2\n")  # a merge key may be overridden
    assert read_yaml(path).data["c"] == {"x": 2}


# --------------------------------------------------------------------------------------------------
# Options: renamed spellings, misspellings
# --------------------------------------------------------------------------------------------------
def test_the_renamed_no_progress_still_works_with_a_warning(tmp_path, tiny_corpus, capsys, monkeypatch):
    import mixsd.training.train

    seen = []
    monkeypatch.setattr(mixsd.training.train, "train_command", seen.append)
    argv = [
        "train",
        "--model",
        "m",
        "--targets",
        str(tiny_corpus),
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert seen[0].disable_tqdm is True
    assert "warning: --no-progress is deprecated; use --progress false" in capsys.readouterr().err


def test_a_misspelt_option_is_one_line_with_the_close_match(tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "m", "--targets", "t", "--out", str(tmp_path), "--learnig-rate", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mixsd train: error: unrecognized arguments: --learnig-rate 1; did you mean --learning-rate? "
        "(`mixsd train --help` lists the options)"
    )


# --------------------------------------------------------------------------------------------------
# Inputs that are folders, symlink loops, or unreadable
# --------------------------------------------------------------------------------------------------
def test_a_folder_or_a_link_loop_is_not_reported_missing(tmp_path, tiny_model_dir, tiny_corpus, capsys):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path, problem in (
        (folder, "is a folder, not a file"),
        (tmp_path / "loop-a", "is a symbolic link loop"),
        (tmp_path / "dangling", f"is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"),
    ):
        argv = [
            "mix",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(path),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
        _refused(argv, capsys, f"{path}: {problem}")
        _refused(["experiment", str(path)], capsys, f"{path}: {problem}")
        argv = [
            "mix",
            "--model",
            str(path),
            "--input",
            str(tiny_corpus),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
        _refused(
            argv, capsys, f"{path}: {problem}" if path != folder else "is a folder but holds no config.json"
        )


def test_an_unreadable_input_is_not_told_to_choose_an_output(tmp_path, tiny_corpus, capsys, monkeypatch):
    original_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == tiny_corpus:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    argv = ["mix", "--model", "m", "--input", str(tiny_corpus), "--output", str(tmp_path / "o" / "o.jsonl")]
    err = _refused(argv, capsys, f"{tiny_corpus}: cannot read this input (Permission denied)")
    assert "output" not in err
    # an OSError from any other reader: the file exists and may not be read, so it is an input
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.R_OK)
    text = describe_error(PermissionError(errno.EACCES, "Permission denied", str(tiny_corpus)))
    assert text == f"{tiny_corpus}: Permission denied (an input you may not read: check its permissions)"
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    text = describe_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new.json")))
    assert text.endswith("(choose an output location you can write to)")


def test_input_error_keeps_its_bare_message():
    err = InputError("must be >= 1", "grid.yaml", 3, "train.epochs")
    assert (
        str(err) == "grid.yaml, line 3, field 'train.epochs': must be >= 1" and err.message == "must be >= 1"
    )
