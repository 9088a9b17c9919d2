"""KGFact's relations: two per ordered pair of domains, each with its statement, question phrasings and
relative clause, and the regular tournaments of domain pairs that a small or large world uses
(mixsd.corpora.kgfact builds the corpus; mixsd.corpora.kgfact_world draws the world from these)."""

from __future__ import annotations

from dataclasses import dataclass


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
