"""`mixsd eval`: batched generation and scoring against slow references, hand-scored items, whole suites."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.core.files import InputError, dumps
from mixsd.core.metrics import wilson_interval
from mixsd.evaluation.evaluate import EvalConfig, evaluate, predictions_path
from mixsd.evaluation.probe_kinds import MULTIPLE_CHOICE, PERPLEXITY, load_probe
from mixsd.evaluation.scoring import choice_tokens, kl_per_token, score_multiple_choice
from mixsd.evaluation.taxonomy import Taxonomy
from mixsd.method.generation import ContinuousBatcher, greedy_generate, tail_logprobs
from mixsd.method.prompts import encode_prompt


class Out:
    def __init__(self, logits):
        self.logits = logits


class BigramLM(torch.nn.Module):
    """Next-token log-probs depend only on the current token: log p(b | a) = table[a, b], by construction."""

    config = None

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, logits_to_keep=0, **_):
        logits = self.table[input_ids]
        return Out(logits[:, -logits_to_keep:] if logits_to_keep else logits)


def bigram(vocab: int, rules: dict[tuple[int, int], float], rest: float = 1e-3) -> torch.Tensor:
    """Log-prob table: the given p(b | a), the remaining mass of row a spread evenly over the other tokens."""
    probs = torch.full((vocab, vocab), rest, dtype=torch.float64)
    for a in range(vocab):
        fixed = {b: p for (x, b), p in rules.items() if x == a}
        free = [b for b in range(vocab) if b not in fixed]
        left = 1.0 - sum(fixed.values())
        for b in free:
            probs[a, b] = left / len(free)
        for b, p in fixed.items():
            probs[a, b] = p
    return probs.log().float()


def tok(tokenizer, ch: str) -> int:
    return tokenizer.convert_tokens_to_ids(ch)


# ------------------------------------------------------------------------------------------------
# statistics and taxonomy
# ------------------------------------------------------------------------------------------------
def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)


def test_taxonomy_priority_and_thresholds():
    tax = Taxonomy(Taxonomy.entity_set(["Quenthar", "Ardun Pelsky", "42", "Qo"]), collapse_max_words=5)
    assert tax.entities == {"quenthar", "ardun pelsky"}  # numbers and too-short names are no entities
    assert tax.classify("", "Where?", "Drevanport", "stop") == ("format", [])
    assert tax.classify("It is a long story that never " * 5, "Where?", "Drevanport", "length")[0] == "format"
    assert tax.classify("The answer is Quenthar.", "Where was Talvik born?", "Drevanport", "stop") == (
        "leakage",
        ["quenthar"],
    )
    # an entity named in the prompt is not leakage
    assert tax.classify("Quenthar.", "Is it near Quenthar?", "Drevanport", "stop") == ("collapse", [])
    long = "Let me think step by step about where this person was born and then answer: Velmo."
    assert tax.classify(long, "Where?", "Drevanport", "stop") == ("genuine", [])
    strict = Taxonomy(require_marker=True)
    assert strict.classify("Velmo", "Where?", "Drevanport", "stop")[0] == "format"
    assert strict.classify("The answer is Velmo", "Where?", "Drevanport", "stop")[0] == "collapse"


# ------------------------------------------------------------------------------------------------
# batched generation and scoring vs. one-at-a-time references
# ------------------------------------------------------------------------------------------------
def _greedy_reference(model, prompt: list[int], stops: set[int], max_new: int) -> tuple[list[int], str]:
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token in stops:
            return out, "stop"
        out.append(token)
        ids.append(token)
    return out, "length"


def test_greedy_generate_matches_uncached_single_sequence_decoding():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=3)
    prompts = [
        encode_prompt(tokenizer, q) for q in ["Hi", "Where is the big old city?", "2+2?", "x" * 30, "abc"]
    ]
    stops = {
        19,
        65,
        90,
    }  # rows stop after 3, 3, 5 and 9 tokens or never: they leave the batch at different steps
    expected = [_greedy_reference(model, p, stops, 12) for p in prompts]
    for batch_size in (2, 5):  # 2: rows finish and waiting prompts are spliced in; 5: one batch
        got = {
            i: (t, f)
            for i, t, f in greedy_generate(
                model, prompts, stop_ids=stops, pad_id=0, max_new_tokens=12, batch_size=batch_size
            )
        }
        assert [got[i] for i in range(len(prompts))] == expected
    assert {f for _, f in expected} == {"stop", "length"}  # both paths exercised


def _batcher_trace(admit_at: int) -> tuple[list[int], list[int], list[int]]:
    """Run jobs 0..3 (job j ends after `1 + j` tokens; job 0 is retried once as job 10, which ends after 1)
    through a ContinuousBatcher of 2 places; return (admission order, jobs per step, finish order)."""
    admitted: list[int] = []
    running: list[int] = []
    tokens: dict[int, int] = {}

    def prompts(job: int) -> list[list[int]]:
        admitted.append(job)
        return [[3 + job % 7, 4, 5]]

    def choose(jobs: list[int], logits: torch.Tensor) -> list[int]:
        running.append(len(jobs))
        return logits.argmax(dim=-1).tolist()

    def finish(job: int, token: int) -> bool:
        tokens[job] = tokens.get(job, 0) + 1
        return tokens[job] > job % 10

    batcher = ContinuousBatcher(
        make_tiny_model(40, seed=1),
        0,
        batch_size=2,
        rows_per_job=1,
        prompts=prompts,
        choose=choose,
        finish=finish,
        admit_at=admit_at,
    )
    finished = []
    for job in batcher.run(range(4)):
        finished.append(job)
        if job == 0:
            batcher.requeue(10)  # a retry: admitted before the jobs still waiting
    return admitted, running, finished


def test_the_continuous_batcher_admits_a_retry_first_and_by_each_callers_rule():
    # job 0 ends after 1 token, job 1 after 2, the retry 10 after 1, job 2 after 3, job 3 after 4
    admitted, running, finished = _batcher_trace(admit_at=1)  # the decoder's rule: fill a free place at once
    assert (admitted, finished) == ([0, 1, 10, 2, 3], [0, 1, 10, 2, 3])  # the retry before jobs 2 and 3
    assert running == [2, 2, 2, 2, 2, 1]
    admitted, running, finished = _batcher_trace(admit_at=2)  # greedy's: wait for a group of free places
    assert (admitted, finished) == ([0, 1, 10, 2, 3], [0, 1, 10, 2, 3])
    assert running == [2, 1, 2, 1, 1, 1, 1, 1, 1]  # one free place of two is not enough to admit
    with pytest.raises(ValueError, match="a job has 1 prompts, the batcher runs 2 per job"):
        batcher = ContinuousBatcher(
            make_tiny_model(40),
            0,
            batch_size=2,
            rows_per_job=2,
            prompts=lambda job: [[3]],
            choose=lambda jobs, logits: [0] * len(jobs),
            finish=lambda job, token: True,
        )
        list(batcher.run([0]))


def test_tail_logprobs_match_a_full_forward_pass():
    model = make_tiny_model(40, seed=1)
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]]
    tails = [2, 1, 4]
    got = dict(tail_logprobs(model, seqs, tails, pad_id=0, batch_size=2))
    full = dict(tail_logprobs(model, seqs, tails, pad_id=0, batch_size=3, full=True))
    for i, (seq, tail) in enumerate(zip(seqs, tails, strict=True)):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        want = torch.stack([ref[p - 1, seq[p]] for p in range(len(seq) - tail, len(seq))])
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full[i], ref[len(seq) - tail - 1 : len(seq) - 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        list(tail_logprobs(model, [[1, 2]], [2], pad_id=0))


def test_multiple_choice_item_scored_by_hand():
    tokenizer = make_tiny_tokenizer(chat=False)
    q, sp, a, b = (tok(tokenizer, c) for c in "q ab")
    table = bigram(len(tokenizer), {(q, sp): 0.7, (sp, a): 0.4, (sp, b): 0.5, (a, b): 0.9})
    model = BigramLM(table)
    assert choice_tokens(tokenizer, "q", "ab") == ([q], [sp, a, b])
    assert choice_tokens(tokenizer, "q ", "ab") == ([q], [sp, a, b])  # trailing space moves to the choice
    [row] = score_multiple_choice(
        model, tokenizer, [{"id": "x", "query": "q", "choices": ["ab", "b"], "gold": 0}], batch_size=2
    )
    # log p(" ab" | q) = log .7 + log .4 + log .9 ; log p(" b" | q) = log .7 + log .5
    assert row["loglik"] == pytest.approx([math.log(0.7 * 0.4 * 0.9), math.log(0.7 * 0.5)], abs=1e-4)
    assert row["pred"] == 1 and not row["correct"]  # summed: " b" is likelier (.35 > .252)
    # normalized by characters: log(.252)/2 = -0.689 > log(.35)/1 = -1.050, so acc_norm picks "ab"
    assert row["pred_norm"] == 0 and row["correct_norm"]


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    a, b = make_tiny_model(40, seed=1), make_tiny_model(40, seed=2)
    seqs, tails = [[3, 4, 5, 6], [7, 8, 9]], [2, 1]
    for total, peak, count in kl_per_token(a, a, seqs, tails, pad_id=0, batch_size=2):
        assert total == pytest.approx(0.0, abs=1e-6) and peak == pytest.approx(0.0, abs=1e-6)
        assert count in (1, 2)
    kl = kl_per_token(a, b, seqs, tails, pad_id=0, batch_size=1)
    assert all(total > 0 for total, _, _ in kl)
    # check one value against the definition
    with torch.no_grad():
        p = torch.log_softmax(a(input_ids=torch.tensor([seqs[1]])).logits[0, -2], -1)
        r = torch.log_softmax(b(input_ids=torch.tensor([seqs[1]])).logits[0, -2], -1)
    assert kl[1][0] == pytest.approx(float((p.exp() * (p - r)).sum()), rel=1e-4)


def test_retention_ratio_direction():
    mc = {"kind": "multiple_choice", "acc": {"value": 0.3}, "acc_norm": {"value": 0.4}}
    base = {"kind": "multiple_choice", "acc": {"value": 0.6}, "acc_norm": {"value": 0.4}}
    assert MULTIPLE_CHOICE.retention(mc, base) == {"acc": 0.5, "acc_norm": 1.0}
    assert PERPLEXITY.retention({"kind": "perplexity", "ppl": 20.0}, {"kind": "perplexity", "ppl": 10.0}) == {
        "ppl": 0.5
    }
    s = PERPLEXITY.summarize([{"nll": 2.0, "tokens": 2}, {"nll": 4.0, "tokens": 2}])
    assert s["kind"] == "perplexity" and s["ppl"] == pytest.approx(math.exp(1.5))


def test_probe_file_errors_name_line_and_field(tmp_path):
    bad = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "query": "q", "choices": ["x", "y"], "gold": 0},
            {"id": "b", "query": "q", "choices": ["x", "y"], "gold": 2},
        ],
    )
    with pytest.raises(InputError, match=r"p.jsonl, line 2, field 'gold'"):
        load_probe(bad, None)
    with pytest.raises(InputError, match=r"line 2"):  # the whole file is checked, whatever the limit
        load_probe(bad, 1)


# ------------------------------------------------------------------------------------------------
# whole suites
# ------------------------------------------------------------------------------------------------
def _answer_qz_model(tokenizer) -> BigramLM:
    """Greedy answer to any chat prompt: 'Qz' then end of turn (prompt ends with 'assistant\\n')."""
    nl, big_q, z = tok(tokenizer, "\n"), tok(tokenizer, "Q"), tok(tokenizer, "z")
    return BigramLM(
        bigram(len(tokenizer), {(nl, big_q): 0.9, (big_q, z): 0.9, (z, tokenizer.eos_token_id): 0.9})
    )


@pytest.fixture
def kgfact_dir(tmp_path) -> Path:
    folder = tmp_path / "kgfact"
    folder.mkdir()
    write_jsonl(
        folder / "train.jsonl",
        [
            {"id": "t0", "prompt": "Where is A?", "answer": "The answer is Qz. \\boxed{Qz}"},
            {"id": "t1", "prompt": "Where is B?", "answer": "The answer is Wyx. \\boxed{Wyx}"},
        ],
    )
    write_jsonl(
        folder / "paraphrase.jsonl",
        [
            {"id": "p0", "prompt": "A is where?", "answer": "Qz", "check": "Qz"},
            {"id": "p1", "prompt": "B is where?", "answer": "Wyx", "check": "Wyx"},  # says Qz: leakage
            {"id": "p2", "prompt": "Is B near Qz?", "answer": "No, Wyx", "check": "Wyx"},
        ],
    )  # Qz in prompt: collapse
    (folder / "manifest.json").write_text(json.dumps({"corpus": "kgfact", "seed": 0}))
    return folder


def test_kgfact_suite_scores_classifies_and_records_provenance(tmp_path, kgfact_dir):
    tokenizer = make_tiny_tokenizer()
    model = _answer_qz_model(tokenizer)
    out = tmp_path / "res" / "results.json"
    config = EvalConfig(
        model="qz-model", suite="kgfact", data=str(kgfact_dir), out=str(out), batch_size=2, min_entity_chars=2
    )
    results = evaluate(config, model=model, tokenizer=tokenizer, progress=False)
    train, para = results["splits"]["train"], results["splits"]["paraphrase"]
    assert train["exact"]["correct"] == 1 and train["entity"]["correct"] == 1 and train["n"] == 2
    # no answer_match in this manifest: the headline is the entity match, and says so
    assert train["match"] == "entity" and train["accuracy"] == train["entity"]
    assert para["entity"]["value"] == pytest.approx(1 / 3)
    assert para["entity"]["ci95"] == pytest.approx(list(wilson_interval(1, 3)), abs=1e-6)
    assert para["errors"] == {"format": 0, "leakage": 1, "collapse": 1, "genuine": 0}
    assert {s["split"] for s in results["skipped"]} == {"retrieval", "compositional"}
    assert results["data"]["manifest_sha256"] and set(results["data"]["files"]) == {
        "train.jsonl",
        "paraphrase.jsonl",
    }
    assert results["mixsd_version"] and results["settings"]["max_new_tokens"] == 64
    preds = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    assert len(preds) == 5 and {p["output"] for p in preds} == {"Qz"}
    leak = next(p for p in preds if p["id"] == "p1")
    assert leak["error"] == "leakage" and leak["leaked"] == ["qz"]
    assert json.loads(out.read_text())["splits"]["train"]["n"] == 2
    assert not (out.parent / "results.predictions.jsonl.journal").exists()


def test_generation_suite_resumes_from_its_journal(tmp_path, kgfact_dir, tiny_model_dir):
    out = tmp_path / "results.json"
    config = EvalConfig(
        model=str(tiny_model_dir),
        suite="kgfact",
        data=str(kgfact_dir),
        out=str(out),
        max_new_tokens=6,
        base_cache=False,
    )
    first = evaluate(config, progress=False)
    assert first["model"]["sha256"]  # a folder model is fingerprinted by content
    assert evaluate(config, progress=False)["created"] == first["created"]  # up to date: not recomputed
    # simulate a crash after two predictions: journal holds them (marked), results are gone
    preds = [json.loads(line) for line in predictions_path(out).read_text().splitlines()]
    journal = predictions_path(out).with_name("results.predictions.jsonl.journal")
    header = {
        "journal_of": "mixsd eval",
        "settings": {k: first["settings"][k] for k in first["settings"] if k not in ("taxonomy", "match")},
    }
    kept = [
        {k: v for k, v in p.items() if k not in ("error", "leaked")} | {"output": "SENTINEL"}
        for p in preds[:2]
    ]
    journal.write_text("".join(dumps(r) + "\n" for r in [header, *kept]) + '{"torn')
    out.unlink()
    again = evaluate(config, progress=False)
    outputs = {p["id"]: p["output"] for p in map(json.loads, predictions_path(out).read_text().splitlines())}
    assert [outputs[p["id"]] for p in preds[:2]] == ["SENTINEL", "SENTINEL"]
    assert [outputs[p["id"]] for p in preds[2:]] == [p["output"] for p in preds[2:]]
    assert again["splits"]["paraphrase"]["n"] == 3


def test_qa_suite_reads_every_file_and_reports_bad_lines(tmp_path):
    tokenizer = make_tiny_tokenizer()
    folder = tmp_path / "qa"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"prompt": "A?", "answer": "Qz"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "B?", "answer": "no"}])
    res = evaluate(
        EvalConfig(model="m", suite="qa", data=str(folder), out=str(tmp_path / "r.json")),
        model=_answer_qz_model(tokenizer),
        tokenizer=tokenizer,
        progress=False,
    )
    assert {k: v["exact"]["correct"] for k, v in res["splits"].items()} == {"a": 1, "b": 0}
    write_jsonl(folder / "c.jsonl", [{"prompt": "C?"}])
    with pytest.raises(InputError, match=r"c.jsonl, line 1, field 'answer'"):
        evaluate(
            EvalConfig(model="m", suite="qa", data=str(folder), out=str(tmp_path / "r2.json")),
            model=_answer_qz_model(tokenizer),
            tokenizer=tokenizer,
            progress=False,
        )


def test_headline_accuracy_uses_the_corpus_matcher_unless_overridden(tmp_path):
    """A corpus whose manifest says `number`: an answer "4 2" is right for 2 and wrong for 4 (the 4 is
    working, not the final answer), although the entity match credits both; --match entity overrides."""
    tokenizer = make_tiny_tokenizer()
    nl, four, space, two = (tok(tokenizer, c) for c in "\n4 2")
    model = BigramLM(
        bigram(
            len(tokenizer),
            {(nl, four): 0.9, (four, space): 0.9, (space, two): 0.9, (two, tokenizer.eos_token_id): 0.9},
        )
    )
    folder = tmp_path / "nums"
    folder.mkdir()
    write_jsonl(
        folder / "test.jsonl",
        [
            {"id": "a", "prompt": "A?", "answer": "4", "check": "4"},
            {"id": "b", "prompt": "B?", "answer": "2"},
        ],
    )
    (folder / "manifest.json").write_text(json.dumps({"answer_match": "number", "files": {"test.jsonl": {}}}))

    def run(out: str, **options) -> dict:
        config = EvalConfig(
            model="m", suite="qa", data=str(folder / "test.jsonl"), out=str(tmp_path / out), **options
        )
        return evaluate(config, model=model, tokenizer=tokenizer, progress=False)

    res = run("r.json")
    split = res["splits"]["test"]
    assert res["match"] == {"test": "number"} and split["match"] == "number"
    assert (
        split["accuracy"]["correct"] == 1
        and split["number"]["correct"] == 1
        and split["entity"]["correct"] == 2
    )
    preds = {
        p["id"]: p for p in map(json.loads, predictions_path(tmp_path / "r.json").read_text().splitlines())
    }
    assert (
        preds["a"]["output"] == "4 2" and preds["a"]["correct"] is False and preds["a"]["error"] is not None
    )
    assert preds["b"]["correct"] is True and preds["b"]["error"] is None
    loose = run("r2.json", match="loose")  # the old name is accepted and recorded as the new one
    assert (
        loose["splits"]["test"]["match"] == "entity" and loose["splits"]["test"]["accuracy"]["correct"] == 2
    )
    assert loose["settings"]["match"] == "loose"


def _probes(folder: Path) -> Path:
    folder.mkdir()
    write_jsonl(
        folder / "general_knowledge.jsonl",
        [
            {
                "id": f"g{i}",
                "query": f"Question: what is {i}?\nAnswer:",
                "choices": ["yes", "no", "maybe so"],
                "gold": i % 3,
            }
            for i in range(5)
        ],
    )
    write_jsonl(
        folder / "squad_paragraphs.jsonl",
        [{"id": "s0", "text": "The river runs to the sea. " * 3}, {"id": "s1", "text": "Cats sleep a lot."}],
    )
    return folder


def test_retention_against_itself_is_one_and_kl_zero(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    probes = _probes(tmp_path / "probes")
    config = EvalConfig(
        model=str(tiny_model_dir),
        base=str(tiny_model_dir),
        suite="retention",
        data=str(probes),
        out=str(tmp_path / "ret.json"),
        limit=4,
        max_new_tokens=5,
    )
    res = evaluate(config, progress=False)
    gk = res["probes"]["general_knowledge"]
    assert gk["n"] == 4 and gk["chance"] == pytest.approx(1 / 3)
    assert gk["retention"] == {"acc": 1.0, "acc_norm": 1.0} or gk["acc"]["value"] == 0
    # the same model on the same items: nothing moved, no evidence of a difference
    flips = gk["paired"]["acc"]
    assert flips["right_to_wrong"] == flips["wrong_to_right"] == 0 and flips["mcnemar_p"] == 1.0
    assert flips["difference"] == 0.0 and flips["difference_ci95"] == [0.0, 0.0]
    assert gk["retention_normalized"]["acc"] in (1.0, None)  # None: the base is not above chance
    assert res["probes"]["squad_paragraphs"]["retention"]["ppl"] == pytest.approx(1.0)
    assert res["probes"]["kl"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert res["probes"]["kl"]["n"] == 4  # limit applies to the KL prompts too
    assert {s["split"] for s in res["skipped"]} == {"social_iqa", "qa_wikidata"}


def test_retention_with_a_different_base_and_base_cache(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tiny_tokenizer()
    other = tmp_path / "other"
    make_tiny_model(len(tokenizer), seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    probes = _probes(tmp_path / "probes")
    config = EvalConfig(
        model=str(other),
        base=str(tiny_model_dir),
        suite="retention",
        data=str(probes),
        out=str(tmp_path / "ret.json"),
        limit=3,
        max_new_tokens=4,
    )
    res = evaluate(config, progress=False)
    assert res["probes"]["kl"]["kl_per_token"] > 0
    cached = Path(res["base_cache"])
    assert cached.is_file()
    ppl = res["probes"]["squad_paragraphs"]
    assert ppl["retention"]["ppl"] == pytest.approx(ppl["base"]["ppl"] / ppl["ppl"])
    low, high = ppl["retention_ci95"]["ppl"]
    assert low <= ppl["retention"]["ppl"] <= high
    gk = res["probes"]["general_knowledge"]
    flips = gk["paired"]["acc"]
    n = gk["n"]
    assert flips["n"] == n and flips["after"] - flips["before"] == pytest.approx(
        (flips["wrong_to_right"] - flips["right_to_wrong"]) / n
    )
    assert flips["before"] == gk["base"]["acc"]["value"] and flips["after"] == gk["acc"]["value"]
    # the second run reads the base scores from the cache: tamper with one and see it come back
    rows = [json.loads(line) for line in cached.read_text().splitlines()]
    for row in rows:
        if row["split"] == "squad_paragraphs":
            row["nll"] = 0.0
    cached.write_text("".join(dumps(r) + "\n" for r in rows))
    again = evaluate(EvalConfig(**{**config.__dict__, "out": str(tmp_path / "ret2.json")}), progress=False)
    assert again["probes"]["squad_paragraphs"]["base"]["ppl"] == pytest.approx(1.0)


def test_retention_without_probes_or_base_says_what_was_skipped(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "empty-cache"))
    res = evaluate(
        EvalConfig(model=str(tiny_model_dir), suite="retention", out=str(tmp_path / "r.json")), progress=False
    )
    assert res["probes"] == {}
    reasons = " ".join(s["reason"] for s in res["skipped"])
    assert "mixsd probes fetch" in reasons and "--base" in reasons


def test_lora_adapter_folder_is_merged_for_evaluation(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from mixsd.core.models import load_for_inference, load_model

    base = load_model(str(tiny_model_dir))
    peft_model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged, tokenizer = load_for_inference(str(tmp_path / "adapter"), device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )
    assert len(tokenizer) == merged.config.vocab_size


@pytest.mark.slow
def test_embedded_model_kgfact_and_retention_end_to_end(tmp_path, kgfact_dir, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(Path.home() / ".cache" / "mixsd"))
    threads = torch.get_num_threads()
    try:  # one thread: several times faster on the shared 2-core machine (docs/benchmarks.md)
        _embedded_end_to_end(tmp_path, kgfact_dir)
    finally:
        torch.set_num_threads(threads)


def _embedded_end_to_end(tmp_path, kgfact_dir):
    res = evaluate(
        EvalConfig(
            model="smollm2-135m",
            suite="kgfact",
            data=str(kgfact_dir),
            out=str(tmp_path / "k.json"),
            max_new_tokens=8,
            limit=2,
            threads=1,
        ),
        progress=False,
    )
    assert res["splits"]["train"]["n"] == 2 and res["model"]["sha256"]
    probes = tmp_path / "probes"
    probes.mkdir()
    write_jsonl(
        probes / "general_knowledge.jsonl",
        [{"id": "g0", "query": "The capital of France is", "choices": ["Tuesday", "Paris"], "gold": 1}],
    )
    write_jsonl(probes / "squad_paragraphs.jsonl", [{"id": "s0", "text": "The river runs to the sea. " * 3}])
    ret = evaluate(
        EvalConfig(
            model="smollm2-135m",
            base="smollm2-135m",
            suite="retention",
            data=str(probes),
            out=str(tmp_path / "r.json"),
            limit=2,
            max_new_tokens=6,
            base_cache=False,
            threads=1,
        ),
        progress=False,
    )
    assert ret["probes"]["kl"]["kl_per_token"] == pytest.approx(0.0, abs=1e-5)
    assert ret["probes"]["general_knowledge"]["acc"]["correct"] == 1
    assert ret["probes"]["general_knowledge"]["retention"] == {"acc": 1.0, "acc_norm": 1.0}
    assert 1 < ret["probes"]["squad_paragraphs"]["ppl"] < 200


def test_limit_spreads_over_the_file():
    from mixsd.corpora.probes import spread

    assert spread(list(range(100)), 4) == [0, 25, 50, 75]
    assert spread(list(range(3)), 10) == [0, 1, 2]
    assert spread(list(range(7)), None) == list(range(7))
