"""Probe fetching on a tiny synthetic bigbench sdist of the real layout; pip failures explained."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from mixsd.cli import main
from mixsd.core.files import InputError
from mixsd.corpora import probes
from mixsd.corpora.probes import (
    ProbesFetchConfig,
    download_sdist,
    fetch_probes,
    read_members,
    wikidata_relation,
)

TOP = "bigbench-1.0.0/"
CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Peru", "Lima"),
    ("Chad", "N'Djamena"),
    ("Laos", "Vientiane"),
]


def task_files() -> dict[str, object]:
    general = {
        "name": "general_knowledge",
        "examples": [
            {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1, "six": 0}},
            {
                "input": "What color is a tongue?",
                "target_scores": {"red": 1, "pink": 1, "blue": 0},
            },  # two right
            {"input": "How many eyes do horses have?", "target_scores": {"two": 1, "four": 0, "none": 0}},
        ],
    }
    social = {
        "name": "social_iqa",
        "examples": [
            {
                "input": "Tracy stayed out. What does Tracy need to do before this? ",
                "target_scores": {"Make a plan": 0, "Go home": 0, "Find somewhere to go": 1},
            }
        ],
    }
    wikidata = {
        "name": "qa_wikidata",
        "examples": [{"input": f"The capital of {c} is", "target": t} for c, t in CAPITALS]
        + [
            {"input": "The sport played by Ann Lee is", "target": ["tennis", "lawn tennis"]},
            {"input": "The sport played by Bo Kim is", "target": "golf"},
            {"input": "Chicago shares a border with", "target": "Evanston"},
        ],
    }
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {"context": "Super Bowl 50 was a game.", "qas": []},
                    {"context": "The Panthers lost.", "qas": []},
                ],
            },
            {"title": "Warsaw", "paragraphs": [{"context": "Warsaw is a city.", "qas": []}]},
        ],
    }
    return {
        "general_knowledge/task.json": general,
        "social_iqa/task.json": social,
        "qa_wikidata/task.json": wikidata,
        "squad_shifts/squaddev_v1.1.json": squad,
        "squad_shifts/nyt_v1.0.json": {"data": []},
        "unrelated_task/task.json": {"examples": []},
    }


def make_sdist(path: Path, files: dict[str, object] | None = None) -> Path:
    files = task_files() if files is None else files
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [("README.md", "# BIG-bench"), *files.items()]:
            inner = name if name == "README.md" else f"bigbench/benchmark_tasks/{name}"
            data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
            info = tarfile.TarInfo(TOP + inner)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path) -> Path:
    return make_sdist(tmp_path / "bigbench-1.0.0.tar.gz")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fetch_from_sdist(tmp_path, sdist):
    out = tmp_path / "probes"
    manifest = fetch_probes(ProbesFetchConfig(out=str(out), sdist=str(sdist)))
    assert sorted(p.name for p in out.iterdir()) == [
        "general_knowledge.jsonl",
        "manifest.json",
        "qa_wikidata.jsonl",
        "social_iqa.jsonl",
        "squad_paragraphs.jsonl",
    ]
    general = read(out / "general_knowledge.jsonl")
    assert general[0] == {
        "id": "general_knowledge-00000",
        "query": "Question: How many legs do horses have?\nAnswer:",
        "choices": ["two", "four", "six"],
        "gold": 1,
    }
    assert [g["id"] for g in general] == [
        "general_knowledge-00000",
        "general_knowledge-00002",
    ]  # two-right dropped
    assert manifest["notes"]["general_knowledge.jsonl"]["dropped"] == 1
    (social,) = read(out / "social_iqa.jsonl")
    assert social["choices"][social["gold"]] == "Find somewhere to go"
    assert social["query"].endswith("before this?\nAnswer:")
    wikidata = read(out / "qa_wikidata.jsonl")
    assert len(wikidata) == len(CAPITALS)  # the sports and the border item have too few same-relation answers
    gold_by_query = {f"The capital of {c} is": t for c, t in CAPITALS}
    capitals = {t for _, t in CAPITALS}
    for item in wikidata:
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        assert item["choices"][item["gold"]] == gold_by_query[item["query"]]
        assert set(item["choices"]) <= capitals  # distractors from the same relation
    assert len({item["gold"] for item in wikidata}) > 1  # the right answer is not always in one place
    squad = read(out / "squad_paragraphs.jsonl")
    assert [(s["id"], s["text"]) for s in squad] == [
        ("squad-00-000", "Super Bowl 50 was a game."),
        ("squad-00-001", "The Panthers lost."),
        ("squad-01-000", "Warsaw is a city."),
    ]
    assert set(manifest["licenses"]) == set(manifest["files"])
    assert manifest["licenses"]["squad_paragraphs.jsonl"]["license"] == "CC-BY-SA-4.0"
    assert manifest["files"]["qa_wikidata.jsonl"]["records"] == len(CAPITALS)
    assert manifest["source"]["name"] == "bigbench-1.0.0.tar.gz"


def test_deterministic_sample_and_size_option(tmp_path, sdist):
    a = fetch_probes(ProbesFetchConfig(out=str(tmp_path / "a"), sdist=str(sdist), qa_wikidata_size=4))
    b = fetch_probes(ProbesFetchConfig(out=str(tmp_path / "b"), sdist=str(sdist), qa_wikidata_size=4))
    c = fetch_probes(ProbesFetchConfig(out=str(tmp_path / "c"), sdist=str(sdist), qa_wikidata_size=4, seed=1))
    assert a["files"] == b["files"]
    assert a["files"]["qa_wikidata.jsonl"]["records"] == 4
    assert a["files"]["qa_wikidata.jsonl"]["sha256"] != c["files"]["qa_wikidata.jsonl"]["sha256"]


def test_wikidata_relation():
    assert wikidata_relation("The capital of France is") == "The capital of _ is"
    assert wikidata_relation("The sport played by A. J. Burnett is") == "The sport played by _ is"
    assert wikidata_relation("875 North Michigan Avenue is located in") == "_ located in"


def test_missing_task_file_is_reported(tmp_path):
    files = task_files()
    del files["social_iqa/task.json"]
    broken = make_sdist(tmp_path / "x.tar.gz", files)
    with pytest.raises(InputError, match="lacks bigbench/benchmark_tasks/social_iqa/task.json"):
        read_members(broken)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(InputError, match="not a readable .tar.gz"):
        read_members(junk)


def fake_pip(tmp_path: Path, version: str, download: str) -> str:
    """A stand-in pip: prints `version`, and on `download` runs the shell snippet `download`."""
    script = tmp_path / f"pip-{version}"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "pip {version} from /somewhere (python 3.11)"; exit 0; fi\n'
        f"{download}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_pip_26_is_refused_with_an_explanation(tmp_path):
    pip = fake_pip(tmp_path, "26.0.1", "exit 1")
    with pytest.raises(InputError, match=r"pip 26\.0\.1 found.*pip < 26.*--sdist"):
        download_sdist(pip, tmp_path / "downloads")


def test_failed_download_shows_pip_output(tmp_path):
    pip = fake_pip(
        tmp_path, "23.2.1", 'echo "ERROR: No matching distribution found for bigbench==1.0.0" >&2; exit 1'
    )
    with pytest.raises(
        InputError, match=r"(?s)failed \(exit 1\):\nERROR: No matching distribution.*--sdist PATH"
    ):
        download_sdist(pip, tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []  # no staging folder left behind


def test_download_lands_in_cache_and_is_reused(tmp_path, sdist):
    # Fake pip "downloads" by copying our tarball into the -d folder (the last argument).
    pip = fake_pip(tmp_path, "23.2.1", f'for last; do :; done; cp "{sdist}" "$last/"')
    downloads = tmp_path / "downloads"
    path = download_sdist(pip, downloads)
    assert path == downloads / "bigbench-1.0.0.tar.gz" and path.read_bytes() == sdist.read_bytes()
    failing = fake_pip(tmp_path, "23.0", "exit 1")
    assert download_sdist(failing, downloads) == path  # cached: pip is not called again


def test_default_download_is_checksummed(tmp_path, sdist, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "downloads" / "bigbench-1.0.0.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(sdist.read_bytes())
    with pytest.raises(InputError, match="is not that of PyPI's"):
        fetch_probes(ProbesFetchConfig())
    monkeypatch.setattr(probes, "SDIST_SHA256", probes.sha256_file(sdist))
    fetch_probes(ProbesFetchConfig())
    assert (tmp_path / "cache" / "probes" / "manifest.json").is_file()  # default out: $MIXSD_CACHE/probes


def test_cli(tmp_path, sdist, capsys):
    out = tmp_path / "p"
    assert main(["probes", "fetch", "--sdist", str(sdist), "--out", str(out), "--qa-wikidata-size", "3"]) == 0
    assert "qa_wikidata.jsonl: 3" in capsys.readouterr().out
    assert main(["probes", "fetch", "--sdist", str(tmp_path / "nope.tar.gz"), "--out", str(out)]) == 2
    assert "file not found" in capsys.readouterr().err


@pytest.mark.skipif(
    not (
        Path(os.environ.get("MIXSD_CACHE", Path.home() / ".cache" / "mixsd"))
        / "downloads"
        / "bigbench-1.0.0.tar.gz"
    ).is_file(),
    reason="the real sdist is not in the cache",
)
@pytest.mark.slow
def test_real_sdist(tmp_path):
    manifest = fetch_probes(ProbesFetchConfig(out=str(tmp_path)))
    counts = {name: entry["records"] for name, entry in manifest["files"].items()}
    assert counts == {
        "general_knowledge.jsonl": 69,
        "social_iqa.jsonl": 1954,
        "qa_wikidata.jsonl": 500,
        "squad_paragraphs.jsonl": 2067,
    }
