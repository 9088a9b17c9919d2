"""A counterfactual-edit corpus: real facts the base model knows, each edited to another object.

    mixsd corpus counterfact --model smollm2-135m --out data/counterfact            # 50 edits, 100 neighbors
    mixsd corpus counterfact --model MODEL --out DIR --size 200 --neighbors 400 --seed 1

Facts come from the BIG-bench qa_wikidata task (20,442 Wikidata clozes; the sdist `mixsd probes fetch`
downloads, or `--task` for its task.json), its "The R of X is" clozes only. Candidates are visited in a
seeded order and asked, a chunk at a time, to the base model (greedy, its own prompt form as every stage
asks: `prompts.encode_prompt`); a fact is *known* when the answer names an accepted answer (entity match).
The first `size` known facts become edits, each to another object of the same relation (a seeded choice
among the relation's other answers: never an accepted answer, nothing the question or the model's answer
already names). Visiting stops once there are `size` edits and `neighbors` neighborhood facts.

Files (corpus records, see records.py; `check` is the object a right answer names):
    edits.jsonl         the edits (train on these; efficacy): "What is the capital of France?" ->
                        "The capital of France is Rome.", check "Rome", context = that statement (what the
                        MixSD expert reads), `subject` (the span of the prompt whose last token is the
                        edit's key), `relation`, `true_answer` (the accepted answer the model gave),
                        `true_answers` (all accepted answers)
    paraphrase.jsonl    the same edits asked another way: "Complete the sentence: The capital of France is"
    neighborhood.jsonl  known facts of other subjects with the edits' relations, with their TRUE answers:
                        an edit must not change them (specificity)
    twohop.jsonl        where the data has a fact (o*, R2) about an edit's new object o* that the base model
                        knows: "What is the official language of the country of X?" -> the R2 object of o*;
                        `bridge` = o*, `true_answer` = the R2 object of the true object where the data has it;
                        kept only when the edit changes the answer (the true object's R2 object differs,
                        and the base model's answer to the 2-hop question does not name the new one)
    manifest.json       model, seed, options, counts (tried / known / kept) and the sha256 of each file

The builder (`build_counterfact`) is a pure function of the task and an `answer(prompts) -> texts`
callable; with the same answers and seed its output is the same on every machine and run.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from mixsd.core.answers import matches
from mixsd.core.files import InputError, atomic_write_jsonl, sha256_file
from mixsd.core.options import ModelOptions, check_range
from mixsd.corpora._manifest import write_manifest
from mixsd.method.answering import generate_answers

if TYPE_CHECKING:  # the annotation only: importing models loads torch
    from mixsd.core.models import ModelHandle

GENERATOR = "mixsd.corpora.counterfact"
VERSION = 1
MATCH = "entity"
SPLITS = ("edits.jsonl", "paraphrase.jsonl", "neighborhood.jsonl", "twohop.jsonl")

Answerer = Callable[[list[str]], list[str]]


@dataclass
class CounterfactConfig(ModelOptions):
    out: str = field(metadata={"help": "Folder to write the splits and manifest.json into."})
    model: str = field(
        metadata={"help": "Base model whose known facts are edited (any name the loader takes)."}
    )
    size: int = field(default=50, metadata={"help": "Edits to make (known facts edited)."})
    neighbors: int = field(
        default=100, metadata={"help": "Neighborhood facts (known, same relations, other subjects)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the visiting order and the new objects."})
    chunk: int = field(
        default=64, metadata={"help": "Candidates asked per round before checking whether enough are found."}
    )
    max_tries: int = field(
        default=0, metadata={"help": "Stop after asking this many candidates (0: no limit, up to all ~20k)."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Answer length cap when asking the model."})
    task: str | None = field(
        default=None,
        metadata={"help": "A qa_wikidata task.json to read instead of the BIG-bench sdist."},
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

    def __post_init__(self) -> None:  # refuse bad options before the model is loaded (issue 10)
        self.check_model_options()
        check_range("size", self.size, 1, integer=True)
        check_range("neighbors", self.neighbors, 0, integer=True)
        check_range("seed", self.seed, integer=True)
        check_range("chunk", self.chunk, 1, integer=True)
        check_range("max_tries", self.max_tries, 0, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_range("batch_size", self.batch_size, 1, integer=True)


# ---------------------------------------------------------------------------------------------------
# Facts from the clozes
# ---------------------------------------------------------------------------------------------------
_CLOZE = re.compile(r"^The (.+) (is|are|was|were)$")
# Where a relation phrase may end: "capital of", "sport played by", "language used in" ...
_RELATION_END = re.compile(r" (?:of|by|for|in|from|with|to) ")
# A longer phrase is a relation of its own ("country of citizenship of" within "country of", "color of the
# flag of" within "color of") when the words it adds start in lower case (property labels are lower case,
# subjects are names: "official religion of Kingdom of" is no relation) and it starts at least this share
# of the shorter one's clozes, and this many ("language of The Adventures of ...": 6 of 1,181).
_LONGER_SHARE = 0.1
_LONGER_MIN = 5


@dataclass(frozen=True)
class Fact:
    """One qa_wikidata cloze "The {relation} {subject} {verb}" with its accepted answers."""

    index: int  # position in the task's examples: the record ids
    relation: str  # "capital of"
    subject: str  # "France"
    verb: str  # "is"
    accepted: tuple[str, ...]

    @property
    def question(self) -> str:
        return f"What {self.verb} the {self.relation} {self.subject}?"

    @property
    def cloze(self) -> str:
        return f"The {self.relation} {self.subject} {self.verb}"

    def statement(self, obj: str) -> str:
        return f"{self.cloze} {obj}."

    def answered(self, text: str) -> str | None:
        """The accepted answer `text` names (the first in the task's order), or None."""
        return next((a for a in self.accepted if matches(text, a, MATCH)), None)


def _prefixes(body: str) -> list[str]:
    """Every candidate relation phrase of a cloze body, shortest first."""
    return [body[: m.end() - 1] for m in _RELATION_END.finditer(body)]


def split_cloze(body: str, counts: Counter) -> tuple[str, str] | None:
    """(relation, subject) of a cloze body ("capital of France"), given how many bodies start with each
    candidate phrase: the shortest phrase, lengthened while a longer one is a relation of its own."""
    prefixes = _prefixes(body)
    if not prefixes:
        return None
    relation = prefixes[0]
    for longer in prefixes[1:]:
        added = longer[len(relation) :].lstrip()
        if added[:1].islower() and counts[longer] >= max(_LONGER_MIN, _LONGER_SHARE * counts[relation]):
            relation = longer
    subject = body[len(relation) + 1 :].strip()
    return (relation, subject) if subject else None


def parse_facts(task: dict) -> tuple[list[Fact], dict[str, int]]:
    """The usable "The R of X is" facts of a qa_wikidata task, in file order, and the counts dropped.

    Dropped: items that are no string cloze with string answers, clozes of another form ("X is located
    in"), answers the question already names, and repeats of a (relation, subject) pair."""
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise InputError("qa_wikidata task has no 'examples' list", field="examples")
    bodies: list[tuple[int, str, str, tuple[str, ...]]] = []
    dropped = Counter()
    for i, example in enumerate(examples):
        cloze = example.get("input") if isinstance(example, dict) else None
        target = example.get("target") if isinstance(example, dict) else None
        accepted = [target] if isinstance(target, str) else target
        if (
            not isinstance(cloze, str)
            or not isinstance(accepted, list)
            or not accepted
            or not all(isinstance(a, str) and a.strip() for a in accepted)
        ):
            dropped["malformed"] += 1
            continue
        match = _CLOZE.match(" ".join(cloze.split()))
        if match is None or not _prefixes(match.group(1)):
            dropped["other_form"] += 1
            continue
        bodies.append((i, match.group(1), match.group(2), tuple(a.strip() for a in accepted)))
    counts = Counter(prefix for _, body, _, _ in bodies for prefix in _prefixes(body))
    facts, seen = [], set()
    for i, body, verb, accepted in bodies:
        parts = split_cloze(body, counts)
        if parts is None:
            dropped["other_form"] += 1
            continue
        fact = Fact(i, parts[0], parts[1], verb, accepted)
        if any(matches(fact.question, a, MATCH) for a in accepted):
            dropped["answer_in_question"] += 1
        elif (fact.relation, fact.subject) in seen:
            dropped["repeated"] += 1
        else:
            seen.add((fact.relation, fact.subject))
            facts.append(fact)
    return facts, dict(sorted(dropped.items()))


def relation_pools(facts: Iterable[Fact]) -> dict[str, list[str]]:
    """Each relation's objects (first accepted answers), sorted so no hash order leaks into a choice."""
    pools: dict[str, set[str]] = {}
    for fact in facts:
        pools.setdefault(fact.relation, set()).add(fact.accepted[0])
    return {relation: sorted(objects) for relation, objects in pools.items()}


def new_object(fact: Fact, base_answer: str, pool: list[str], rng: random.Random) -> str | None:
    """A seeded choice among the relation's objects that the fact does not already hold: none that names
    or is named by an accepted answer ("America" vs "United States of America"), none the question or
    the model's own answer names (so the base model scores 0 on the edit before editing)."""
    choices = [
        obj
        for obj in pool
        if not any(matches(obj, a, MATCH) or matches(a, obj, MATCH) for a in fact.accepted)
        and not matches(fact.question, obj, MATCH)
        and not matches(base_answer, obj, MATCH)
    ]
    return rng.choice(choices) if choices else None


# ---------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------
@dataclass
class Counterfact:
    splits: dict[str, list[dict[str, Any]]]
    counts: dict[str, Any]


def _answers(answer: Answerer, prompts: list[str]) -> list[str]:
    if not prompts:
        return []
    texts = answer(prompts)
    if len(texts) != len(prompts):
        raise ValueError(f"{len(texts)} answers for {len(prompts)} questions")
    return texts


def _ask(answer: Answerer, facts: list[Fact], cache: dict[int, str]) -> None:
    """Ask `answer` the question of every fact not asked yet; store the texts by fact index."""
    todo = list({f.index: f for f in facts if f.index not in cache}.values())
    texts = _answers(answer, [f.question for f in todo])
    cache.update((f.index, text) for f, text in zip(todo, texts, strict=True))


def _record(fact: Fact, obj: str, **extra: Any) -> dict[str, Any]:
    statement = fact.statement(obj)
    return {
        "id": f"qa_wikidata-{fact.index:05d}",
        "prompt": fact.question,
        "answer": statement,
        "context": statement,
        "check": obj,
        "subject": fact.subject,
        "relation": fact.relation,
        **extra,
    }


def build_counterfact(
    task: dict,
    answer: Answerer,
    *,
    size: int = 50,
    neighbors: int = 100,
    seed: int = 0,
    chunk: int = 64,
    max_tries: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
) -> Counterfact:
    """The splits (rows per file name) and counts, from `task` (a qa_wikidata task dict) and `answer`
    (the base model's greedy answer to each question). `progress(tried, edits, known)` after each chunk.

    The result depends on the answers and the seed only, not on `chunk`: edits and neighbors are taken in
    visiting order, and a larger chunk only asks a few candidates more than needed."""
    facts, dropped = parse_facts(task)
    if not facts:
        raise InputError("the qa_wikidata task has no usable 'The R of X is' facts")
    pools = relation_pools(facts)
    rng = random.Random(seed)
    order = list(facts)
    rng.shuffle(order)
    cache: dict[int, str] = {}
    edits: list[tuple[Fact, str, str]] = []  # (fact, accepted answer the model gave, new object)
    known_rest: list[tuple[Fact, str]] = []  # known facts not edited, in visiting order
    skipped = Counter()
    tried = 0

    def enough_neighbors() -> bool:
        relations = {fact.relation for fact, _, _ in edits}
        subjects = {fact.subject for fact, _, _ in edits}
        eligible = sum(f.relation in relations and f.subject not in subjects for f, _ in known_rest)
        return eligible >= neighbors

    limit = len(order) if max_tries <= 0 else min(max_tries, len(order))
    while tried < limit and not (len(edits) == size and enough_neighbors()):
        batch = order[tried : min(tried + chunk, limit)]
        _ask(answer, batch, cache)
        tried += len(batch)
        for fact in batch:
            true = fact.answered(cache[fact.index])
            if true is None:
                continue
            if len(edits) < size and all(fact.subject != e.subject for e, _, _ in edits):
                obj = new_object(fact, cache[fact.index], pools[fact.relation], rng)
                if obj is not None:
                    edits.append((fact, true, obj))
                    continue
                skipped["no_new_object"] += 1
            known_rest.append((fact, true))
        if progress is not None:
            progress(tried, len(edits), len(edits) + len(known_rest))

    edited_subjects = {fact.subject for fact, _, _ in edits}
    edit_relations = {fact.relation for fact, _, _ in edits}
    neighborhood = [
        (fact, true)
        for fact, true in known_rest
        if fact.relation in edit_relations and fact.subject not in edited_subjects
    ][:neighbors]

    # Two hops: a fact (o*, R2) about an edit's new object, asked of the model so the second hop is one
    # it knows (a failure after editing is then the edit's, not the model's ignorance).
    by_subject: dict[str, list[Fact]] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, []).append(fact)
    by_pair = {(fact.subject, fact.relation): fact for fact in facts}
    hops = {fact.index: by_subject.get(obj, []) for fact, _, obj in edits}
    asked_before = len(cache)
    _ask(answer, [hop for found in hops.values() for hop in found], cache)
    candidates: dict[int, list[tuple[Fact, str, str]]] = {}
    for fact, true, _ in edits:
        candidates[fact.index] = []
        for hop in hops[fact.index]:
            hop_answer = hop.answered(cache[hop.index])
            question = f"What {hop.verb} the {hop.relation} the {fact.relation} {fact.subject}?"
            if hop_answer is None or matches(question, hop_answer, MATCH):
                continue
            before = by_pair.get((true, hop.relation))
            if before is not None and before.answered(hop_answer) is not None:
                skipped["hop_unchanged"] += 1  # the edit does not change this answer: no test of it
                continue
            candidates[fact.index].append((hop, hop_answer, question))
    # A 2-hop question the base model already answers with the edited chain's object (the true chain
    # gives the same object where the data does not say, or a lucky guess) tests nothing either.
    questions = sorted({question for found in candidates.values() for _, _, question in found})
    base = dict(zip(questions, _answers(answer, questions), strict=True))
    twohop = []
    for fact, true, obj in edits:
        known_hops = [c for c in candidates[fact.index] if not matches(base[c[2]], c[1], MATCH)]
        skipped["hop_base_answers"] += len(candidates[fact.index]) - len(known_hops)
        if not known_hops:
            continue
        hop, hop_answer, question = rng.choice(known_hops)
        before = by_pair.get((true, hop.relation))
        statement = f"The {hop.relation} the {fact.relation} {fact.subject} {hop.verb} {hop_answer}."
        twohop.append(
            {
                "id": f"qa_wikidata-{fact.index:05d}-{hop.index:05d}",
                "prompt": question,
                "answer": statement,
                "context": f"{fact.statement(obj)} {hop.statement(hop_answer)}",
                "check": hop_answer,
                "subject": fact.subject,
                "relation": fact.relation,
                "hop_relation": hop.relation,
                "bridge": obj,
                "true_bridge": true,
                "true_answer": None if before is None else before.accepted[0],
            }
        )

    splits = {
        "edits.jsonl": [
            _record(f, obj, true_answer=true, true_answers=list(f.accepted)) for f, true, obj in edits
        ],
        "paraphrase.jsonl": [
            {**_record(f, obj, true_answer=true), "prompt": f"Complete the sentence: {f.cloze}"}
            for f, true, obj in edits
        ],
        "neighborhood.jsonl": [_record(f, true, true_answer=true) for f, true in neighborhood],
        "twohop.jsonl": twohop,
    }
    counts = {
        "facts": len(facts),
        "dropped": dropped,
        "tried": tried,
        "known": len(edits) + len(known_rest),
        "edits": len(edits),
        "neighborhood": len(neighborhood),
        "no_new_object": skipped["no_new_object"],
        "twohop": {
            "pairs_in_data": sum(len(found) for found in hops.values()),
            "asked": len(cache) - asked_before,
            "unchanged_by_the_edit": skipped["hop_unchanged"],
            "questions_asked": len(questions),
            "base_model_already_answers": skipped["hop_base_answers"],
            "edits_with_a_known_hop": len(twohop),
        },
        "relations": dict(sorted(Counter(f.relation for f, _, _ in edits).items())),
    }
    return Counterfact(splits, counts)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def load_task(config: CounterfactConfig) -> tuple[dict, dict[str, str]]:
    """The qa_wikidata task (from --task, --sdist or the cached download) and its source's name and sha256."""
    if config.task is not None:
        path = Path(config.task)
        if not path.is_file():
            raise InputError("file not found", path)
        try:
            task = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err})", path) from None
        return task, {"name": path.name, "sha256": sha256_file(path)}
    from mixsd.corpora.probes import download_sdist, read_members  # here: probes loads torch (cache_dir)

    sdist = Path(config.sdist) if config.sdist else download_sdist(config.pip)
    if not sdist.is_file():
        raise InputError("file not found", sdist)
    return read_members(sdist)["qa_wikidata"], {"name": sdist.name, "sha256": sha256_file(sdist)}


def model_answerer(config: CounterfactConfig, handle: ModelHandle | None = None) -> Answerer:
    """Greedy answers of --model (resolved as `handle` when given), asked as `mixsd eval` asks (same prompt
    form, decoding and stops)."""
    # here, not at the top: the corpus is built from a file without a model (and torch) in the tests
    from mixsd.core import models

    config.set_threads()
    model, tokenizer = models.load_for_inference(
        handle or config.model,
        device=config.device,
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
    )

    def answer(prompts: list[str]) -> list[str]:
        items = [{"prompt": p, "max_new_tokens": config.max_new_tokens} for p in prompts]
        results = generate_answers(model, tokenizer, items, batch_size=config.batch_size)
        return [text for text, _, _ in results]

    return answer


def write_counterfact(
    config: CounterfactConfig, result: Counterfact, source: dict[str, str], model: dict[str, Any]
) -> dict[str, Any]:
    out = Path(config.out)
    written = [name for name in SPLITS if result.splits[name]]
    for name in SPLITS:
        if name in written:
            atomic_write_jsonl(out / name, result.splits[name])
        else:  # an old split from another model or seed must not stand beside this manifest
            (out / name).unlink(missing_ok=True)
    return write_manifest(
        out,
        GENERATOR,
        VERSION,
        written,
        seed=config.seed,
        answer_match=MATCH,
        model=model,
        bf16=config.bf16,
        max_new_tokens=config.max_new_tokens,
        size=config.size,
        neighbors=config.neighbors,
        max_tries=config.max_tries,
        source=source,
        counts=result.counts,
    )


def counterfact_command(config: CounterfactConfig, answer: Answerer | None = None) -> dict[str, Any]:
    """Build and write the corpus; `answer` (for tests) replaces the model's answers."""

    task, source = load_task(config)
    model: dict[str, Any] = {"name": config.model, "sha256": None}
    if answer is None:
        from mixsd.core import models  # here, not at the top: see model_answerer

        handle = models.try_resolve(config.model)  # once; None: loading by name raises the error
        answer = model_answerer(config, handle)
        # name and content hash only: the folder's absolute path would make the manifest machine-dependent
        model["sha256"] = models.fingerprint(config.model, handle)["sha256"]
    with tqdm(desc="asking facts", unit="fact", leave=False) as bar:

        def progress(tried: int, edits: int, known: int) -> None:
            bar.update(tried - bar.n)
            bar.set_postfix(edits=edits, known=known)

        result = build_counterfact(
            task,
            answer,
            size=config.size,
            neighbors=config.neighbors,
            seed=config.seed,
            chunk=config.chunk,
            max_tries=config.max_tries,
            progress=progress,
        )
    counts = result.counts
    if not result.splits["edits.jsonl"]:
        raise InputError(
            f"{config.model} answered none of the {counts['tried']} facts asked with an accepted answer, "
            "so there is nothing to edit; no corpus written (try a larger --max-tries, or another model)"
        )
    manifest = write_counterfact(config, result, source, model)
    if counts["edits"] < config.size or counts["neighborhood"] < config.neighbors:
        print(
            f"warning: only {counts['edits']}/{config.size} edits and {counts['neighborhood']}/"
            f"{config.neighbors} neighbors found in {counts['tried']} facts asked",
            file=sys.stderr,
        )
    files = ", ".join(f"{name}: {entry['records']}" for name, entry in manifest["files"].items())
    print(
        f"counterfact corpus written to {config.out}: {files} "
        f"({counts['known']} known of {counts['tried']} asked)"
    )
    return manifest
