"""Generative capability probes on which a small base model is competent (retention measured by generation).

    mixsd probes build-capability --out probes-capability                       # offline, no model needed
    mixsd probes build-capability --out probes-capability --model smollm2-135m  # + known facts (runs it)
    mixsd eval --suite retention --data probes-capability --model runs/sft --base smollm2-135m --out r.json

Files (generative probe items, see capability.py; every item has `id`, `prompt`, `group`, `max_new_tokens`):
    in_context.jsonl    held-out invented facts (the KGFact world's held-out slice, whose entities no training
                        split names) answered from the gold statement plus k distractor statements,
                        k in {0, 4, 19} (`group` "k=0" ...), the gold's position seeded; `check` = the entity
    instructions.jsonl  110 prompts, 10 tasks x 11 constraint kinds, each storing its check as data
                        (`constraint`: {"kind", "args"}; see instructions.py)
    known_facts.jsonl   (with --model) everyday questions made from BIG-bench qa_wikidata relations
                        ("What is the capital of Austria?"), kept only where the model, greedy, in its own
                        chat form, names an accepted answer: every right -> wrong item after training is a loss
    manifest.json       generator, version, seed, checksums; for known facts the model, its settings and
                        the counts kept / total per relation

Everything but the known-facts filter is a pure function of the seed; the filter is a function of the
model's greedy answers (and its dtype), which the manifest records.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from tqdm.auto import tqdm

from mixsd.core.answers import matches
from mixsd.core.files import InputError, atomic_write_jsonl, sha256_file
from mixsd.core.options import ModelOptions
from mixsd.corpora._manifest import write_manifest
from mixsd.corpora.kgfact import RELATIONS as KG_RELATIONS
from mixsd.corpora.kgfact import build_world
from mixsd.method.answering import ENTITY_MODE, generate_answers, score_answer

GENERATOR = "mixsd.corpora.capability"
VERSION = 1
DISTRACTOR_COUNTS = (0, 4, 19)
FACT_MAX_NEW_TOKENS = 48
INSTRUCTION_MAX_NEW_TOKENS = 128


@dataclass
class CapabilityConfig(ModelOptions):
    out: str = field(metadata={"help": "Folder to write the probe files and manifest.json into."})
    model: str | None = field(
        default=None,
        kw_only=True,
        metadata={
            "help": "Base model to filter the known facts with (only the items it answers right are kept); "
            "without it known_facts.jsonl is not built and no download is needed."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the distractors and gold positions, instruction arguments, fact sample."},
    )
    kgfact_size: Literal["small", "large"] = field(
        default="small",
        metadata={
            "help": "KGFact world whose held-out facts feed in_context.jsonl: use the trained corpus's."
        },
    )
    kgfact_seed: int = field(
        default=0, metadata={"help": "Seed of that KGFact world (the trained corpus's)."}
    )
    distractors: str = field(
        default="0,4,19", metadata={"help": "Comma-separated distractor counts k of in_context.jsonl."}
    )
    per_relation: int = field(
        default=40,
        metadata={"help": "Known-fact candidates sampled per qa_wikidata relation (before filtering)."},
    )
    sdist: str | None = field(
        default=None,
        metadata={"help": "Path of bigbench-1.0.0.tar.gz; default: the `mixsd probes fetch` download."},
    )
    pip: str | None = field(
        default=None, metadata={"help": "pip < 26 to download the sdist with (see `mixsd probes fetch`)."}
    )
    bf16: bool = field(default=False, metadata={"help": "Deprecated: same as --dtype bfloat16."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    # fields that change only speed or where the run goes, never the probe files (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "device", "threads")

    def __post_init__(self) -> None:
        self.check_model_options()


# ---------------------------------------------------------------------------------------------------
# In-context fact use (the paper's KGFact-Retrieve, with k distractors)
# ---------------------------------------------------------------------------------------------------
IN_CONTEXT_TEMPLATE = (
    "Read the statements below, then answer the question.\n\n{statements}\n\nQuestion: {question}"
)
_RELATIONS = {r.name: r for r in KG_RELATIONS}


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or any(k < 0 for k in counts) or len(set(counts)) != len(counts):
        raise InputError(
            f"expected distinct non-negative integers like 0,4,19, got {text!r}", field="distractors"
        )
    return counts


def in_context_items(size: str, world_seed: int, counts: tuple[int, ...], seed: int) -> list[dict[str, Any]]:
    """For each k and each held-out fact: the gold statement among k other held-out statements, gold at a
    seeded position; the question is the fact's training phrasing without any answer-format request."""
    world = build_world(size, world_seed)
    heldout = [f for f in world["facts"] if f["split"] == "heldout"]
    if counts and max(counts) > len(heldout) - 1:
        raise InputError(
            f"k={max(counts)} needs {max(counts) + 1} held-out facts; the {size} world has {len(heldout)}",
            field="distractors",
        )
    rng = random.Random(f"capability-in-context:{seed}")
    items = []
    for k in counts:
        for i, fact in enumerate(heldout):
            others = [f["statement"] for f in heldout if f["id"] != fact["id"]]
            statements = rng.sample(others, k)
            position = rng.randrange(k + 1)
            statements.insert(position, fact["statement"])
            listing = "\n".join(f"{n}. {s}" for n, s in enumerate(statements, start=1))
            question = _RELATIONS[fact["relation"]].ask(fact["source"], 0)
            items.append(
                {
                    "id": f"in_context-k{k:02d}-{i:04d}",
                    "prompt": IN_CONTEXT_TEMPLATE.replace("{statements}", listing).replace(
                        "{question}", question
                    ),
                    "check": fact["target"],
                    "group": f"k={k}",
                    "k": k,
                    "gold_position": position,
                    "fact": fact["id"],
                    "max_new_tokens": FACT_MAX_NEW_TOKENS,
                }
            )
    return items


# ---------------------------------------------------------------------------------------------------
# Instruction following
# ---------------------------------------------------------------------------------------------------
# (task, a keyword that fits the task but is not in it, a question with a one-word answer, JSON keys)
TASKS: tuple[tuple[str, str, str, tuple[str, str]], ...] = (
    (
        "Describe a sunny day at the beach.",
        "sand",
        "What colour is the sky on a clear day?",
        ("place", "weather"),
    ),
    ("Explain why people keep pets.", "loyal", "Which animal says meow?", ("animal", "reason")),
    (
        "Give advice to someone learning to play the guitar.",
        "practice",
        "How many strings does a violin have?",
        ("skill", "tip"),
    ),
    ("Describe a good breakfast.", "eggs", "Which fruit is yellow and curved?", ("food", "drink")),
    (
        "Explain how to stay healthy in winter.",
        "vitamin",
        "Which season comes after winter?",
        ("habit", "reason"),
    ),
    ("Describe a walk in a forest.", "trees", "What is the opposite of hot?", ("place", "feeling")),
    ("Explain why reading books is useful.", "imagination", "What do bees make?", ("benefit", "example")),
    ("Give tips for a job interview.", "confident", "How many days are in a week?", ("tip", "reason")),
    ("Describe a busy city street.", "traffic", "What is the capital of France?", ("place", "sound")),
    ("Explain how to make a cup of tea.", "kettle", "Which planet do we live on?", ("step", "tool")),
)
START_PHRASES = ("In my opinion", "Here is my answer", "To begin with", "Dear reader", "Let me explain")
END_PHRASES = ("That is all.", "Thank you for reading.", "Is there anything else?", "The end.")


def _instruction(kind: str, task: tuple, rng: random.Random) -> tuple[str, dict[str, Any]]:
    text, keyword, one_word_question, keys = task
    if kind == "lowercase":
        return f"{text} Your entire answer must be in lowercase letters: do not use any capital letters.", {}
    if kind == "uppercase":
        return f"{text} Your entire answer must be in capital letters only.", {}
    if kind == "bullets":
        n = rng.choice((2, 3, 4))
        return f"{text} Answer with exactly {n} bullet points, using markdown bullets like:\n* first point", {
            "n": n
        }
    if kind == "starts_with":
        phrase = rng.choice(START_PHRASES)
        return f'{text} Start your answer with the words "{phrase}".', {"phrase": phrase}
    if kind == "ends_with":
        phrase = rng.choice(END_PHRASES)
        return f'{text} End your answer with the exact phrase "{phrase}" and write nothing after it.', {
            "phrase": phrase
        }
    if kind == "one_word":
        return f"{one_word_question} Answer with one word only.", {}
    if kind == "keyword":
        return f'{text} Include the word "{keyword}" in your answer.', {"keyword": keyword}
    if kind == "no_commas":
        return f"{text} Do not use any commas in your answer.", {}
    if kind == "json":
        return (
            f'{text} Give your answer as a JSON object with the keys "{keys[0]}" and "{keys[1]}", and nothing else.',
            {"keys": list(keys)},
        )
    if kind == "sentences":
        n = rng.choice((2, 3))
        return f"{text} Answer in exactly {n} sentences.", {"n": n}
    if kind == "max_words":
        n = rng.choice((10, 15, 20))
        return f"{text} Answer in at most {n} words.", {"n": n}
    raise ValueError(kind)


INSTRUCTION_KINDS = (
    "lowercase",
    "uppercase",
    "bullets",
    "starts_with",
    "ends_with",
    "one_word",
    "keyword",
    "no_commas",
    "json",
    "sentences",
    "max_words",
)


def instruction_items(seed: int) -> list[dict[str, Any]]:
    """Every constraint kind applied to every task (kind-major order), arguments drawn from the seed."""
    rng = random.Random(f"capability-instructions:{seed}")
    items = []
    for kind in INSTRUCTION_KINDS:
        for t, task in enumerate(TASKS):
            prompt, args = _instruction(kind, task, rng)
            items.append(
                {
                    "id": f"instructions-{kind}-{t:02d}",
                    "prompt": prompt,
                    "constraint": {"kind": kind, "args": args},
                    "group": kind,
                    "max_new_tokens": INSTRUCTION_MAX_NEW_TOKENS,
                }
            )
    return items


# ---------------------------------------------------------------------------------------------------
# Known facts: qa_wikidata clozes as chat questions, filtered by the base model
# ---------------------------------------------------------------------------------------------------
# (group, cloze pattern with the subject as group 1, question). Relations with everyday answers only.
KNOWN_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("capital", r"The capital of (.+) is", "What is the capital of {x}?"),
    ("capital_of", r"(.+) is capital of", "{x} is the capital of which country or region?"),
    ("official_language", r"The official language of (.+) is", "What is the official language of {x}?"),
    ("native_language", r"The native language of (.+) is", "What is the native language of {x}?"),
    ("continent", r"The continent of (.+) is", "On which continent is {x}?"),
    ("currency", r"The currency of (.+) is", "What is the currency of {x}?"),
    ("citizenship", r"The country of citizenship of (.+) is", "What is the country of citizenship of {x}?"),
    ("headquarters", r"The headquarters location of (.+) is", "In which city is the headquarters of {x}?"),
    ("sport", r"The sport played by (.+) is", "Which sport is {x} known for?"),
    ("instrument", r"The instrument of (.+) is", "Which musical instrument is {x} known for playing?"),
    ("original_country", r"The original country of (.+) is", "Which country does {x} come from?"),
)
_KNOWN_PATTERNS = [
    (group, re.compile(f"^{pattern}$"), question) for group, pattern, question in KNOWN_RELATIONS
]


def known_fact_candidates(
    task: dict, per_relation: int, seed: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Questions from the qa_wikidata task's clozes of `KNOWN_RELATIONS`, up to `per_relation` each (a
    seeded sample, file order kept). Dropped: non-string items, numeric answers, answers the question
    already names. Returns (candidates, usable items per relation before sampling)."""
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise InputError("qa_wikidata task has no 'examples' list", field="examples")
    usable: dict[str, list[dict[str, Any]]] = {group: [] for group, _, _ in KNOWN_RELATIONS}
    for i, example in enumerate(examples):
        cloze, target = example.get("input"), example.get("target")
        accepted = [target] if isinstance(target, str) else target
        if not isinstance(cloze, str) or not isinstance(accepted, list) or not accepted:
            continue
        if not all(isinstance(a, str) and a.strip() for a in accepted):
            continue
        accepted = [a.strip() for a in accepted]
        for group, pattern, question in _KNOWN_PATTERNS:
            match = pattern.match(cloze.strip())
            if match is None:
                continue
            prompt = question.replace("{x}", match.group(1).strip())
            if any(re.fullmatch(r"[-+\d.,\s]+", a) for a in accepted) or any(
                matches(prompt, a, ENTITY_MODE) for a in accepted
            ):
                break  # a number is no everyday entity; an answer inside the question is free
            usable[group].append(
                {
                    "id": f"known_facts-{group}-{i:05d}",
                    "prompt": prompt,
                    "check": accepted,
                    "group": group,
                    "cloze": cloze.strip(),
                    "max_new_tokens": FACT_MAX_NEW_TOKENS,
                }
            )
            break
    rng = random.Random(f"capability-known-facts:{seed}")
    chosen = []
    for group, _, _ in KNOWN_RELATIONS:
        rows = usable[group]
        picked = rows if len(rows) <= per_relation else rng.sample(rows, per_relation)
        chosen += sorted(picked, key=lambda row: row["id"])
    return chosen, {group: len(rows) for group, rows in usable.items()}


def keep_known(
    candidates: list[dict[str, Any]], answer: Callable[[list[dict[str, Any]]], list[str]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The candidates whose answer (by `answer`, one text per candidate) names an accepted answer, and the
    counts kept / total per group."""

    outputs = answer(candidates)
    if len(outputs) != len(candidates):
        raise ValueError(f"{len(outputs)} answers for {len(candidates)} candidates")
    kept = [item for item, output in zip(candidates, outputs, strict=True) if score_answer(item, output)]
    total, right = Counter(c["group"] for c in candidates), Counter(k["group"] for k in kept)
    counts = {group: {"kept": right.get(group, 0), "total": n} for group, n in sorted(total.items())}
    counts["all"] = {"kept": len(kept), "total": len(candidates)}
    return kept, counts


def _model_answerer(config: CapabilityConfig) -> tuple[Callable[[list[dict]], list[str]], dict[str, Any]]:
    """Greedy answers of --model exactly as `mixsd eval` asks them (same prompts, decoding, length cap)."""
    # here, not at the top: building the probes without a model needs no torch
    from mixsd.core import models

    config.set_threads()
    handle = models.resolve_model(config.model)  # once: loaded and fingerprinted from the handle
    model, tokenizer = models.load_for_inference(
        handle, device=config.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )

    def answer(items: list[dict]) -> list[str]:

        with tqdm(total=len(items), desc="known facts", unit="item", leave=False) as bar:
            results = generate_answers(
                model, tokenizer, items, batch_size=config.batch_size, progress=bar.update
            )
        return [text for text, _, _ in results]

    return answer, {"model": handle.fingerprint(), "bf16": config.bf16}


def _qa_wikidata_task(config: CapabilityConfig) -> tuple[dict, dict[str, str]]:
    from mixsd.corpora.probes import download_sdist, read_members  # here: probes loads torch (cache_dir)

    sdist = Path(config.sdist) if config.sdist else download_sdist(config.pip)
    if not sdist.is_file():
        raise InputError("file not found", sdist)
    return read_members(sdist)["qa_wikidata"], {"name": sdist.name, "sha256": sha256_file(sdist)}


# ---------------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------------
def build_capability(
    config: CapabilityConfig, answer: Callable[[list[dict[str, Any]]], list[str]] | None = None
) -> dict[str, Any]:
    """Write the probe folder and return its manifest. `answer` (for tests) replaces --model's answers."""
    if config.batch_size < 1 or config.per_relation < 1:
        raise InputError("--batch-size and --per-relation must be >= 1")
    counts = parse_counts(config.distractors)
    out = Path(config.out)
    outputs = {
        "in_context.jsonl": in_context_items(config.kgfact_size, config.kgfact_seed, counts, config.seed),
        "instructions.jsonl": instruction_items(config.seed),
    }
    notes: dict[str, Any] = {
        "in_context.jsonl": {
            "kgfact_size": config.kgfact_size,
            "kgfact_seed": config.kgfact_seed,
            "k": list(counts),
        },
        "instructions.jsonl": {"kinds": list(INSTRUCTION_KINDS), "tasks": len(TASKS)},
    }
    extra: dict[str, Any] = {}
    stale = out / "known_facts.jsonl"
    if config.model is not None or answer is not None:
        task, source = _qa_wikidata_task(config)
        candidates, usable = known_fact_candidates(task, config.per_relation, config.seed)
        settings: dict[str, Any] = {"model": None, "bf16": config.bf16}
        if answer is None:
            answer, settings = _model_answerer(config)
        kept, kept_counts = keep_known(candidates, answer)
        notes["known_facts.jsonl"] = {
            **settings,
            "max_new_tokens": FACT_MAX_NEW_TOKENS,
            "per_relation": config.per_relation,
            "usable": usable,
            "counts": kept_counts,
        }
        extra["source"] = source
        if kept:
            outputs["known_facts.jsonl"] = kept
        else:
            print(
                "no known-fact candidate was answered right: known_facts.jsonl not written", file=sys.stderr
            )
    for name, rows in outputs.items():
        atomic_write_jsonl(out / name, rows)
    if "known_facts.jsonl" not in outputs:
        # an old known_facts.jsonl was filtered by another model or settings: never leave it beside this manifest
        stale.unlink(missing_ok=True)
    return write_manifest(
        out, GENERATOR, VERSION, list(outputs), seed=config.seed, answer_match="entity", notes=notes, **extra
    )


def capability_command(config: CapabilityConfig) -> dict[str, Any]:
    manifest = build_capability(config)
    counts = ", ".join(f"{name}: {entry['records']}" for name, entry in manifest["files"].items())
    print(f"capability probes written to {config.out}: {counts}")
    known = manifest["notes"].get("known_facts.jsonl")
    if known:
        print(f"known facts kept {known['counts']['all']['kept']}/{known['counts']['all']['total']}")
    return manifest
