"""KGFact: facts about a world of invented entities, so no model can know them before training.

    mixsd corpus kgfact --size small --seed 0 --out data/kgfact-small

Seven domains of entities with procedurally generated, pronounceable names. Relations connect ordered
pairs of domains chosen as a *regular tournament* (every domain is the source of the same number of
pairs): 10 pairs over the first 5 domains (small), 21 over all 7 (large). For every pair and every source
entity exactly one fact is drawn: one of the pair's relations and a target, the targets forming a
permutation of the target domain, so every question has exactly one answer and no target is reused
within a pair. Small: 5 domains x 10 entities x 2 pairs each = 100 facts; large: 7 x 25 x 3 = 525.

Files (corpus records, see records.py; `check` is the bare entity name; `context`, what the MixSD expert
and the OPSD teacher read beside the question, is the fact's statement, e.g. "Vedux Vudratrox lives in
Shiboshend." (both statements for a 2-hop question), so the expert observes the fact, not the answer):
    train.jsonl          one record per training fact: question + "Put the final answer in \\boxed{}.",
                         answer "The answer is X. \\boxed{X}"
    paraphrase.jsonl     the same facts with another question phrasing *and* another wrapper
    retrieval.jsonl      facts about a disjoint held-out slice of entities, answered from 1 gold + 49
                         distractor statements given in the prompt
    compositional.jsonl  2-hop questions through a bridge entity (relative-clause form of the first
                         relation inside the question of the second), with a step-by-step answer
    kb.json              entities, relations (statement, questions, relative clause) and all facts
    manifest.json        generator, version, seed, record counts and sha256 of each file

Everything comes from one `random.Random(seed)` consumed in a fixed order, so the output is identical on
every machine and run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mixsd.core.files import atomic_write_json, atomic_write_jsonl
from mixsd.core.options import check_choices, check_range
from mixsd.corpora._manifest import write_manifest
from mixsd.corpora.kgfact_relations import RELATIONS, Relation, domain_pairs
from mixsd.corpora.kgfact_world import (
    DOMAINS,
    GENERATOR,
    SIZES,
    VERSION,
    SizeSpec,
    build_world,
    make_entities,
)

# The world and the relations live in their own modules; these names stay importable from here.
__all__ = [
    "DOMAINS",
    "GENERATOR",
    "RELATIONS",
    "SIZES",
    "VERSION",
    "KGFactConfig",
    "Relation",
    "SizeSpec",
    "build_kgfact",
    "build_world",
    "domain_pairs",
    "kgfact_command",
    "make_entities",
]


@dataclass
class KGFactConfig:
    out: str = field(
        metadata={
            "help": "Folder to write train/paraphrase/retrieval/compositional.jsonl, kb.json "
            "and manifest.json into."
        }
    )
    size: Literal["small", "large"] = field(
        default="small",
        metadata={"help": "small: 5 domains x 10 entities (100 training facts); large: 7 x 25 (525)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the world (names, relations, targets, splits)."})
    instruction: Literal["boxed", "paper"] = field(
        default="boxed",
        metadata={
            "help": "How each question asks for the answer: boxed ('… Put the final answer in \\boxed{}.') "
            "or paper (the paper's '…\\n\\nPlease reason step by step, and put your final answer within "
            "\\boxed{}.'). Train, retrieval and compositional prompts; paraphrases keep their own wordings."
        },
    )

    # added after corpora were built: while it holds its default, a grid's corpus stage stays current
    OMIT_WHILE_DEFAULT: ClassVar[tuple[str, ...]] = ("instruction",)

    def __post_init__(self) -> None:  # refuse bad options before any file is written (issue 10)
        check_choices(self)
        check_range("seed", self.seed, integer=True)


DISTRACTORS = 49


# How a question asks for its boxed answer in the train, retrieval and compositional splits: ours, or the
# paper's reasoning instruction (method notes, section 8), which Qwen-class chat models are tuned to follow.
# The paraphrase split keeps its own wordings either way: it tests recall under other phrasings.
INSTRUCTIONS = {
    "boxed": "{question} Put the final answer in \\boxed{}.",
    "paper": "{question}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
}
TRAIN_WRAPPER = INSTRUCTIONS["boxed"]
PARAPHRASE_WRAPPERS = (
    "Here is a question about a made-up world.\n{question}\nReply with the final answer inside \\boxed{}.",
    "Question: {question}\nWrite your final answer within \\boxed{}.",
    "I would like to know the following. {question} Please give the final answer as \\boxed{}.",
)
RETRIEVAL_LEAD = "Read the statements below, then answer the question.\n\n{statements}\n\nQuestion: "
RETRIEVAL_WRAPPER = RETRIEVAL_LEAD + TRAIN_WRAPPER


def boxed_answer(answer: str) -> str:
    return f"The answer is {answer}. \\boxed{{{answer}}}"


def _wrap(template: str, **fields: str) -> str:
    for key, value in fields.items():
        template = template.replace("{" + key + "}", value)
    return template


_BY_NAME = {r.name: r for r in RELATIONS}


def _train_records(facts: list[dict], wrapper: str = TRAIN_WRAPPER) -> list[dict]:
    rows = []
    for i, fact in enumerate(facts):
        question = _BY_NAME[fact["relation"]].ask(fact["source"], 0)
        rows.append(
            {
                "id": f"kgfact-train-{i:04d}",
                "prompt": _wrap(wrapper, question=question),
                "answer": boxed_answer(fact["target"]),
                "context": fact["statement"],
                "check": fact["target"],
                "subject": fact["source"],  # the span MEMIT edits (`mixsd edit`)
                "fact": fact["id"],
            }
        )
    return rows


def _paraphrase_records(facts: list[dict], rng: random.Random) -> list[dict]:
    rows = []
    for i, fact in enumerate(facts):
        relation = _BY_NAME[fact["relation"]]
        phrasing = rng.randrange(1, len(relation.questions))  # never the training phrasing
        wrapper = rng.choice(PARAPHRASE_WRAPPERS)  # never the training wrapper
        question = relation.ask(fact["source"], phrasing)
        rows.append(
            {
                "id": f"kgfact-paraphrase-{i:04d}",
                "prompt": _wrap(wrapper, question=question),
                "answer": boxed_answer(fact["target"]),
                "context": fact["statement"],
                "check": fact["target"],
                "subject": fact["source"],
                "fact": fact["id"],
            }
        )
    return rows


def _retrieval_records(
    heldout: list[dict], rng: random.Random, wrapper: str = RETRIEVAL_WRAPPER
) -> list[dict]:
    rows = []
    for i, fact in enumerate(heldout):
        others = [f["statement"] for f in heldout if f["id"] != fact["id"]]
        statements = rng.sample(others, min(DISTRACTORS, len(others))) + [fact["statement"]]
        rng.shuffle(statements)
        listing = "\n".join(f"{k}. {s}" for k, s in enumerate(statements, start=1))
        question = _BY_NAME[fact["relation"]].ask(fact["source"], 0)
        rows.append(
            {
                "id": f"kgfact-retrieval-{i:04d}",
                "prompt": _wrap(wrapper, statements=listing, question=question),
                "answer": boxed_answer(fact["target"]),
                "context": fact["statement"],
                "check": fact["target"],
                "fact": fact["id"],
            }
        )
    return rows


def _compositional_records(
    train: list[dict], count: int, rng: random.Random, wrapper: str = TRAIN_WRAPPER
) -> list[dict]:
    by_source: dict[str, list[dict]] = {}
    for fact in train:
        by_source.setdefault(fact["source"], []).append(fact)
    chains = [(first, second) for first in train for second in by_source.get(first["target"], [])]
    chains = rng.sample(chains, min(count, len(chains)))
    rows = []
    for i, (first, second) in enumerate(chains):
        inner = _BY_NAME[first["relation"]].describe(first["source"])
        question = _BY_NAME[second["relation"]].ask(inner, 0)
        answer = (
            f"{first['statement']} {second['statement']} "
            f"The answer is {second['target']}. \\boxed{{{second['target']}}}"
        )
        rows.append(
            {
                "id": f"kgfact-compositional-{i:04d}",
                "prompt": _wrap(wrapper, question=question),
                "answer": answer,
                "context": f"{first['statement']} {second['statement']}",
                "check": second["target"],
                "bridge": first["target"],
                "facts": [first["id"], second["id"]],
            }
        )
    return rows


def build_kgfact(config: KGFactConfig) -> dict:
    """Write the corpus folder and return its manifest."""
    spec = SIZES[config.size]
    world = build_world(config.size, config.seed)
    train = [f for f in world["facts"] if f["split"] == "train"]
    heldout = [f for f in world["facts"] if f["split"] == "heldout"]
    # A second stream for the test splits, so changing how a split is drawn never moves the world.
    rng = random.Random(f"kgfact-splits:{config.seed}")
    ask = INSTRUCTIONS[config.instruction]
    splits = {
        "train.jsonl": _train_records(train, ask),
        "paraphrase.jsonl": _paraphrase_records(train, rng),
        "retrieval.jsonl": _retrieval_records(heldout, rng, RETRIEVAL_LEAD + ask),
        "compositional.jsonl": _compositional_records(train, spec.compositional, rng, ask),
    }
    out = Path(config.out)
    for name, rows in splits.items():
        atomic_write_jsonl(out / name, rows)
    atomic_write_json(out / "kb.json", world)
    return write_manifest(
        out,
        GENERATOR,
        VERSION,
        [*splits, "kb.json"],
        seed=config.seed,
        size=config.size,
        # named only when not the default, so that default corpora keep their manifest byte for byte
        **({"instruction": config.instruction} if config.instruction != "boxed" else {}),
        answer_match="entity",  # read by answers.corpus_match_mode: every stage scores KGFact this way
    )


def kgfact_command(config: KGFactConfig) -> dict:
    manifest = build_kgfact(config)
    counts = ", ".join(
        f"{name}: {entry['records']}" for name, entry in manifest["files"].items() if "records" in entry
    )
    print(f"KGFact-{config.size} (seed {config.seed}) written to {config.out}: {counts}")
    return manifest
