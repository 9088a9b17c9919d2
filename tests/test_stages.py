"""mixsd.core.stages: an output is reused only while the settings, inputs and upstream runs it recorded hold."""

from __future__ import annotations

import json
import os

import pytest

from mixsd.core.stages import Stage, canonical_json


class Producer:
    """A produce() that writes `text` to the stage's output and remembers how it was called."""

    def __init__(self, path, text="made"):
        self.path, self.text, self.calls = path, text, []

    def __call__(self, discard: bool) -> None:
        self.calls.append(discard)
        self.path.write_text(self.text)


def test_fresh_stage_runs_once_then_is_reused(tmp_path):
    out = tmp_path / "out.txt"
    make = Producer(out)
    stage = Stage("s", out, {"lr": 0.1})
    assert stage.status() == "missing"
    assert stage.run(make) is True and make.calls == [False]
    assert stage.status() == "current"
    assert Stage("s", out, {"lr": 0.1}).run(make) is False and make.calls == [False]
    record = json.loads((tmp_path / "out.txt.stage.json").read_text())
    assert record["state"] == "done" and record["description"]["settings"] == {"lr": 0.1}
    assert record["fingerprint"] == stage.fingerprint()


def test_changed_settings_redo_and_discard(tmp_path):
    out = tmp_path / "out.txt"
    make = Producer(out)
    Stage("s", out, {"lr": 0.1, "on_failure": "drop"}).run(make)
    changed = Stage("s", out, {"lr": 0.1, "on_failure": "keep"})
    assert changed.status() == "stale" and changed.changes() == ["settings.on_failure"]
    assert changed.run(make) is True and make.calls == [False, True]  # other settings' leftovers: discard
    assert changed.is_current() and not Stage("s", out, {"lr": 0.1, "on_failure": "drop"}).is_current()


def test_settings_compare_as_json(tmp_path):
    """A tuple and the list read back from a record, or a key order, are the same settings."""
    out = tmp_path / "out.txt"
    Stage("s", out, {"a": (1, 2), "b": 1}).run(Producer(out))
    assert Stage("s", out, {"b": 1, "a": [1, 2]}).is_current()
    assert canonical_json({"b": 1, "a": 2}) == canonical_json({"a": 2, "b": 1})


def test_inputs_count_by_content_not_by_mtime(tmp_path):
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("one")
    Stage("s", out, {}, inputs=[source]).run(Producer(out))
    source.write_text("one")  # rewritten, same bytes
    os.utime(source, (1, 1))
    assert Stage("s", out, {}, inputs=[source]).is_current()
    source.write_text("two")
    stage = Stage("s", out, {}, inputs=[source])
    assert not stage.is_current() and stage.changes() == [f"inputs.{source}"]


def test_downstream_follows_its_upstream(tmp_path):
    a_out, b_out = tmp_path / "a.txt", tmp_path / "b.txt"
    make_b = Producer(b_out)

    def chain(lr):
        a = Stage("a", a_out, {"lr": lr})
        return a, Stage("b", b_out, {"limit": 4}, upstream=[a])

    a, b = chain(0.1)
    a.run(Producer(a_out))
    b.run(make_b)
    assert b.is_current()
    # upstream settings changed: downstream is stale before the upstream is even redone
    a2, b2 = chain(0.2)
    assert not b2.is_current() and "upstream.a" in b2.changes()
    a2.run(Producer(a_out))
    assert b2.run(make_b) is True
    # upstream redone with the same settings (e.g. --overwrite): downstream is redone too
    a2.run(Producer(a_out), force=True)
    assert not b2.is_current() and b2.changes() == ["upstream.a redone"]
    assert b2.run(make_b) is True and b2.is_current()


def test_unfinished_run_is_resumable_and_a_crash_never_vouches_for_new_files(tmp_path):
    out = tmp_path / "out.txt"
    Stage("s", out, {"lr": 0.1}).run(Producer(out, "old"))

    def crash(discard):
        out.write_text("new")  # output replaced, then the process dies before recording it
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage("s", out, {"lr": 0.2}).run(crash)
    # the old settings' record is gone: the new file is not taken for the old settings' output
    assert Stage("s", out, {"lr": 0.1}).status() == "stale"
    resumed = Producer(out)
    same = Stage("s", out, {"lr": 0.2})
    assert same.status() == "resumable" and same.changes() == ["unfinished"]
    same.run(resumed)
    assert resumed.calls == [False]  # resume: keep what the unfinished run of these settings left


def test_missing_output_or_torn_record_is_not_current(tmp_path):
    out, extra = tmp_path / "out.txt", tmp_path / "summary.json"
    stage = Stage("s", [out, extra], {})
    out.write_text("x")
    extra.write_text("{}")
    stage.finish()
    assert stage.is_current()
    extra.unlink()
    assert stage.status() == "stale" and stage.changes() == ["output missing"]
    extra.write_text("{}")
    stage.record.write_text('{"state": "do')
    assert stage.recorded() is None and stage.status() == "stale"


def test_settings_function_is_read_when_the_fingerprint_is_taken(tmp_path):
    """A stage planned before its upstream wrote the file its settings hash sees the new file."""
    source, out = tmp_path / "targets.jsonl", tmp_path / "out.txt"
    source.write_text("v1")
    stage = Stage("s", out, lambda: {"targets": source.read_text()})
    stage.run(Producer(out))
    source.write_text("v2")
    assert not stage.is_current()


def test_version_is_part_of_the_fingerprint(tmp_path):
    out = tmp_path / "out.txt"
    Stage("s", out, {}, version="1.0").run(Producer(out))
    assert Stage("s", out, {}, version="1.0").is_current()
    assert Stage("s", out, {}, version="1.1").changes() == ["version"]


def test_mix_rerun_with_another_failure_policy_is_redone(tiny_model_dir, tiny_corpus, tmp_path):
    """Issue 9: `on_failure` is part of mix's settings (a rerun with another policy returned the old file)."""
    from mixsd.method.mix_config import MixConfig
    from mixsd.method.targets import mix

    def run(policy):
        config = MixConfig(
            model=str(tiny_model_dir),
            input=str(tiny_corpus),
            output=str(tmp_path / "t.jsonl"),
            max_new_tokens=4,
            verify="strict",
            retries=0,
            on_failure=policy,
        )
        return mix(config, progress=False)  # a random model never writes \boxed{Q0z}: every record fails

    assert run("drop")["written"] == 0
    summary = run("keep")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert summary["written"] == 12 and len(lines) == 12
    record = json.loads((tmp_path / "t.jsonl.stage.json").read_text())
    assert record["state"] == "done" and record["description"]["settings"]["on_failure"] == "keep"
