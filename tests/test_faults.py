"""Fault injection: kills, concurrent runs, full and read-only disks, and every class of bad option.

Kills are real: a `mixsd mix` subprocess (on the tiny model folder) is stopped with SIGKILL or SIGINT at
a chosen point, which a small wrapper around the CLI finds by patching the function that reaches it; the
rerun then goes through the ordinary CLI. Disk faults are injected OSErrors (a tmpfs needs privileges the
test machine may not have). Bad options run in-process with model loading patched to fail, so each case
also proves that nothing was loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.cli import main
from mixsd.core.files import InputError, lock_path, output_lock

# Runs `mixsd <args>` after arranging to signal itself at one point of the run.
#   argv: POINT N SIGNAL mixsd-args...
#   journal  after the N-th journal write (the header is the first)
#   torn     during the N-th journal write, with half of its bytes on disk
#   load     while the model loads (lock held, nothing journaled yet)
#   final    after the output file is written, before its summary and the journal cleanup
#   pause    after the N-th journal write, announce "paused" beside the output and wait for "go"
KILLER = r"""
import os, signal, sys, time
from pathlib import Path
import mixsd.core.files as files

point, count, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
args = sys.argv[4:]
# Ctrl-C as a terminal delivers it, also when the test runs in a background job, whose children inherit
# SIGINT ignored (POSIX, without job control): Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
calls = 0

def die():
    os.kill(os.getpid(), sig)
    time.sleep(30)  # SIGINT arrives as KeyboardInterrupt during this sleep; SIGKILL never returns

original_write = files.JournalWriter.write

def write(self, rows):
    global calls
    calls += 1
    if point == "torn" and calls == count:
        text = "".join(files.dumps(row) + "\n" for row in rows)
        self._handle.write(text[: len(text) // 2])
        self._handle.flush()
        os.fsync(self._handle.fileno())
        die()
    original_write(self, rows)
    if point == "journal" and calls == count:
        die()
    if point == "pause" and calls == count:
        folder = self.path.parent
        (folder / "paused").write_text(str(os.getpid()))
        while not (folder / "go").exists():
            time.sleep(0.05)

files.JournalWriter.write = write
if point == "load":
    import mixsd.core.models as models
    models.load_model = lambda *a, **k: die()
if point == "final":
    import mixsd.method.targets as targets
    targets.atomic_write_json = lambda *a, **k: die()

from mixsd.cli import main
sys.exit(main(args))
"""


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _killed_run(point: str, count: int, sig: str, args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", KILLER, point, str(count), sig, *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _mix_args(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    # A random model verifies nothing: every record takes all its attempts and is kept, unverified.
    return [
        "mix",
        "--model", str(model),
        "--input", str(corpus),
        "--output", str(output),
        "--max-new-tokens", "12",
        "--retries", "1",
        "--on-failure", "keep",
        "--batch-size", "4",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


LOGPROB_FIELDS = ("logprob_expert", "logprob_naive")
LOGPROB_TOLERANCE = 1e-4  # what docs/reliability.md promises for fp32 on one machine
# fidelity scores (mixsd.method.fidelity) derived from the log-probs: as close as the log-probs they sum or pick
DERIVED_FIELDS = ("min_expert_logprob", "naive_expert_nll")


def assert_same_targets(resumed: list[dict], reference: list[dict]) -> None:
    """Everything identical but the stored log-probs, which agree within LOGPROB_TOLERANCE."""
    assert [r["id"] for r in resumed] == [r["id"] for r in reference]
    for got, want in zip(resumed, reference, strict=True):
        assert {k: v for k, v in got.items() if k not in LOGPROB_FIELDS + DERIVED_FIELDS} == {
            k: v for k, v in want.items() if k not in LOGPROB_FIELDS + DERIVED_FIELDS
        }
        for name in DERIVED_FIELDS:
            assert got[name] == pytest.approx(want[name], abs=LOGPROB_TOLERANCE * len(got["target_ids"]))
        for name in LOGPROB_FIELDS:
            assert len(got[name]) == len(want[name])
            assert max((abs(a - b) for a, b in zip(got[name], want[name], strict=True)), default=0) <= (
                LOGPROB_TOLERANCE
            )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[dict]]:
    """An uninterrupted run: its corpus and its output rows."""
    folder = tmp_path_factory.mktemp("reference")
    rows = [
        {"id": f"f{i}", "prompt": f"Where is place {i}?", "answer": f"The answer is Q{i}z. \\boxed{{Q{i}z}}"}
        for i in range(12)
    ]
    corpus = write_jsonl(folder / "corpus.jsonl", rows)
    output = folder / "out.jsonl"
    assert main(_mix_args(tiny_model_dir, corpus, output)) == 0
    return corpus, _rows(output)


# --------------------------------------------------------------------------------------------------
# Kill and rerun
# --------------------------------------------------------------------------------------------------
KILL_POINTS = [
    pytest.param("load", 1, "SIGKILL", marks=pytest.mark.slow),
    ("journal", 4, "SIGKILL"),  # the header and three records journaled
    ("torn", 6, "SIGKILL"),  # a record's line cut in half on disk
    pytest.param("final", 1, "SIGKILL", marks=pytest.mark.slow),
    ("journal", 3, "SIGINT"),
    pytest.param("final", 1, "SIGINT", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("point", "count", "sig"), KILL_POINTS)
def test_mix_killed_then_rerun_matches_an_uninterrupted_run(
    tmp_path, tiny_model_dir, reference, point, count, sig
):
    corpus, expected = reference
    output = tmp_path / "out.jsonl"
    args = _mix_args(tiny_model_dir, corpus, output)
    run = _killed_run(point, count, sig, args)
    _, stderr = run.communicate(timeout=120)
    if sig == "SIGKILL":
        assert run.returncode == -signal.SIGKILL, stderr
        assert lock_path(output).exists()  # the dead run's lock file is left behind: a stale lock
    else:
        assert run.returncode == 130, stderr
        assert "interrupted; rerun the same command to resume" in stderr
        assert not lock_path(output).exists()
    if point != "final":
        assert not output.exists()  # nothing but the journal before the run completes

    assert main(args) == 0  # the rerun takes over any stale lock and resumes
    assert_same_targets(_rows(output), expected)
    assert not lock_path(output).exists()
    assert not list(tmp_path.glob("*.journal*"))


# --------------------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------------------
def test_second_run_on_the_same_output_refuses_at_once(
    tmp_path, tiny_model_dir, reference, capsys, monkeypatch
):
    corpus, expected = reference
    output = tmp_path / "out.jsonl"
    args = _mix_args(tiny_model_dir, corpus, output)
    first = _killed_run("pause", 3, "SIGKILL", args)  # holds the lock, two records journaled
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "paused").exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        journal = output.with_name(output.name + ".journal").read_bytes()
        _forbid_model_loading(monkeypatch)
        capsys.readouterr()
        started = time.perf_counter()
        assert main(args) == 2
        assert time.perf_counter() - started < 5
        message = capsys.readouterr().err.strip()
        assert "\n" not in message
        assert "another run is writing this output" in message
        assert f"pid {first.pid} on " in message
        # the refused run touched nothing of the first one
        assert output.with_name(output.name + ".journal").read_bytes() == journal
        (tmp_path / "go").write_text("")
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert_same_targets(_rows(output), expected)


def test_output_lock_nests_takes_over_stale_locks_and_names_a_live_holder(tmp_path):
    output = tmp_path / "out.jsonl"
    lock_path(output).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone"}))  # a dead run's file
    with output_lock(output) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        with output_lock(output):  # the same process: nests
            pass
        assert lock.exists()
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from mixsd.core.files import output_lock\nwith output_lock({str(output)!r}): pass",
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode != 0
        assert f"pid {os.getpid()} on " in probe.stderr
    assert not lock.exists()


# --------------------------------------------------------------------------------------------------
# Full and read-only disks
# --------------------------------------------------------------------------------------------------
def test_full_disk_keeps_the_old_output_names_the_path_and_resumes(
    tmp_path, tiny_model_dir, reference, capsys, monkeypatch
):
    corpus, expected = reference
    output = tmp_path / "out.jsonl"
    output.write_text("an earlier file\n")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # the disk fills up exactly when the final output's temporary file is flushed
        if re.fullmatch(
            rf"\.{re.escape(output.name)}\.\w+\.tmp", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        ):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    args = _mix_args(tiny_model_dir, corpus, output)
    capsys.readouterr()
    assert main(args) == 2
    message = capsys.readouterr().err.strip().split("\n")[-1]  # after the progress bar
    assert message.startswith(f"mixsd mix: error: {output}: No space left on device")
    assert output.read_text() == "an earlier file\n"
    assert not list(tmp_path.glob(".*.tmp")) and not lock_path(output).exists()  # nothing half-written
    assert output.with_name(output.name + ".journal").is_file()  # the decoded records are kept

    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the rerun reuses the journal
    assert main(args) == 0
    assert_same_targets(_rows(output), expected)


def test_read_only_location_is_refused_before_any_model_loads(
    tmp_path, tiny_model_dir, reference, capsys, monkeypatch
):
    corpus, _ = reference
    folder = tmp_path / "readonly"
    folder.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    _forbid_model_loading(monkeypatch)
    capsys.readouterr()
    assert main(_mix_args(tiny_model_dir, corpus, folder / "out.jsonl")) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"mixsd mix: error: {folder / 'out.jsonl.lock'}: Read-only file system")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_refused(tmp_path, tiny_model_dir, reference, capsys, monkeypatch):
    corpus, _ = reference
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    _forbid_model_loading(monkeypatch)
    assert main(_mix_args(tiny_model_dir, corpus, folder / "out.jsonl")) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_missing_output_folders_are_created(tmp_path, tiny_model_dir, reference):
    corpus, expected = reference
    output = tmp_path / "new" / "deeper" / "out.jsonl"
    assert main(_mix_args(tiny_model_dir, corpus, output)) == 0
    assert_same_targets(_rows(output), expected)


def test_a_failed_run_leaves_no_folder_it_created(tmp_path):
    output = tmp_path / "new" / "deeper" / "out.jsonl"
    with pytest.raises(InputError), output_lock(output):
        assert (tmp_path / "new" / "deeper").is_dir()
        raise InputError("a failure inside the run")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Bad options and bad input: one line, status 2, before any model is loaded, nothing written
# --------------------------------------------------------------------------------------------------
def _forbid_model_loading(monkeypatch) -> None:
    import mixsd.core.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    for name in ("load_model", "load_tokenizer", "load_config", "resolve_model"):
        monkeypatch.setattr(mixsd.core.models, name, refuse)


MIX_OPTIONS = [
    (["--lam", "1.5"], "lam"),
    (["--lam", "nan"], "lam"),
    (["--lam", "-0.1"], "lam"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--top-k", "0"], "top_k"),
    (["--batch-size", "0"], "batch_size"),
    (["--retries", "-1"], "retries"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--num-generations", "0"], "num_generations"),
]


def _assert_refused(argv: list[str], words: list[str], capsys, folder: Path) -> None:
    before = sorted(folder.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert sorted(folder.rglob("*")) == before  # nothing written, not even a lock file


@pytest.mark.parametrize(("option", "name"), MIX_OPTIONS)
def test_bad_mix_option(tmp_path, tiny_corpus, capsys, monkeypatch, option, name):
    _forbid_model_loading(monkeypatch)
    argv = [
        "mix",
        "--model",
        "m",
        "--input",
        str(tiny_corpus),
        "--output",
        str(tmp_path / "o.jsonl"),
        *option,
    ]
    _assert_refused(argv, [f"field '{name}'"], capsys, tmp_path)


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["eval", "--model", "m", "--suite", "qa", "--out", "{t}/r.json", "--batch-size", "0"], "batch_size"),
        (
            ["eval", "--model", "m", "--suite", "qa", "--out", "{t}/r.json", "--max-new-tokens", "0"],
            "max_new_tokens",
        ),
        (["eval", "--model", "m", "--suite", "qa", "--out", "{t}/r.json", "--limit", "0"], "limit"),
        (["eval", "--model", "m", "--suite", "qa", "--data", "{c}", "--out", "{c}"], "out"),
        (["analyze", "nll", "--model", "m", "--targets", "{c}", "--batch-size", "0"], "batch_size"),
        (["analyze", "nll", "--model", "m", "--targets", "{c}", "--out", "{c}"], "out"),
        (["analyze", "fisher", "--base", "m", "--model", "m", "--probe", "{c}", "--samples", "0"], "samples"),
        (["corpus", "kgfunc", "--out", "{t}/k", "--train", "0"], "train"),
        (["corpus", "import", "{c}", "--out", "{t}", "--limit", "0"], "limit"),
        (["probes", "fetch", "--out", "{t}/p", "--qa-wikidata-size", "-1"], "qa_wikidata_size"),
        (["mix", "--model", "m", "--input", "{c}", "--output", "{c}"], "output"),
        (["sft-targets", "--model", "m", "--input", "{c}", "--output", "{c}"], "output"),
    ],
)
def test_bad_option_of_every_command(tmp_path, tiny_corpus, capsys, monkeypatch, argv, name):
    _forbid_model_loading(monkeypatch)
    argv = [a.format(t=tmp_path, c=tiny_corpus) for a in argv]
    _assert_refused(argv, [f"field '{name}'"], capsys, tmp_path)


def test_output_equal_to_input_through_another_spelling(tmp_path, tiny_corpus, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / tiny_corpus.name
    argv = ["mix", "--model", "m", "--input", str(tiny_corpus), "--output", str(same)]
    _assert_refused(argv, ["is the same file as --input"], capsys, tmp_path)
    argv = ["corpus", "import", str(tiny_corpus), "--out", str(tmp_path), "--format", "qa-jsonl"]
    tiny_corpus.rename(tmp_path / "train.jsonl")
    argv[2] = str(tmp_path / "train.jsonl")
    _assert_refused(argv, ["is the same file as --file"], capsys, tmp_path)


def test_python_api_and_yaml_values_are_checked_too():
    from mixsd.evaluation.evaluate import EvalConfig
    from mixsd.method.mix_config import MixConfig

    for bad in ({"lam": True}, {"lam": "0.3"}, {"top_k": 2.5}, {"on_failure": "skip"}, {"dtype": "int8"}):
        with pytest.raises(InputError, match=f"field '{next(iter(bad))}'"):
            MixConfig(model="m", input="a.jsonl", output="b.jsonl", **bad)
    with pytest.raises(InputError, match="field 'suite'"):
        EvalConfig(model="m", suite="everything", out="r.json")
    MixConfig(model="m", input="a.jsonl", output="b.jsonl", lam=1, temperature=0)  # ints are numbers


def test_non_utf8_corpus_names_file_and_line(tmp_path, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"prompt": "a?", "answer": "b"}\n{"prompt": "caf\xe9?", "answer": "c"}\n')
    argv = ["mix", "--model", "m", "--input", str(corpus), "--output", str(tmp_path / "o.jsonl")]
    _assert_refused(argv, [f"{corpus}, line 2: not UTF-8 text"], capsys, tmp_path)


def test_non_utf8_csv_import_names_file_and_line(tmp_path, capsys):
    source = tmp_path / "facts.csv"
    source.write_bytes(b"question,answer\nWhere?,Here\nCaf\xe9?,There\n")
    argv = ["corpus", "import", str(source), "--format", "csv", "--out", str(tmp_path / "out")]
    _assert_refused(argv, [f"{source}, line 3: not UTF-8 text (byte 0xe9)"], capsys, tmp_path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    from mixsd.core.records import load_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'\xef\xbb\xbf{"id": "x", "prompt": "a?", "answer": "b"}\n')
    assert [fact.id for fact in load_corpus(corpus)] == ["x"]


def test_booleans_are_no_ids_or_token_ids(tmp_path):
    from mixsd.core.records import load_corpus, load_targets

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": True, "prompt": "a?", "answer": "b"}])
    with pytest.raises(InputError, match="line 1, field 'id'"):
        load_corpus(corpus)
    assert [
        f.id
        for f in load_corpus(write_jsonl(tmp_path / "n.jsonl", [{"id": 7, "prompt": "a", "answer": "b"}]))
    ] == ["7"]
    for field, ids in (("prompt_ids", [1, True]), ("target_ids", [False])):
        row = {"id": "x", "prompt_ids": [1, 2], "target_ids": [3], field: ids}
        with pytest.raises(InputError, match=f"field '{field}'"):
            load_targets(write_jsonl(tmp_path / "t.jsonl", [row]))


def test_unknown_model_or_alias_typo_is_one_clear_line(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, words in (
        ("smolm2-135m", ["no model 'smolm2-135m'", "aliases: smollm2-135m", "did you mean 'smollm2-135m'"]),
        ("nobody/no-such-model-xyz", ["no model 'nobody/no-such-model-xyz'", "no such hub model"]),
        (str(tmp_path / "missing-folder"), ["no such local folder"]),
    ):
        argv = [
            "mix",
            "--model",
            name,
            "--input",
            str(tiny_corpus),
            "--output",
            str(tmp_path / "o" / "o.jsonl"),
        ]
        _assert_refused(argv, words, capsys, tmp_path)


# --------------------------------------------------------------------------------------------------
# Records that `train` would refuse are never written
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory) -> Path:
    """A tiny model that holds only 300 positions, so a long prompt does not fit."""
    folder = tmp_path_factory.mktemp("short-context")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer), max_positions=300).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _long_and_short_corpus(folder: Path) -> Path:
    return write_jsonl(
        folder / "corpus.jsonl",
        [
            {"id": "short", "prompt": "Where is X?", "answer": "In Y. \\boxed{Y}"},
            {"id": "long", "prompt": "Where is " + "very " * 70 + "X?", "answer": "In Y. \\boxed{Y}"},
        ],
    )


def test_sft_targets_drops_prompts_the_model_cannot_hold(tmp_path, short_context_model, capsys):
    from mixsd.core.records import load_targets
    from mixsd.training.train import target_examples

    corpus = _long_and_short_corpus(tmp_path)
    output = tmp_path / "sft.jsonl"
    assert (
        main(
            [
                "sft-targets",
                "--model",
                str(short_context_model),
                "--input",
                str(corpus),
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert (
        "dropped 1 of 2 records longer than the model's context (300 tokens): long" in capsys.readouterr().err
    )
    rows = load_targets(output)
    assert [r["id"] for r in rows] == ["short"]
    target_examples(rows, context_limit=300)  # what `train` checks: accepted


def test_mix_keep_never_writes_a_record_without_a_target(tmp_path, short_context_model):
    from mixsd.core.records import load_targets

    corpus = _long_and_short_corpus(tmp_path)
    output = tmp_path / "mix.jsonl"
    args = ["mix", "--model", str(short_context_model), "--input", str(corpus), "--output", str(output)]
    assert (
        main([*args, "--max-new-tokens", "8", "--retries", "0", "--on-failure", "keep", "--device", "cpu"])
        == 0
    )
    assert [r["id"] for r in load_targets(output)] == ["short"]  # load_targets refuses an empty target
    summary = json.loads(output.with_name("mix.summary.json").read_text())
    assert summary["prompt_too_long"] == 1


def test_an_unknown_option_is_one_usage_line_not_a_traceback(capsys):
    from mixsd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["experiment", "--config", "grid.yaml", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --dry-run" in err and "Traceback" not in err
