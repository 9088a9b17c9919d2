"""Held-out probes of general ability (retention): BIG-bench tasks and SQuAD paragraphs, no install needed.

    mixsd probes fetch                      # into $MIXSD_CACHE/probes (default ~/.cache/mixsd/probes)
    mixsd probes fetch --out probes --qa-wikidata-size 1000
    mixsd probes fetch --sdist bigbench-1.0.0.tar.gz   # a copy downloaded elsewhere

The PyPI source distribution bigbench==1.0.0 (358 MB) carries the BIG-bench task files. It is fetched with
`pip download --no-deps` into `$MIXSD_CACHE/downloads` (once), and only the four files needed are read out
of the tarball; nothing is installed or unpacked. pip >= 26 refuses this sdist (it declares a direct-URL
dependency), so the fetch uses a pip < 26: the current interpreter's, or the one --pip names.

Files written (see docs/corpora.md):
    general_knowledge.jsonl  multiple choice {"id", "query", "choices", "gold"}; gold = index of the right choice
    social_iqa.jsonl         same
    qa_wikidata.jsonl        same; the task's open cloze items made 4-way with distractors drawn from other
                             answers of the same relation; a bounded deterministic sample (default 500)
    squad_paragraphs.jsonl   {"id", "title", "text"}: SQuAD v1.1 dev paragraphs, for perplexity
    manifest.json            source sdist and its sha256, licenses, counts and sha256 of each file
A log-likelihood scorer scores `query + " " + choice` for each choice (the query ends in "Answer:" for
questions, or is the cloze sentence itself for qa_wikidata).

The KL prompt list is read here too (`load_kl_prompts`); probe files are read by their kind's parser
(`mixsd.evaluation.probe_kinds.load_probe`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mixsd.core.files import InputError, atomic_write_jsonl, read_text, sha256_file, sha256_text
from mixsd.core.models import cache_dir
from mixsd.core.options import check_range
from mixsd.core.records import load_corpus
from mixsd.corpora._manifest import write_manifest

GENERATOR = "mixsd.corpora.probes"
VERSION = 1
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST_SHA256 = (
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # PyPI's file, as downloaded
)

_TASKS = "bigbench/benchmark_tasks/"
MEMBERS = {
    "general_knowledge": _TASKS + "general_knowledge/task.json",
    "social_iqa": _TASKS + "social_iqa/task.json",
    "qa_wikidata": _TASKS + "qa_wikidata/task.json",
    "squad": _TASKS + "squad_shifts/squaddev_v1.1.json",
}

_BIGBENCH = (
    "Apache-2.0 (license of the BIG-bench repository, google/BIG-bench; the sdist's PKG-INFO says UNKNOWN)"
)
LICENSES = {
    "general_knowledge.jsonl": {"source": "BIG-bench task general_knowledge", "license": _BIGBENCH},
    "social_iqa.jsonl": {
        "source": "BIG-bench task social_iqa, from Social IQa (Sap et al., 2019)",
        "license": _BIGBENCH + "; the upstream dataset's own terms also apply",
    },
    "qa_wikidata.jsonl": {
        "source": "BIG-bench task qa_wikidata (Wikidata fact triples)",
        "license": _BIGBENCH + "; Wikidata content is CC0-1.0",
    },
    "squad_paragraphs.jsonl": {
        "source": "SQuAD v1.1 dev set (Rajpurkar et al., 2016), as shipped in BIG-bench "
        "squad_shifts/squaddev_v1.1.json",
        "license": "CC-BY-SA-4.0",
    },
}


@dataclass
class ProbesFetchConfig:
    out: str | None = field(
        default=None,
        metadata={"help": "Folder for the probe files; default $MIXSD_CACHE/probes (~/.cache/mixsd/probes)."},
    )
    qa_wikidata_size: int = field(
        default=500,
        metadata={
            "help": "Items sampled from qa_wikidata (deterministically, by --seed); 0 keeps every usable item."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the qa_wikidata sample, distractors and choice order."}
    )
    sdist: str | None = field(
        default=None,
        metadata={
            "help": f"Path of {SDIST_NAME} if you already have it; default: download it into $MIXSD_CACHE/downloads."
        },
    )
    pip: str | None = field(
        default=None,
        metadata={
            "help": "pip command to download with (must be pip < 26), e.g. '/opt/venv/bin/pip'; "
            "default: this Python's `-m pip`."
        },
    )

    def __post_init__(self) -> None:  # refuse bad options before anything is downloaded (issue 10)
        check_range("qa_wikidata_size", self.qa_wikidata_size, 0, integer=True)
        check_range("seed", self.seed, integer=True)


def default_out() -> Path:
    return cache_dir() / "probes"


# ---------------------------------------------------------------------------------------------------
# Getting the sdist
# ---------------------------------------------------------------------------------------------------


def _pip_command(pip: str | None) -> list[str]:
    return shlex.split(pip) if pip else [sys.executable, "-m", "pip"]


def pip_version(command: list[str]) -> tuple[int, ...] | None:
    try:
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"pip (\d+(?:\.\d+)*)", result.stdout)
    return tuple(int(p) for p in match.group(1).split(".")) if match and result.returncode == 0 else None


_PIP_HELP = (
    "bigbench==1.0.0 can only be downloaded with pip < 26 (pip 26 refuses its direct-URL dependency). "
    "Use a pip < 26, e.g. `python3 -m venv /tmp/oldpip && /tmp/oldpip/bin/pip install 'pip<26'` and "
    "then `mixsd probes fetch --pip /tmp/oldpip/bin/pip`; or download the file yourself and pass "
    f"`--sdist path/to/{SDIST_NAME}`."
)
_DOWNLOAD_HELP = (
    "Check that PyPI is reachable (proxy, index settings); pip < 26 is needed and was used. Or download "
    f"the file elsewhere (`pip download --no-deps {SDIST_REQUIREMENT}`) and pass `--sdist PATH`."
)


def download_sdist(pip: str | None = None, downloads: Path | None = None) -> Path:
    """`pip download --no-deps bigbench==1.0.0` into the cache (once); return the tarball's path."""
    downloads = downloads or cache_dir() / "downloads"
    target = downloads / SDIST_NAME
    if target.is_file():
        return target
    command = _pip_command(pip)
    version = pip_version(command)
    if version is None:
        raise InputError(f"could not run `{shlex.join([*command, '--version'])}`. {_PIP_HELP}")
    if version >= (26,):
        raise InputError(f"pip {'.'.join(map(str, version))} found. {_PIP_HELP}")
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=downloads, prefix=".bigbench-"))
    try:
        print(
            f"downloading {SDIST_REQUIREMENT} (358 MB) with pip {'.'.join(map(str, version))} ...",
            file=sys.stderr,
        )
        result = subprocess.run(
            [*command, "download", "--no-deps", SDIST_REQUIREMENT, "-d", str(staging)],
            capture_output=True,
            text=True,
        )
        fetched = staging / SDIST_NAME
        if result.returncode != 0 or not fetched.is_file():
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise InputError(
                f"`pip download {SDIST_REQUIREMENT}` failed (exit {result.returncode}):\n{tail}\n"
                f"{_DOWNLOAD_HELP}"
            )
        os.replace(fetched, target)  # atomic: an interrupted download never looks complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_members(sdist: Path) -> dict[str, Any]:
    """Parse the needed task files straight out of the tarball, streaming it once, stopping when done."""
    wanted = {path: key for key, path in MEMBERS.items()}
    found: dict[str, Any] = {}
    try:
        with (
            tarfile.open(sdist, mode="r|gz") as tar,
            tqdm(total=len(wanted), desc="reading bigbench sdist", unit="file", leave=False) as bar,
        ):
            for member in tar:
                # Members are "bigbench-1.0.0/bigbench/...": drop the top folder.
                inner = member.name.split("/", 1)[-1]
                if inner in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    try:
                        found[wanted[inner]] = json.loads(handle.read().decode("utf-8"))
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise InputError(f"unreadable task file ({err})", sdist, field=member.name) from None
                    bar.update()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError) as err:
        raise InputError(f"not a readable .tar.gz ({err}); delete it and fetch again", sdist) from None
    missing = sorted(MEMBERS[k] for k in MEMBERS if k not in found)
    if missing:
        raise InputError(f"the tarball lacks {', '.join(missing)}; is it {SDIST_NAME}?", sdist)
    return found


# ---------------------------------------------------------------------------------------------------
# Normalizing the tasks
# ---------------------------------------------------------------------------------------------------


def _examples(task: dict, name: str) -> list[dict]:
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise InputError("task file has no 'examples' list", MEMBERS[name], field="examples")
    return examples


def multiple_choice(task: dict, name: str) -> tuple[list[dict], int]:
    """BIG-bench `target_scores` items -> {"id","query","choices","gold"}; items without exactly one choice
    scored 1 are dropped (and counted)."""
    rows, dropped = [], 0
    for i, example in enumerate(_examples(task, name)):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        question = example.get("input") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or not isinstance(question, str):
            dropped += 1
            continue
        choices = [str(c).strip() for c in scores]
        best = [j for j, score in enumerate(scores.values()) if score == 1]
        if len(best) != 1 or len(set(choices)) != len(choices):
            dropped += 1
            continue
        rows.append(
            {
                "id": f"{name}-{i:05d}",
                "query": f"Question: {question.strip()}\nAnswer:",
                "choices": choices,
                "gold": best[0],
            }
        )
    return rows, dropped


_OF_PATTERN = re.compile(r"^(The .+? (?:of|by|for|in|from|with|to)) .+ (is|are|was|were)$")


def wikidata_relation(cloze: str) -> str:
    """The relation of a qa_wikidata cloze: "The capital of X is" -> "The capital of _ is"; other templates
    ("X is located in", "X shares a border with") are keyed by their last two words."""
    match = _OF_PATTERN.match(cloze)
    if match:
        return f"{match.group(1)} _ {match.group(2)}"
    return "_ " + " ".join(cloze.split()[-2:])


def qa_wikidata_choices(task: dict, size: int, rng: random.Random) -> tuple[list[dict], int]:
    """4-way multiple choice from the open cloze items: 3 distractors drawn from other answers of the same
    relation (never an accepted answer of the item). Returns (rows, usable items before sampling)."""
    items = []
    for i, example in enumerate(_examples(task, "qa_wikidata")):
        cloze, target = example.get("input"), example.get("target")
        targets = [target] if isinstance(target, str) else target
        if (
            not isinstance(cloze, str)
            or not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)
        ):
            continue
        items.append((i, cloze.strip(), [t.strip() for t in targets]))
    answers: dict[str, set[str]] = {}
    for _, cloze, targets in items:
        answers.setdefault(wikidata_relation(cloze), set()).add(targets[0])
    pools = {relation: sorted(values) for relation, values in answers.items()}  # sorted: hash-seed free
    usable = []
    for i, cloze, targets in items:
        accepted = {t.lower() for t in targets}
        candidates = [a for a in pools[wikidata_relation(cloze)] if a.lower() not in accepted]
        if len(candidates) >= 3:
            usable.append((i, cloze, targets[0], candidates))
    chosen = (
        usable
        if size <= 0 or size >= len(usable)
        else sorted(rng.sample(usable, size), key=lambda item: item[0])
    )
    rows = []
    for i, cloze, gold, candidates in chosen:
        choices = [gold, *rng.sample(candidates, 3)]
        rng.shuffle(choices)
        rows.append(
            {"id": f"qa_wikidata-{i:05d}", "query": cloze, "choices": choices, "gold": choices.index(gold)}
        )
    return rows, len(usable)


def squad_paragraphs(squad: dict) -> list[dict]:
    data = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(data, list):
        raise InputError("no 'data' list", MEMBERS["squad"], field="data")
    rows = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            text = paragraph.get("context")
            if isinstance(text, str) and text.strip():
                rows.append({"id": f"squad-{a:02d}-{p:03d}", "title": article.get("title", ""), "text": text})
    return rows


def fetch_probes(config: ProbesFetchConfig) -> dict:
    """Fetch (or reuse) the sdist, write the normalized probe files and return the manifest."""
    if config.sdist:
        sdist = Path(config.sdist)
        if not sdist.is_file():
            raise InputError("file not found", sdist)
    else:
        sdist = download_sdist(config.pip)
    digest = sha256_file(sdist)
    if not config.sdist and digest != SDIST_SHA256:
        raise InputError(
            f"sha256 {digest} is not that of PyPI's {SDIST_NAME} ({SDIST_SHA256}); delete the file "
            "and fetch again",
            sdist,
        )
    tasks = read_members(sdist)
    rng = random.Random(config.seed)
    general, general_dropped = multiple_choice(tasks["general_knowledge"], "general_knowledge")
    social, social_dropped = multiple_choice(tasks["social_iqa"], "social_iqa")
    wikidata, wikidata_usable = qa_wikidata_choices(tasks["qa_wikidata"], config.qa_wikidata_size, rng)
    outputs = {
        "general_knowledge.jsonl": general,
        "social_iqa.jsonl": social,
        "qa_wikidata.jsonl": wikidata,
        "squad_paragraphs.jsonl": squad_paragraphs(tasks["squad"]),
    }
    out = Path(config.out) if config.out else default_out()
    for name, rows in outputs.items():
        if not rows:
            raise InputError(f"no usable items for {name}", sdist)
        atomic_write_jsonl(out / name, rows)
    return write_manifest(
        out,
        GENERATOR,
        VERSION,
        list(outputs),
        seed=config.seed,
        source={"name": sdist.name, "sha256": digest},
        licenses=LICENSES,
        choice_separator=" ",
        notes={
            "general_knowledge.jsonl": {"dropped": general_dropped},
            "social_iqa.jsonl": {"dropped": social_dropped},
            "qa_wikidata.jsonl": {"usable": wikidata_usable, "sample_size": config.qa_wikidata_size},
        },
    )


def fetch_command(config: ProbesFetchConfig) -> dict:
    manifest = fetch_probes(config)
    out = config.out or default_out()
    counts = ", ".join(f"{name}: {entry['records']}" for name, entry in manifest["files"].items())
    print(f"probes written to {out}: {counts}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Spreading a limit over a file, and the KL prompts (`mixsd eval --suite retention`, the learning curve)
# --------------------------------------------------------------------------------------------------
def spread(items: list, limit: int | None) -> list:
    """`limit` items taken evenly across the list (every k-th), so a quick run still covers every part of
    a file that is ordered by topic (SQuAD articles, KGFunc operations); all items when limit is None."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def load_kl_prompts(source: str | None, limit: int | None) -> tuple[list[tuple[str, str, str | None]], str]:
    """(id, prompt, system) triples for the KL probe and the sha256 of their source."""
    if source is None:
        text = resources.files("mixsd").joinpath("data/kl_prompts.txt").read_text(encoding="utf-8")
        digest = sha256_text(text)
    else:
        path = Path(source)
        digest = sha256_file(path) if path.is_file() else ""
        if path.suffix == ".jsonl":
            facts = load_corpus(path)
            prompts = [(f.id, f.prompt, f.system) for f in facts]
            return spread(prompts, limit), digest
        if not path.is_file():
            raise InputError("file not found", path)
        text = read_text(path)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    prompts = [(f"kl{i:03d}", line, None) for i, line in enumerate(lines)]
    if not prompts:
        raise InputError("no prompts", source)
    return spread(prompts, limit), digest
