"""KGFact: golden checksums, determinism across hash seeds, one answer per question, splits as specified."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixsd.core.answers import last_boxed, matches
from mixsd.core.records import load_corpus
from mixsd.corpora import kgfact, kgfact_world
from mixsd.corpora.kgfact import DOMAINS, RELATIONS, KGFactConfig, build_kgfact, build_world, domain_pairs

# Pinned output of `mixsd corpus kgfact --size small --seed 0`: any change to names, relations, sampling or
# record layout shows up here, and must come with a VERSION bump.
GOLDEN_SMALL = {
    "train.jsonl": (100, "e173834fcab290ca61bf6c6627af5c1fb9c10c93d44a12ce1739628bad6ac072"),
    "paraphrase.jsonl": (100, "61e211af689a027f1866884f36cc84e09e4785a07a9e22aaa55428b250b1b00d"),
    "retrieval.jsonl": (50, "689c57af270fdf1b6627feab525bcf42cac112e8c4b7d96b33f4be261cb06cd7"),
    "compositional.jsonl": (100, "b3b07ac3fb8c9987a611f4a986037fb7617d12cbd0798f4ac3054e2ff78f6dea"),
    "kb.json": (None, "e980f9d0ad8869b5725a66aa5807e1c605611264b7b40601b4048df4f9bcaf26"),
}
SPLITS = ("train.jsonl", "paraphrase.jsonl", "retrieval.jsonl", "compositional.jsonl")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kgfact-small")
    return out, build_kgfact(KGFactConfig(out=str(out), size="small", seed=0))


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kgfact-large")
    return out, build_kgfact(KGFactConfig(out=str(out), size="large", seed=3))


def rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]


def test_golden_small(small):
    _, manifest = small
    for name, (count, digest) in GOLDEN_SMALL.items():
        assert manifest["files"][name].get("records") == count
        assert manifest["files"][name]["sha256"] == digest, name
    assert manifest["generator"] == "mixsd.corpora.kgfact" and manifest["seed"] == 0


def test_large_counts(large):
    _, manifest = large
    counts = {name: manifest["files"][name]["records"] for name in SPLITS}
    assert counts == {
        "train.jsonl": 525,
        "paraphrase.jsonl": 525,
        "retrieval.jsonl": 210,
        "compositional.jsonl": 500,
    }


def test_same_bytes_under_any_hash_seed(tmp_path, small):
    """Two fresh interpreters with different PYTHONHASHSEED write exactly the files of this process."""
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        code = (
            f"from mixsd.corpora.kgfact import KGFactConfig, build_kgfact; import json; "
            f"print(json.dumps(build_kgfact(KGFactConfig(out={str(out)!r}, size='small', seed=0))))"
        )
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        digests.append(json.loads(result.stdout)["files"])
    assert digests[0] == digests[1] == small[1]["files"]


def test_other_seed_other_world(tmp_path, small):
    manifest = build_kgfact(KGFactConfig(out=str(tmp_path), size="small", seed=1))
    assert manifest["files"]["train.jsonl"]["sha256"] != small[1]["files"]["train.jsonl"]["sha256"]


def test_relation_inventory_is_a_regular_tournament():
    for size, n in (("small", 5), ("large", 7)):
        pairs = domain_pairs(size)
        domains = DOMAINS[:n]
        assert len(pairs) == n * (n - 1) // 2 and len(set(pairs)) == len(pairs)
        assert all(
            {(a, b), (b, a)} & set(pairs) for a in domains for b in domains if a != b
        )  # every pair linked
        for domain in domains:
            assert sum(source == domain for source, _ in pairs) == (n - 1) // 2
        for pair in pairs:
            relations = [r for r in RELATIONS if (r.source, r.target) == pair]
            assert len(relations) >= 2, pair
    for relation in RELATIONS:
        assert len(relation.questions) >= 3 and "{s}" in relation.relative
        assert "{s}" in relation.statement and "{t}" in relation.statement
        assert not relation.questions[0].startswith("{s}")  # a relative clause can be substituted
    assert len({r.name for r in RELATIONS}) == len(RELATIONS)


@pytest.mark.parametrize("size,seed", [("small", 0), ("large", 3)])
def test_world_has_one_answer_per_question(size, seed):
    world = build_world(size, seed)
    names = [n for group in ("entities", "heldout_entities") for d in world[group] for n in world[group][d]]
    assert len(names) == len(set(names))
    assert len(DOMAINS) >= 7
    # Core words (the invented parts) are unique world-wide, so no name contains another as whole words.
    cores = [
        w
        for n in names
        for w in n.split()
        if w
        not in kgfact_world._ORG_KINDS
        + kgfact_world._DEVICE_KINDS
        + kgfact_world._BOOK_KINDS
        + kgfact_world._FESTIVAL_KINDS
        + kgfact_world._DISH_KINDS
        + ("of",)
    ]
    assert len(cores) == len(set(c.lower() for c in cores))
    facts = world["facts"]
    keys = [(f["relation"], f["source"]) for f in facts]
    assert len(keys) == len(set(keys))
    by_pair: dict = {}
    relation_pair = {r["name"]: (r["source"], r["target"]) for r in world["relations"]}
    for f in facts:
        by_pair.setdefault((relation_pair[f["relation"]], f["split"]), []).append(f)
    for group in by_pair.values():
        targets = [f["target"] for f in group]
        assert len(targets) == len(set(targets))  # a bijection per pair: no target reused
    spec = kgfact.SIZES[size]
    train = [f for f in facts if f["split"] == "train"]
    assert len(train) == spec.domains * spec.entities * (spec.domains - 1) // 2


def test_names_are_not_known_words():
    """No invented word is a whole-word entry of a real tokenizer's vocabulary (common words are)."""
    from mixsd.core.models import load_tokenizer

    vocab = {t.lstrip("Ġ").lower() for t in load_tokenizer("smollm2-135m").get_vocab()}
    assert {"mode", "node", "baker", "city"} <= vocab  # the check can fail
    kinds = {
        k.lower()
        for k in kgfact_world._ORG_KINDS
        + kgfact_world._DEVICE_KINDS
        + kgfact_world._BOOK_KINDS
        + kgfact_world._FESTIVAL_KINDS
        + kgfact_world._DISH_KINDS
        + ("of",)
    }
    for seed in range(4):
        world = build_world("large", seed)
        words = {
            w.lower()
            for group in ("entities", "heldout_entities")
            for d in world[group]
            for n in world[group][d]
            for w in n.split()
        } - kinds
        assert len(words) == 280
        assert not words & vocab, seed


def test_files_are_corpus_records(small):
    folder, _ = small
    for name in SPLITS:
        facts = load_corpus(folder / name)
        for fact in facts:
            assert last_boxed(fact.answer) == fact.check
            assert "\\boxed{}" in fact.prompt
            assert fact.answer.endswith(f"\\boxed{{{fact.check}}}")
    for fact in load_corpus(folder / "train.jsonl"):
        assert fact.answer == f"The answer is {fact.check}. \\boxed{{{fact.check}}}"
        assert not matches(fact.prompt, fact.check, "loose")  # the question never gives the answer away


def test_paraphrase_rewords_question_and_wrapper(small):
    folder, _ = small
    world = json.loads((folder / "kb.json").read_text())
    facts = {f["id"]: f for f in world["facts"]}
    relations = {r.name: r for r in RELATIONS}
    train = {r["fact"]: r for r in rows(folder, "train.jsonl")}
    for row in rows(folder, "paraphrase.jsonl"):
        fact = facts[row["fact"]]
        relation = relations[fact["relation"]]
        original = train[row["fact"]]
        assert row["check"] == original["check"] == fact["target"]
        assert relation.ask(fact["source"], 0) not in row["prompt"]  # another phrasing...
        assert any(
            relation.ask(fact["source"], k) in row["prompt"] for k in range(1, len(relation.questions))
        )
        assert "Put the final answer in \\boxed{}." not in row["prompt"]  # ...and another wrapper
        assert fact["source"] in row["prompt"]


def test_retrieval_has_one_gold_and_49_distractors_on_heldout_entities(small, large):
    for folder, _ in (small, large):
        world = json.loads((folder / "kb.json").read_text())
        facts = {f["id"]: f for f in world["facts"]}
        train_entities = {n for d in world["entities"].values() for n in d}
        heldout_entities = {n for d in world["heldout_entities"].values() for n in d}
        assert not train_entities & heldout_entities
        for row in rows(folder, "retrieval.jsonl"):
            fact = facts[row["fact"]]
            assert fact["split"] == "heldout" and fact["source"] in heldout_entities
            statements = re.findall(r"^\d+\. (.+)$", row["prompt"], flags=re.MULTILINE)
            assert len(statements) == 50 and len(set(statements)) == 50
            assert statements.count(fact["statement"]) == 1
            # No other statement is about the same source and relation, so the context has one answer.
            others = [f for f in world["facts"] if f["statement"] in statements and f["id"] != fact["id"]]
            assert all((f["relation"], f["source"]) != (fact["relation"], fact["source"]) for f in others)
            assert all(f["split"] == "heldout" for f in others)


def test_compositional_goes_through_a_bridge(small):
    folder, _ = small
    world = json.loads((folder / "kb.json").read_text())
    facts = {f["id"]: f for f in world["facts"]}
    records = rows(folder, "compositional.jsonl")
    assert len({r["prompt"] for r in records}) == len(records)
    for row in records:
        first, second = (facts[i] for i in row["facts"])
        assert first["split"] == second["split"] == "train"
        assert first["target"] == second["source"] == row["bridge"]
        assert row["check"] == second["target"]
        assert first["source"] in row["prompt"] and row["bridge"] not in row["prompt"]
        assert row["answer"].startswith(f"{first['statement']} {second['statement']}")


def test_cli_writes_the_folder(tmp_path, capsys):
    from mixsd.cli import main

    assert main(["corpus", "kgfact", "--size", "small", "--seed", "0", "--out", str(tmp_path)]) == 0
    assert "train.jsonl: 100" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*SPLITS, "kb.json", "manifest.json"])


@pytest.mark.slow
def test_embedded_model_needs_the_fact(small):
    """On SmolLM2-135M: training questions are unanswerable without their fact and answerable with it."""
    import torch

    from mixsd.core.models import load_model_and_tokenizer
    from mixsd.method.prompts import answer_end, load_expert_template, pad_token_id
    from mixsd.method.targets import build_jobs

    folder, _ = small
    world = json.loads((folder / "kb.json").read_text())
    statements = {f["id"]: f["statement"] for f in world["facts"]}
    facts = load_corpus(folder / "train.jsonl")[::13][:8]
    sample = rows(folder, "train.jsonl")[::13][:8]
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    pad, stops = pad_token_id(tokenizer), answer_end(tokenizer, model).stop_ids
    # exactly the prompts `mixsd mix` builds: its default expert template, the record's own context
    jobs = [job for _, job in build_jobs(facts, tokenizer, load_expert_template(None, tokenizer))]
    assert [f.context for f in facts] == [statements[r["fact"]] for r in sample]

    def answer_all(encoded: list[list[int]]) -> list[str]:
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # left padding
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stops),
            )
        return [tokenizer.decode(o[width:], skip_special_tokens=True) for o in out]

    # One thread: on a 2-core machine shared with other jobs, torch's 2 threads spin against each other and a
    # forward pass gets several times slower (measured 2.2 s with 1 thread vs 16 s with 2 under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        without = answer_all([job.naive_ids for job in jobs])
        with_fact = answer_all([job.expert_ids for job in jobs])
    finally:
        torch.set_num_threads(threads)
    base = sum(matches(t, r["check"], "loose") for t, r in zip(without, sample, strict=True))
    informed = sum(matches(t, r["check"], "loose") for t, r in zip(with_fact, sample, strict=True))
    print(f"without the fact {base}/8, with it {informed}/8")
    assert base <= 1
    assert informed >= 6  # measured 8/8 (18/20 on a wider sample)


def test_feeds_mix_and_sft_targets_unchanged(tmp_path, small, tiny_model_dir):
    """The corpus files go straight into `mixsd mix` and `mixsd sft-targets` (tiny random model)."""
    from mixsd.cli import main
    from mixsd.core.records import load_targets

    folder, _ = small
    out = tmp_path / "mix.jsonl"
    assert (
        main(
            [
                "mix",
                "--model",
                str(tiny_model_dir),
                "--input",
                str(folder / "train.jsonl"),
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
                "--retries",
                "0",
                "--on-failure",
                "keep",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(load_targets(out)) == 100
    # sft-targets drops records longer than the model's context, and retrieval prompts (whole paragraphs)
    # run past the tiny model's 512 character tokens: the same weights with a longer context hold them all.
    long_context = tmp_path / "long-context"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    shutil.copytree(tiny_model_dir, long_context)
    (long_context / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    for split in SPLITS:
        sft = tmp_path / f"{split}-sft.jsonl"
        assert (
            main(
                [
                    "sft-targets",
                    "--model",
                    str(long_context),
                    "--input",
                    str(folder / split),
                    "--output",
                    str(sft),
                ]
            )
            == 0
        )
        assert [r["check"] for r in load_targets(sft)] == [f.check for f in load_corpus(folder / split)]


def test_the_paper_instruction_rewords_only_how_questions_ask(tmp_path):
    """`instruction: paper` asks each train/retrieval/compositional question with the paper's reasoning
    sentence; the world, answers and paraphrases are the default corpus's, and the default's stage settings
    and manifest do not name the option (corpora built before it stay current)."""
    from mixsd.core.stages import config_settings

    ours = build_kgfact(KGFactConfig(out=str(tmp_path / "ours")))
    paper = build_kgfact(KGFactConfig(out=str(tmp_path / "paper"), instruction="paper"))
    assert "instruction" not in ours and paper["instruction"] == "paper"
    assert "instruction" not in config_settings(KGFactConfig(out="x"))
    assert config_settings(KGFactConfig(out="x", instruction="paper"))["instruction"] == "paper"

    def rows(folder: str, split: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / folder / split).read_text().splitlines()]

    suffix = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    for split in ("train.jsonl", "retrieval.jsonl", "compositional.jsonl"):
        for a, b in zip(rows("ours", split), rows("paper", split), strict=True):
            assert a["prompt"].endswith(" Put the final answer in \\boxed{}.") and b["prompt"].endswith(
                suffix
            )
            question = a["prompt"].removesuffix(" Put the final answer in \\boxed{}.")
            assert b["prompt"] == question + suffix
            assert {k: v for k, v in a.items() if k != "prompt"} == {
                k: v for k, v in b.items() if k != "prompt"
            }
    assert rows("ours", "paraphrase.jsonl") == rows("paper", "paraphrase.jsonl")
    assert (tmp_path / "ours" / "kb.json").read_bytes() == (tmp_path / "paper" / "kb.json").read_bytes()
    with pytest.raises(ValueError, match="instruction"):
        KGFactConfig(out="x", instruction="socratic")
