"""KGFact's world: invented entity names and the facts drawn between them (mixsd.corpora.kgfact writes the
corpus from it). Everything comes from one `random.Random(seed)` consumed in a fixed order, so the world is
identical on every machine and run."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mixsd.corpora._common_words import COMMON_WORDS
from mixsd.corpora.kgfact_relations import RELATIONS, domain_pairs

GENERATOR = "mixsd.corpora.kgfact"
VERSION = 2  # 2: records carry the fact's statement as `context`


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
