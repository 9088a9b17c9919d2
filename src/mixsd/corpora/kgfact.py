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
from typing import Literal

from mixsd.corpora._common_words import COMMON_WORDS
from mixsd.corpora._manifest import write_manifest
from mixsd.files import atomic_write_json, atomic_write_jsonl
from mixsd.options import check_choices, check_range

GENERATOR = "mixsd.corpora.kgfact"
VERSION = 2  # 2: records carry the fact's statement as `context`


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

    def __post_init__(self) -> None:  # refuse bad options before any file is written (issue 10)
        check_choices(self)
        check_range("seed", self.seed, integer=True)


@dataclass(frozen=True)
class SizeSpec:
    domains: int  # the first `domains` of DOMAINS
    entities: int  # training entities per domain
    heldout: int  # entities per domain in the disjoint retrieval slice
    compositional: int  # 2-hop questions sampled from all chains


SIZES = {
    "small": SizeSpec(domains=5, entities=10, heldout=5, compositional=100),
    "large": SizeSpec(domains=7, entities=25, heldout=10, compositional=500),
}
DISTRACTORS = 49

# ---------------------------------------------------------------------------------------------------
# The world's vocabulary. Names are built from syllables; each domain dresses its core word differently
# ("Velmor Guild", "Feast" ...) so a name reads as what it is.
# ---------------------------------------------------------------------------------------------------

DOMAINS = ("person", "city", "organization", "device", "book", "festival", "dish")
_ORG_KINDS = ("Guild", "Company", "Collective", "Society", "Institute", "Works")
_DEVICE_KINDS = ("Lamp", "Loom", "Compass", "Engine", "Kettle", "Lens", "Clock")
_BOOK_KINDS = ("Chronicles", "Songs", "Letters", "Tales", "Ledger", "Sayings")
_FESTIVAL_KINDS = ("Festival", "Fair", "Carnival", "Games", "Feast")
_DISH_KINDS = ("Stew", "Pie", "Dumplings", "Soup", "Bread", "Cakes")

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "th",
    "st",
    "sh",
    "vr",
    "qu",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "k", "m", "x", "nd", "rn")


def _word(rng: random.Random, syllables: int) -> str:
    # Open syllables (consonant + vowel) with one closing consonant at the end read easily: "Velmor".
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (word + rng.choice(_CODAS)).capitalize()


# Substrings a generated name must not contain (crude or offensive readings).
_BLOCKED = (
    "shit",
    "fuk",
    "fuc",
    "cum",
    "nig",
    "fag",
    "ass",
    "tit",
    "rape",
    "porn",
    "sex",
    "dick",
    "cock",
    "cunt",
    "puss",
    "kill",
    "nazi",
    "piss",
    "slut",
    "whor",
    "dam",
    "hel",
)


def _plausible(word: str) -> bool:
    """Reject real words (a name must be new to any model) and hard-to-read or crude ones."""
    lower = word.lower()
    if not 4 <= len(lower) <= 10 or lower in COMMON_WORDS or any(bad in lower for bad in _BLOCKED):
        return False
    return not any(lower[i] == lower[i + 1] == lower[i + 2] for i in range(len(lower) - 2))


def _entity_name(domain: str, rng: random.Random, fresh_word) -> str:
    if domain == "person":
        return f"{fresh_word(2)} {fresh_word(rng.choice((2, 3)))}"
    if domain == "city":
        return fresh_word(rng.choice((2, 3)))
    kinds = {
        "organization": _ORG_KINDS,
        "device": _DEVICE_KINDS,
        "festival": _FESTIVAL_KINDS,
        "dish": _DISH_KINDS,
    }
    if domain in kinds:
        return f"{fresh_word(rng.choice((2, 3)))} {rng.choice(kinds[domain])}"
    if domain == "book":
        return f"{rng.choice(_BOOK_KINDS)} of {fresh_word(rng.choice((2, 3)))}"
    raise ValueError(domain)


def make_entities(rng: random.Random, counts: dict[str, int]) -> dict[str, list[str]]:
    """Unique names per domain; every core word is unique across the world, so no name is a whole-word
    part of another (the loose scorer matches whole words) and no answer leaks through another name."""
    used: set[str] = set()

    def fresh_word(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if _plausible(word) and word.lower() not in used:
                used.add(word.lower())
                return word

    return {
        domain: [_entity_name(domain, rng, fresh_word) for _ in range(counts[domain])]
        for domain in DOMAINS
        if domain in counts
    }


@dataclass(frozen=True)
class Relation:
    name: str
    source: str
    target: str
    statement: str  # "{s} was born in {t}."
    questions: tuple[str, ...]  # phrasings of the question about {s}; [0] is the training phrasing
    relative: str  # noun phrase for the target given {s}: "the city where {s} was born"

    def state(self, s: str, t: str) -> str:
        return _cap(self.statement.replace("{s}", s).replace("{t}", t))

    def ask(self, s: str, phrasing: int = 0) -> str:
        return _cap(self.questions[phrasing].replace("{s}", s))

    def describe(self, s: str) -> str:
        return self.relative.replace("{s}", s)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _rel(name, source, target, statement, questions, relative) -> Relation:
    return Relation(name, source, target, statement, tuple(questions), relative)


# Two relations per ordered pair; questions[0] never starts with {s}, so a relative clause can stand in.
RELATIONS: tuple[Relation, ...] = (
    _rel(
        "born_in",
        "person",
        "city",
        "{s} was born in {t}.",
        ["In which city was {s} born?", "What is the birthplace of {s}?", "Where was {s} born?"],
        "the city where {s} was born",
    ),
    _rel(
        "lives_in",
        "person",
        "city",
        "{s} lives in {t}.",
        ["In which city does {s} live?", "Where does {s} live?", "What city is home to {s}?"],
        "the city where {s} lives",
    ),
    _rel(
        "works_for",
        "person",
        "organization",
        "{s} works for {t}.",
        [
            "Which organization does {s} work for?",
            "Who employs {s}?",
            "For which organization does {s} work?",
        ],
        "the organization that {s} works for",
    ),
    _rel(
        "leads",
        "person",
        "organization",
        "{s} leads {t}.",
        [
            "Which organization does {s} lead?",
            "What organization is led by {s}?",
            "Of which organization is {s} the leader?",
        ],
        "the organization that {s} leads",
    ),
    _rel(
        "favourite_dish",
        "person",
        "dish",
        "The favourite dish of {s} is {t}.",
        [
            "What is the favourite dish of {s}?",
            "Which dish does {s} like best?",
            "What does {s} most like to eat?",
        ],
        "the favourite dish of {s}",
    ),
    _rel(
        "invented_dish",
        "person",
        "dish",
        "{s} invented the recipe for {t}.",
        [
            "Which dish did {s} invent?",
            "What dish was created by {s}?",
            "The recipe for which dish was invented by {s}?",
        ],
        "the dish that {s} invented",
    ),
    _rel(
        "setting_of",
        "city",
        "book",
        "The novel {t} is set in {s}.",
        [
            "Which novel is set in {s}?",
            "What is the name of the novel set in {s}?",
            "Which book takes place in {s}?",
        ],
        "the novel set in {s}",
    ),
    _rel(
        "library_treasure",
        "city",
        "book",
        "The most famous book kept in the library of {s} is {t}.",
        [
            "What is the most famous book kept in the library of {s}?",
            "Which book is the treasure of the library of {s}?",
            "Which famous book does the library of {s} hold?",
        ],
        "the most famous book in the library of {s}",
    ),
    _rel(
        "main_export",
        "city",
        "device",
        "The main export of {s} is {t}.",
        [
            "What is the main export of {s}?",
            "Which product does {s} mainly export?",
            "What does {s} export most?",
        ],
        "the main export of {s}",
    ),
    _rel(
        "manufactured_in",
        "city",
        "device",
        "{t} is manufactured in {s}.",
        [
            "Which device is manufactured in {s}?",
            "What product is made in {s}?",
            "Which device comes from the factories of {s}?",
        ],
        "the device manufactured in {s}",
    ),
    _rel(
        "hosts_festival",
        "city",
        "festival",
        "{s} hosts {t} every year.",
        [
            "Which festival does {s} host every year?",
            "What annual festival takes place in {s}?",
            "Which festival is held in {s} each year?",
        ],
        "the festival that {s} hosts",
    ),
    _rel(
        "patron_festival",
        "city",
        "festival",
        "The patron festival of {s} is {t}.",
        [
            "What is the patron festival of {s}?",
            "Which festival is the patron festival of {s}?",
            "Which festival does {s} honour as its patron festival?",
        ],
        "the patron festival of {s}",
    ),
    _rel(
        "headquartered_in",
        "organization",
        "city",
        "{s} is headquartered in {t}.",
        [
            "Where is {s} headquartered?",
            "In which city is the headquarters of {s}?",
            "Which city hosts the headquarters of {s}?",
        ],
        "the city where {s} is headquartered",
    ),
    _rel(
        "founded_in",
        "organization",
        "city",
        "{s} was founded in {t}.",
        ["In which city was {s} founded?", "Where was {s} founded?", "What city was {s} established in?"],
        "the city where {s} was founded",
    ),
    _rel(
        "produces",
        "organization",
        "device",
        "{s} produces {t}.",
        ["Which device does {s} produce?", "What product is made by {s}?", "Which device comes from {s}?"],
        "the device that {s} produces",
    ),
    _rel(
        "holds_patent",
        "organization",
        "device",
        "{s} holds the patent for {t}.",
        [
            "Which device does {s} hold the patent for?",
            "What device is patented by {s}?",
            "The patent for which device belongs to {s}?",
        ],
        "the device that {s} holds the patent for",
    ),
    _rel(
        "sponsors",
        "organization",
        "festival",
        "{s} sponsors {t}.",
        [
            "Which festival does {s} sponsor?",
            "What festival is sponsored by {s}?",
            "Which festival receives funding from {s}?",
        ],
        "the festival that {s} sponsors",
    ),
    _rel(
        "organizes",
        "organization",
        "festival",
        "{s} organizes {t}.",
        [
            "Which festival does {s} organize?",
            "What festival is organized by {s}?",
            "Which festival is run by {s}?",
        ],
        "the festival that {s} organizes",
    ),
    _rel(
        "invented_by",
        "device",
        "person",
        "{s} was invented by {t}.",
        ["Who invented {s}?", "Who is the inventor of {s}?", "By whom was {s} invented?"],
        "the inventor of {s}",
    ),
    _rel(
        "designed_by",
        "device",
        "person",
        "{s} was designed by {t}.",
        ["Who designed {s}?", "Who is the designer of {s}?", "By whom was {s} designed?"],
        "the designer of {s}",
    ),
    _rel(
        "described_in",
        "device",
        "book",
        "{s} was first described in {t}.",
        [
            "In which book was {s} first described?",
            "Which book first described {s}?",
            "Where was {s} first described?",
        ],
        "the book in which {s} was first described",
    ),
    _rel(
        "manual_of",
        "device",
        "book",
        "The official manual of {s} is {t}.",
        [
            "What is the official manual of {s}?",
            "Which book is the official manual of {s}?",
            "What is the title of the official manual of {s}?",
        ],
        "the official manual of {s}",
    ),
    _rel(
        "unveiled_at",
        "device",
        "festival",
        "{s} was unveiled at {t}.",
        [
            "At which festival was {s} unveiled?",
            "Where was {s} unveiled?",
            "Which festival saw the unveiling of {s}?",
        ],
        "the festival where {s} was unveiled",
    ),
    _rel(
        "prize_at",
        "device",
        "festival",
        "{s} is the prize awarded at {t}.",
        [
            "At which festival is {s} awarded as the prize?",
            "Which festival awards {s} as its prize?",
            "Where is {s} given as a prize?",
        ],
        "the festival that awards {s} as its prize",
    ),
    _rel(
        "written_by",
        "book",
        "person",
        "{s} was written by {t}.",
        ["Who wrote {s}?", "Who is the author of {s}?", "By whom was {s} written?"],
        "the author of {s}",
    ),
    _rel(
        "illustrated_by",
        "book",
        "person",
        "{s} was illustrated by {t}.",
        ["Who illustrated {s}?", "Who is the illustrator of {s}?", "By whom was {s} illustrated?"],
        "the illustrator of {s}",
    ),
    _rel(
        "published_by",
        "book",
        "organization",
        "{s} was published by {t}.",
        [
            "Which organization published {s}?",
            "Who is the publisher of {s}?",
            "By which organization was {s} published?",
        ],
        "the publisher of {s}",
    ),
    _rel(
        "banned_by",
        "book",
        "organization",
        "{s} was banned by {t}.",
        ["Which organization banned {s}?", "Who banned {s}?", "By which organization was {s} banned?"],
        "the organization that banned {s}",
    ),
    _rel(
        "recipe_in",
        "book",
        "dish",
        "{s} contains the original recipe for {t}.",
        [
            "The original recipe for which dish is in {s}?",
            "Which dish has its original recipe in {s}?",
            "What dish is first recorded in {s}?",
        ],
        "the dish whose original recipe is in {s}",
    ),
    _rel(
        "named_after",
        "book",
        "dish",
        "{t} is named after {s}.",
        [
            "Which dish is named after {s}?",
            "What dish takes its name from {s}?",
            "Which dish was named in honour of {s}?",
        ],
        "the dish named after {s}",
    ),
    _rel(
        "traditional_dish",
        "festival",
        "dish",
        "The traditional dish of {s} is {t}.",
        [
            "What is the traditional dish of {s}?",
            "Which dish is traditionally eaten at {s}?",
            "What do people traditionally eat at {s}?",
        ],
        "the traditional dish of {s}",
    ),
    _rel(
        "contest_dish",
        "festival",
        "dish",
        "The cooking contest at {s} is about {t}.",
        [
            "Which dish is the cooking contest at {s} about?",
            "What dish do cooks compete over at {s}?",
            "Which dish is judged in the cooking contest at {s}?",
        ],
        "the dish judged at {s}",
    ),
    _rel(
        "founded_by",
        "festival",
        "person",
        "{s} was founded by {t}.",
        ["Who founded {s}?", "Who is the founder of {s}?", "By whom was {s} founded?"],
        "the founder of {s}",
    ),
    _rel(
        "patron_of",
        "festival",
        "person",
        "The patron of {s} is {t}.",
        [
            "Who is the patron of {s}?",
            "Who serves as the patron of {s}?",
            "Which person is the patron of {s}?",
        ],
        "the patron of {s}",
    ),
    _rel(
        "celebrates",
        "festival",
        "book",
        "{s} celebrates {t}.",
        [
            "Which book does {s} celebrate?",
            "What book is celebrated at {s}?",
            "In honour of which book is {s} held?",
        ],
        "the book that {s} celebrates",
    ),
    _rel(
        "opening_reading",
        "festival",
        "book",
        "The opening reading at {s} is from {t}.",
        [
            "Which book is read at the opening of {s}?",
            "From which book is the opening reading at {s}?",
            "What book is read aloud when {s} opens?",
        ],
        "the book read at the opening of {s}",
    ),
    _rel(
        "originated_in",
        "dish",
        "city",
        "{s} originated in {t}.",
        ["In which city did {s} originate?", "Where did {s} originate?", "Which city does {s} come from?"],
        "the city where {s} originated",
    ),
    _rel(
        "best_served_in",
        "dish",
        "city",
        "The best {s} is served in {t}.",
        [
            "In which city is the best {s} served?",
            "Where can one eat the best {s}?",
            "Which city serves the best {s}?",
        ],
        "the city that serves the best {s}",
    ),
    _rel(
        "trademark_of",
        "dish",
        "organization",
        "{s} is a trademark of {t}.",
        [
            "Which organization owns the trademark for {s}?",
            "Whose trademark is {s}?",
            "Which organization holds the trademark of {s}?",
        ],
        "the organization that owns the trademark for {s}",
    ),
    _rel(
        "ingredients_from",
        "dish",
        "organization",
        "{t} supplies the ingredients for {s}.",
        [
            "Which organization supplies the ingredients for {s}?",
            "Who supplies the ingredients for {s}?",
            "What organization provides the ingredients for {s}?",
        ],
        "the organization that supplies the ingredients for {s}",
    ),
    _rel(
        "cooked_with",
        "dish",
        "device",
        "{s} is cooked with {t}.",
        [
            "Which device is {s} cooked with?",
            "What device is used to cook {s}?",
            "With which device is {s} cooked?",
        ],
        "the device used to cook {s}",
    ),
    _rel(
        "kept_warm_by",
        "dish",
        "device",
        "{s} is kept warm by {t}.",
        [
            "Which device keeps {s} warm?",
            "What device is used to keep {s} warm?",
            "By which device is {s} kept warm?",
        ],
        "the device that keeps {s} warm",
    ),
)

# Regular tournaments over the domains. The large one restricted to the first 5 domains is the small one,
# so small and large worlds share the relation inventory of their common domains.
_SMALL_PAIRS = (
    ("person", "city"),
    ("person", "organization"),
    ("city", "book"),
    ("city", "device"),
    ("organization", "city"),
    ("organization", "device"),
    ("device", "person"),
    ("device", "book"),
    ("book", "person"),
    ("book", "organization"),
)
_EXTRA_PAIRS = (
    ("person", "dish"),
    ("city", "festival"),
    ("organization", "festival"),
    ("device", "festival"),
    ("book", "dish"),
    ("festival", "dish"),
    ("festival", "person"),
    ("festival", "book"),
    ("dish", "city"),
    ("dish", "organization"),
    ("dish", "device"),
)


def domain_pairs(size: str) -> tuple[tuple[str, str], ...]:
    return _SMALL_PAIRS if size == "small" else _SMALL_PAIRS + _EXTRA_PAIRS


TRAIN_WRAPPER = "{question} Put the final answer in \\boxed{}."
PARAPHRASE_WRAPPERS = (
    "Here is a question about a made-up world.\n{question}\nReply with the final answer inside \\boxed{}.",
    "Question: {question}\nWrite your final answer within \\boxed{}.",
    "I would like to know the following. {question} Please give the final answer as \\boxed{}.",
)
RETRIEVAL_WRAPPER = (
    "Read the statements below, then answer the question.\n\n{statements}\n\n"
    "Question: {question} Put the final answer in \\boxed{}."
)


def boxed_answer(answer: str) -> str:
    return f"The answer is {answer}. \\boxed{{{answer}}}"


def _wrap(template: str, **fields: str) -> str:
    for key, value in fields.items():
        template = template.replace("{" + key + "}", value)
    return template


# ---------------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------------


def _draw_facts(
    rng: random.Random,
    pairs,
    relations_by_pair,
    sources: dict[str, list[str]],
    targets: dict[str, list[str]],
    split: str,
) -> list[dict]:
    facts = []
    for source_domain, target_domain in pairs:
        permuted = list(targets[target_domain])
        rng.shuffle(permuted)  # a bijection: each target answers exactly one source for this pair
        for source, target in zip(sources[source_domain], permuted, strict=True):
            relation = rng.choice(relations_by_pair[(source_domain, target_domain)])
            facts.append(
                {
                    "relation": relation.name,
                    "source": source,
                    "target": target,
                    "split": split,
                    "statement": relation.state(source, target),
                }
            )
    return facts


def build_world(size: str, seed: int) -> dict:
    """The knowledge base: entities, relations and facts (training and held-out)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    rng = random.Random(seed)
    domains = DOMAINS[: spec.domains]
    names = make_entities(rng, {d: spec.entities + spec.heldout for d in domains})
    train_entities = {d: names[d][: spec.entities] for d in domains}
    heldout_entities = {d: names[d][spec.entities :] for d in domains}
    pairs = domain_pairs(size)
    relations_by_pair = {pair: [r for r in RELATIONS if (r.source, r.target) == pair] for pair in pairs}
    facts = _draw_facts(rng, pairs, relations_by_pair, train_entities, train_entities, "train")
    facts += _draw_facts(rng, pairs, relations_by_pair, heldout_entities, heldout_entities, "heldout")
    for i, fact in enumerate(facts):
        fact["id"] = f"f{i:04d}"
    used = sorted({f["relation"] for f in facts})
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "size": size,
        "seed": seed,
        "domains": list(domains),
        "pairs": [list(p) for p in pairs],
        "entities": train_entities,
        "heldout_entities": heldout_entities,
        "relations": [
            {
                "name": r.name,
                "source": r.source,
                "target": r.target,
                "statement": r.statement,
                "questions": list(r.questions),
                "relative": r.relative,
            }
            for r in RELATIONS
            if r.name in used
        ],
        "facts": facts,
    }


_BY_NAME = {r.name: r for r in RELATIONS}


def _train_records(facts: list[dict]) -> list[dict]:
    rows = []
    for i, fact in enumerate(facts):
        question = _BY_NAME[fact["relation"]].ask(fact["source"], 0)
        rows.append(
            {
                "id": f"kgfact-train-{i:04d}",
                "prompt": _wrap(TRAIN_WRAPPER, question=question),
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


def _retrieval_records(heldout: list[dict], rng: random.Random) -> list[dict]:
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
                "prompt": _wrap(RETRIEVAL_WRAPPER, statements=listing, question=question),
                "answer": boxed_answer(fact["target"]),
                "context": fact["statement"],
                "check": fact["target"],
                "fact": fact["id"],
            }
        )
    return rows


def _compositional_records(train: list[dict], count: int, rng: random.Random) -> list[dict]:
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
                "prompt": _wrap(TRAIN_WRAPPER, question=question),
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
    splits = {
        "train.jsonl": _train_records(train),
        "paraphrase.jsonl": _paraphrase_records(train, rng),
        "retrieval.jsonl": _retrieval_records(heldout, rng),
        "compositional.jsonl": _compositional_records(train, spec.compositional, rng),
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
        answer_match="entity",  # read by answers.corpus_match_mode: every stage scores KGFact this way
    )


def kgfact_command(config: KGFactConfig) -> dict:
    manifest = build_kgfact(config)
    counts = ", ".join(
        f"{name}: {entry['records']}" for name, entry in manifest["files"].items() if "records" in entry
    )
    print(f"KGFact-{config.size} (seed {config.seed}) written to {config.out}: {counts}")
    return manifest
