"""KGFunc: novel digit operations on integers in [0, 99999], learned from examples and worked solutions.

    mixsd corpus kgfunc --train 1600 --seed 0 --out data/kgfunc

Seven trained operations with opaque one-letter labels (digits d_1..d_n of the input, left to right):
    B  sum of (d - min d)^2            C  |d1^2 - d2^2 + d3^2 - ...|      D  sum of (d^2 if d is prime else d)
    E  sum of d_i * d_(n+1-i)          F  sum of the running maxima       G  sum of d(d+1)/2
    H  smallest cyclic rotation of the digit string, read as an integer (leading zeros drop)
Every prompt shows 10 input/output examples; every target computes step by step, one arithmetic identity
per line ("a = b = c", each side evaluable), and ends with "The answer is N. \\boxed{N}".

Files (corpus records, see records.py; `check` is the integer as text):
    train.jsonl          N records (default 1,600), balanced over the seven operations
    test.jsonl           25 held-out inputs per operation (never a training query or example input)
    unseen.jsonl         20 easy operations never trained x 25 inputs: the forgetting probe; short targets
    compositional.jsonl  2-step chains outer(inner(x) + k), e.g. E(B(x) + 500), 3 per ordered pair
    manifest.json        generator, version, seed, record counts and sha256 of each file
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mixsd.core.files import atomic_write_jsonl
from mixsd.core.options import check_range
from mixsd.corpora._manifest import write_manifest

GENERATOR = "mixsd.corpora.kgfunc"
VERSION = 1
MAX_INPUT = 99_999
EXAMPLES = 10
TEST_PER_OP = 25
UNSEEN_PER_OP = 25
CHAINS_PER_PAIR = 3
OFFSETS = (0, 100, 500, 1000)


@dataclass
class KGFuncConfig:
    out: str = field(
        metadata={"help": "Folder to write train/test/unseen/compositional.jsonl and manifest.json into."}
    )
    train: int = field(default=1600, metadata={"help": "Training records, balanced over the operations B-H."})
    seed: int = field(default=0, metadata={"help": "Seed of the inputs and examples."})

    def __post_init__(self) -> None:  # refuse bad options before any file is written (issue 10)
        check_range("train", self.train, 1, integer=True)
        check_range("seed", self.seed, integer=True)


def digits(x: int) -> list[int]:
    return [int(c) for c in str(abs(x))]


def _chain(*parts: str) -> str:
    """ "a = b = c" with repeated neighbours dropped (a one-term sum needs no second side)."""
    kept = [p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]]
    return " = ".join(kept)


def _sum_lines(terms: list[str], values: list[int]) -> list[str]:
    total = sum(values)
    if terms == [str(total)]:  # a one-digit input whose only term needs no working
        return [f"There is only one term, so the sum is {total}."]
    return [_chain(" + ".join(terms), " + ".join(map(str, values)), str(total))]


def _digit_line(x: int) -> str:
    return f"The digits of {x} are {', '.join(map(str, digits(x)))}."


# Each worked operation returns (result, lines of working). Every line with " = " is an identity.


def op_b(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    low = min(ds)
    lines = [_digit_line(x), _chain(f"min({', '.join(map(str, ds))})", str(low))]
    values = [(d - low) ** 2 for d in ds]
    return sum(values), lines + _sum_lines([f"({d} - {low})^2" for d in ds], values)


def op_c(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    signed = [d * d if i % 2 == 0 else -d * d for i, d in enumerate(ds)]
    expr = f"{ds[0]}^2" + "".join(f" {'+' if i % 2 == 0 else '-'} {d}^2" for i, d in enumerate(ds) if i)
    vals = str(signed[0]) + "".join(f" {'+' if v >= 0 else '-'} {abs(v)}" for v in signed[1:])
    total = sum(signed)
    lines = [_digit_line(x), _chain(expr, vals, str(total)), f"|{total}| = {abs(total)}"]
    return abs(total), lines


PRIMES = frozenset({2, 3, 5, 7})


def op_d(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    terms = [f"{d}^2" if d in PRIMES else str(d) for d in ds]
    values = [d * d if d in PRIMES else d for d in ds]
    lines = [_digit_line(x), "The prime digits (2, 3, 5, 7) are squared; the others are kept."]
    return sum(values), lines + _sum_lines(terms, values)


def op_e(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    n = len(ds)
    terms = [f"{ds[i]}*{ds[n - 1 - i]}" for i in range(n)]
    values = [ds[i] * ds[n - 1 - i] for i in range(n)]
    lines = [_digit_line(x), "Multiply each digit by the digit in the mirrored position."]
    return sum(values), lines + _sum_lines(terms, values)


def op_f(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    lines = [_digit_line(x)]
    running = [ds[0]]
    for d in ds[1:]:
        running.append(max(running[-1], d))
        lines.append(f"max({running[-2]}, {d}) = {running[-1]}")
    lines.append(f"The running maxima are {', '.join(map(str, running))}.")
    return sum(running), lines + _sum_lines(list(map(str, running)), running)


def op_g(x: int) -> tuple[int, list[str]]:
    ds = digits(x)
    values = [d * (d + 1) // 2 for d in ds]
    return sum(values), [_digit_line(x)] + _sum_lines([f"{d}*{d + 1}/2" for d in ds], values)


def op_h(x: int) -> tuple[int, list[str]]:
    s = str(x)
    rotations = [s[i:] + s[:i] for i in range(len(s))]
    best = min(int(r) for r in rotations)
    lines = [f"The rotations of {s} are {', '.join(rotations)}.", f"min({', '.join(rotations)}) = {best}"]
    return best, lines


TRAINED: dict[str, Callable[[int], tuple[int, list[str]]]] = {
    "B": op_b,
    "C": op_c,
    "D": op_d,
    "E": op_e,
    "F": op_f,
    "G": op_g,
    "H": op_h,
}


def apply(label: str, x: int) -> int:
    return TRAINED[label](x)[0]


def _digital_root(x: int) -> int:
    while x >= 10:
        x = sum(digits(x))
    return x


def _nonzero_product(x: int) -> int:
    nonzero = [d for d in digits(x) if d]
    if not nonzero:  # only for x = 0: no non-zero digit, defined as 0
        return 0
    product = 1
    for d in nonzero:
        product *= d
    return product


# The forgetting probe: easy operations, never trained, each under its own opaque label.
UNSEEN: dict[str, tuple[str, Callable[[int], int]]] = {
    f"U{i + 1}": item
    for i, item in enumerate(
        [
            ("digit sum", lambda x: sum(digits(x))),
            ("product of non-zero digits", _nonzero_product),
            ("digit count", lambda x: len(digits(x))),
            ("largest digit", lambda x: max(digits(x))),
            ("smallest digit", lambda x: min(digits(x))),
            ("first digit", lambda x: digits(x)[0]),
            ("last digit", lambda x: digits(x)[-1]),
            ("largest minus smallest digit", lambda x: max(digits(x)) - min(digits(x))),
            ("reversed number", lambda x: int(str(x)[::-1])),
            ("first plus last digit", lambda x: digits(x)[0] + digits(x)[-1]),
            ("count of even digits", lambda x: sum(d % 2 == 0 for d in digits(x))),
            ("count of odd digits", lambda x: sum(d % 2 == 1 for d in digits(x))),
            ("count of distinct digits", lambda x: len(set(digits(x)))),
            ("digital root", _digital_root),
            ("sum of squared digits", lambda x: sum(d * d for d in digits(x))),
            ("digits sorted ascending", lambda x: int("".join(sorted(str(x))))),
            ("digits sorted descending", lambda x: int("".join(sorted(str(x), reverse=True)))),
            ("count of zero digits", lambda x: str(x).count("0")),
            ("twice the digit sum", lambda x: 2 * sum(digits(x))),
            ("first times last digit", lambda x: digits(x)[0] * digits(x)[-1]),
        ]
    )
}


def worked_answer(label: str, x: int) -> str:
    value, lines = TRAINED[label](x)
    return "\n".join([*lines, f"The answer is {value}. \\boxed{{{value}}}"])


def _examples(label: str, fn: Callable[[int], int], inputs: list[int]) -> str:
    return "\n".join(f"{label}({a}) = {fn(a)}" for a in inputs)


def single_prompt(
    label: str, fn: Callable[[int], int], x: int, example_inputs: list[int], *, worked: bool
) -> str:
    ask = (
        "Work it out step by step and put the final answer in \\boxed{}."
        if worked
        else "Put the final answer in \\boxed{}."
    )
    return (
        f"Function {label} maps integers to integers. Examples:\n{_examples(label, fn, example_inputs)}\n\n"
        f"What is {label}({x})? {ask}"
    )


def chain_prompt(
    inner: str, outer: str, offset: int, x: int, inner_examples: list[int], outer_examples: list[int]
) -> str:
    call = f"{outer}({inner}({x}){f' + {offset}' if offset else ''})"
    return (
        f"Functions {inner} and {outer} map integers to integers. Examples of {inner}:\n"
        f"{_examples(inner, lambda a: apply(inner, a), inner_examples)}\n"
        f"Examples of {outer}:\n{_examples(outer, lambda a: apply(outer, a), outer_examples)}\n\n"
        f"What is {call}? Work it out step by step and put the final answer in \\boxed{{}}."
    )


def chain_answer(inner: str, outer: str, offset: int, x: int) -> tuple[int, str]:
    first, first_lines = TRAINED[inner](x)
    lines = [f"First compute {inner}({x}).", *first_lines, f"So {inner}({x}) is {first}."]
    y = first + offset
    if offset:
        lines.append(f"{first} + {offset} = {y}")
    result, second_lines = TRAINED[outer](y)
    lines += [f"Now compute {outer}({y}).", *second_lines, f"The answer is {result}. \\boxed{{{result}}}"]
    return result, "\n".join(lines)


class _Inputs:
    """Draws inputs from one seeded stream; inputs reserved for tests never appear in training prompts."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.reserved: set[int] = set()

    def fresh(self, taken: set[int]) -> int:
        while True:
            x = self.rng.randint(0, MAX_INPUT)
            if x not in taken and x not in self.reserved:
                taken.add(x)
                return x

    def examples(self, exclude: int) -> list[int]:
        """EXAMPLES distinct unreserved inputs other than `exclude` (the question's own input)."""
        chosen: set[int] = {exclude}
        out = []
        while len(out) < EXAMPLES:
            x = self.rng.randint(0, MAX_INPUT)
            if x not in chosen and x not in self.reserved:
                chosen.add(x)
                out.append(x)
        return out


def _record(kind: str, i: int, prompt: str, answer: str, value: int, **extra) -> dict:
    return {"id": f"kgfunc-{kind}-{i:05d}", "prompt": prompt, "answer": answer, "check": str(value), **extra}


def build_kgfunc(config: KGFuncConfig) -> dict:
    """Write the corpus folder and return its manifest."""
    if config.train < 1:
        raise ValueError("--train must be at least 1")
    draw = _Inputs(random.Random(config.seed))
    labels = sorted(TRAINED)

    # Held-out inputs first, so they can be kept out of every training prompt.
    test_inputs = {label: [] for label in labels}
    for label in labels:
        for _ in range(TEST_PER_OP):
            test_inputs[label].append(draw.fresh(draw.reserved))
    pairs = [(a, b) for a in labels for b in labels if a != b]
    chain_inputs = [draw.fresh(draw.reserved) for _ in range(len(pairs) * CHAINS_PER_PAIR)]

    train, seen = [], {label: set() for label in labels}
    for i in range(config.train):
        label = labels[i % len(labels)]
        x = draw.fresh(seen[label])
        fn = TRAINED[label]
        value, _ = fn(x)
        prompt = single_prompt(label, lambda a, fn=fn: fn(a)[0], x, draw.examples(x), worked=True)
        train.append(_record("train", i, prompt, worked_answer(label, x), value, op=label, input=x))

    test = []
    for label in labels:
        for x in test_inputs[label]:
            value = apply(label, x)
            prompt = single_prompt(
                label, lambda a, label=label: apply(label, a), x, draw.examples(x), worked=True
            )
            test.append(_record("test", len(test), prompt, worked_answer(label, x), value, op=label, input=x))

    unseen = []
    for label, (name, fn) in UNSEEN.items():
        asked: set[int] = set()  # distinct inputs within an operation
        for _ in range(UNSEEN_PER_OP):
            x = draw.fresh(asked)
            value = fn(x)
            prompt = single_prompt(label, fn, x, draw.examples(x), worked=False)
            unseen.append(
                _record(
                    "unseen",
                    len(unseen),
                    prompt,
                    f"The answer is {value}. \\boxed{{{value}}}",
                    value,
                    op=label,
                    operation=name,
                    input=x,
                )
            )

    compositional = []
    for i, x in enumerate(chain_inputs):
        inner, outer = pairs[i % len(pairs)]
        offset = OFFSETS[(i + i // len(pairs)) % len(OFFSETS)]  # each pair meets several offsets
        value, answer = chain_answer(inner, outer, offset, x)
        prompt = chain_prompt(inner, outer, offset, x, draw.examples(x), draw.examples(x))
        compositional.append(
            _record("compositional", i, prompt, answer, value, op=f"{outer}({inner}(x)+{offset})", input=x)
        )

    out = Path(config.out)
    splits = {
        "train.jsonl": train,
        "test.jsonl": test,
        "unseen.jsonl": unseen,
        "compositional.jsonl": compositional,
    }
    for name, rows in splits.items():
        atomic_write_jsonl(out / name, rows)
    return write_manifest(
        out, GENERATOR, VERSION, list(splits), seed=config.seed, train=config.train, answer_match="number"
    )


def kgfunc_command(config: KGFuncConfig) -> dict:
    manifest = build_kgfunc(config)
    counts = ", ".join(f"{name}: {entry['records']}" for name, entry in manifest["files"].items())
    print(f"KGFunc (seed {config.seed}) written to {config.out}: {counts}")
    return manifest
