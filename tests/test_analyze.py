"""`mixsd analyze nll` and `mixsd analyze fisher` on models whose answers are known by hand."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.cli import main
from mixsd.core.files import InputError
from mixsd.core.metrics import (
    analysis_columns,
    average_ranks,
    correlation_with_interval,
    pearson,
    spearman,
    wilson_interval,
)
from mixsd.evaluation.analyze import (
    FisherConfig,
    NLLConfig,
    diagonal_fisher,
    displacement,
    fisher_displacement,
    format_nll,
    high_nll_share,
    parameter_group,
    probe_sequences,
    target_nll,
)


class Out:
    def __init__(self, logits):
        self.logits = logits


class TwoParam(torch.nn.Module):
    """Vocabulary {0, 1}; p(next = 1 | current token x) = sigmoid(a + b x)."""

    config = None

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, input_ids, **_):
        z = self.a + self.b * input_ids.float()
        return Out(torch.stack([torch.zeros_like(z), z], dim=-1))


class Bigram(torch.nn.Module):
    config = None

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, logits_to_keep=0, **_):
        logits = self.table[input_ids]
        return Out(logits[:, -logits_to_keep:] if logits_to_keep else logits)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ------------------------------------------------------------------------------------------------
# Fisher
# ------------------------------------------------------------------------------------------------
def test_empirical_fisher_of_a_two_parameter_model_in_closed_form():
    a, b = 0.3, -0.5
    model = TwoParam(a, b)
    # sequence 1: x=1 -> y=0, then x=0 -> y=1 ; sequence 2: x=0 -> y=0
    fisher, n = diagonal_fisher(model, [([1, 0, 1], 1), ([0, 0], 1)], label="data", progress=False)
    g1_a = (0 - sigmoid(a + b)) + (1 - sigmoid(a))
    g1_b = (0 - sigmoid(a + b)) * 1 + (1 - sigmoid(a)) * 0
    g2_a, g2_b = 0 - sigmoid(a), 0.0
    assert n == 2
    assert float(fisher["a"]) == pytest.approx((g1_a**2 + g2_a**2) / 2, rel=1e-5)
    assert float(fisher["b"]) == pytest.approx((g1_b**2 + g2_b**2) / 2, rel=1e-5)
    assert model.a.grad is None and model.a.requires_grad  # leaves the model as it found it


def test_true_fisher_with_sampled_labels_converges_to_p_times_one_minus_p():
    a, b = 0.3, -0.5
    p = sigmoid(a + b)
    fisher, _ = diagonal_fisher(TwoParam(a, b), [([1, 1], 1)] * 3000, label="model", seed=1, progress=False)
    # E_y[(y - p)^2] = p (1 - p) for both parameters (x = 1)
    assert float(fisher["a"]) == pytest.approx(p * (1 - p), abs=0.004)
    assert float(fisher["b"]) == pytest.approx(p * (1 - p), abs=0.004)
    again, _ = diagonal_fisher(TwoParam(a, b), [([1, 1], 1)] * 50, label="model", seed=1, progress=False)
    same, _ = diagonal_fisher(TwoParam(a, b), [([1, 1], 1)] * 50, label="model", seed=1, progress=False)
    assert float(again["a"]) == float(same["a"])  # seeded


def test_displacement_and_its_normalizations_by_hand():
    fisher = {"model.layers.0.mlp.w": torch.tensor([2.0, 0.0]), "lm_head.weight": torch.tensor([1.0])}
    base = {"model.layers.0.mlp.w": torch.tensor([1.0, 1.0]), "lm_head.weight": torch.tensor([0.0])}
    tuned = {"model.layers.0.mlp.w": torch.tensor([1.5, 3.0]), "lm_head.weight": torch.tensor([-1.0])}
    r = displacement(fisher, base, tuned)
    t = r["totals"]
    assert t["displacement"] == pytest.approx(2 * 0.25 + 0 * 4 + 1 * 1)  # 1.5
    assert t["fisher_sum"] == pytest.approx(3.0) and t["delta_sq"] == pytest.approx(0.25 + 4 + 1)
    assert t["normalized_by_fisher"] == pytest.approx(1.5 / 3.0)
    assert t["normalized_by_delta"] == pytest.approx(1.5 / 5.25)
    assert r["by_layer"]["layer.000"]["displacement"] == pytest.approx(0.5)
    assert r["by_layer"]["lm_head"]["displacement"] == pytest.approx(1.0)
    assert parameter_group("model.layers.12.self_attn.q_proj.weight") == (
        "layer.012",
        "self_attn.q_proj.weight",
    )


def test_fisher_displacement_end_to_end_on_tiny_llama(tmp_path, tiny_model_dir, tiny_corpus):
    from mixsd.core.models import load_model, load_tokenizer

    tuned = load_model(str(tiny_model_dir))
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "tuned")

    config = FisherConfig(
        base=str(tiny_model_dir),
        model=str(tmp_path / "tuned"),
        probe=str(tiny_corpus),
        samples=5,
        out=str(tmp_path / "fisher.json"),
        device="cpu",
    )
    result = fisher_displacement(config)
    assert result["probe"] == {**result["probe"], "kind": "corpus", "available": 12, "samples": 5}
    moved = {k: v for k, v in result["by_kind"].items() if v["delta_sq"] > 0}
    assert set(moved) == {"mlp.down_proj.weight"}
    numel = tuned.model.layers[1].mlp.down_proj.weight.numel()
    assert result["totals"]["delta_sq"] == pytest.approx(numel * 1e-4, rel=1e-3)
    # sum F d^2 with d = 0.01 everywhere in that tensor = 1e-4 * that tensor's Fisher sum, recomputed here
    base, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    _, sequences = probe_sequences(tiny_corpus, tokenizer)
    random.Random(0).shuffle(sequences)
    fisher, _ = diagonal_fisher(base, sequences[:5], progress=False)
    f_sum = float(fisher["model.layers.1.mlp.down_proj.weight"].double().sum())
    assert result["by_layer"]["layer.001"]["displacement"] == pytest.approx(1e-4 * f_sum, rel=1e-3)
    assert result["totals"]["displacement"] == pytest.approx(1e-4 * f_sum, rel=1e-3)
    assert json.loads((tmp_path / "fisher.json").read_text())["label"] == "data"

    same = fisher_displacement(
        FisherConfig(
            base=str(tiny_model_dir),
            model=str(tiny_model_dir),
            probe=str(tiny_corpus),
            samples=2,
            device="cpu",
        )
    )
    assert same["totals"]["displacement"] == 0.0 and same["totals"]["normalized_by_delta"] is None


def test_fisher_handles_a_lora_adapter_as_the_tuned_model(tmp_path, tiny_model_dir, tiny_corpus):
    from peft import LoraConfig, get_peft_model

    from mixsd.core.models import load_model

    peft_model = get_peft_model(
        load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    result = fisher_displacement(
        FisherConfig(
            base=str(tiny_model_dir),
            model=str(tmp_path / "adapter"),
            probe=str(tiny_corpus),
            samples=3,
            label="model",
            device="cpu",
        )
    )
    moved = {k for k, v in result["by_kind"].items() if v["delta_sq"] > 0}
    assert moved == {"self_attn.v_proj.weight"}
    assert result["totals"]["displacement"] > 0 and result["fisher"].startswith("true")


def test_probe_sequences_of_every_format(tmp_path):
    tokenizer = make_tiny_tokenizer()
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": "1", "query": "Q", "choices": ["ab", "cd"], "gold": 1}])
    kind, [(ids, start)] = probe_sequences(mc, tokenizer)
    assert kind == "multiple_choice" and tokenizer.decode(ids[start:]) == " cd"
    text = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "text": "hello"}])
    kind, [(ids, start)] = probe_sequences(text, tokenizer, max_tokens=3)
    assert kind == "text" and len(ids) == 3 and start == 1
    targets = write_jsonl(tmp_path / "tg.jsonl", [{"id": "x", "prompt_ids": [4, 5], "target_ids": [6, 7, 2]}])
    assert probe_sequences(targets, tokenizer) == ("targets", [([4, 5, 6, 7, 2], 2)])


# ------------------------------------------------------------------------------------------------
# NLL of targets
# ------------------------------------------------------------------------------------------------
def test_target_nll_by_hand_overall_and_per_branch(tmp_path):
    vocab = 6
    probs = torch.full((vocab, vocab), 1.0 / vocab, dtype=torch.float64)
    probs[1] = torch.tensor([0.0, 0.0, 0.7, 0.1, 0.1, 0.1])  # after 1: token 2 with .7
    probs[2] = torch.tensor([0.0, 0.0, 0.0, 0.4, 0.5, 0.1])  # after 2: 3 with .4, 4 with .5
    probs[3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.1])  # after 3: 4 with .9
    model = Bigram((probs + 1e-12).log().float())
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"id": "a", "prompt_ids": [0, 1], "target_ids": [2, 3, 4], "branch": "ENN"},
            {"id": "b", "prompt_ids": [1], "target_ids": [2, 4], "branch": "GG"},
        ],
    )
    out = tmp_path / "nll.json"
    r = target_nll(NLLConfig(model="bigram", targets=str(path), out=str(out)), model=model)
    nll = {
        "E": [-math.log(0.7)],
        "N": [-math.log(0.4), -math.log(0.9)],
        "G": [-math.log(0.7), -math.log(0.5)],
    }
    for letter, values in nll.items():
        assert r["by_branch"][letter]["mean"] == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert r["by_branch"][letter]["tokens"] == len(values)
    everything = sorted(v for vs in nll.values() for v in vs)
    assert r["overall"]["mean"] == pytest.approx(sum(everything) / 5, rel=1e-5)
    assert r["overall"]["median"] == pytest.approx(everything[2], rel=1e-5)
    assert sum(r["overall"]["histogram"]["counts"]) == 5
    # -log .9 = 0.105 lies in [0.1, 0.25); -log .4 = 0.916 and -log .7 = 0.357 / -log .5 = 0.693 in [0.25, 1)
    edges = r["overall"]["histogram"]["edges"]
    bins = list(zip(edges[:-1], edges[1:], strict=True))
    counts = dict(zip(bins, r["overall"]["histogram"]["counts"], strict=True))
    assert counts[(0.1, 0.25)] == 1 and counts[(0.25, 0.5)] == 2 and counts[(0.5, 1.0)] == 2
    assert [rec["tokens"] for rec in r["per_record"]] == [3, 2]
    assert json.loads(out.read_text())["records"] == 2


def test_target_nll_rejects_a_branch_of_the_wrong_length(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"id": "a", "prompt_ids": [1], "target_ids": [2, 3], "branch": "E"}]
    )
    with pytest.raises(InputError, match=r"t.jsonl, line 1, field 'branch'"):
        target_nll(NLLConfig(model="m", targets=str(path)), model=make_tiny_model(10))


def test_cli_analyze_and_eval_on_a_model_folder(tmp_path, tiny_model_dir, tiny_corpus, capsys):
    from mixsd.core.files import atomic_write_jsonl
    from mixsd.core.models import load_tokenizer
    from mixsd.core.records import load_corpus
    from mixsd.method.sft_targets import sft_target_rows

    targets = tmp_path / "sft.jsonl"
    atomic_write_jsonl(
        targets, sft_target_rows(load_corpus(tiny_corpus), load_tokenizer(str(tiny_model_dir)))
    )
    assert (
        main(
            [
                "analyze",
                "nll",
                "--model",
                str(tiny_model_dir),
                "--targets",
                str(targets),
                "--out",
                str(tmp_path / "nll.json"),
            ]
        )
        == 0
    )
    assert "G" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--suite",
                "qa",
                "--data",
                str(tiny_corpus),
                "--out",
                str(tmp_path / "r.json"),
                "--max_new_tokens",
                "4",
                "--limit",
                "3",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r.json").read_text())["splits"]["corpus"]["n"] == 3
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--suite",
                "kgfact",
                "--data",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "r2.json"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The paper's analyses: NLL > 5 share, Fisher columns, correlation with the retention drop over cells
# ------------------------------------------------------------------------------------------------
def test_high_nll_share_counted_by_hand_overall_and_per_branch(tmp_path):
    vocab = 6
    probs = torch.full((vocab, vocab), 1.0 / vocab, dtype=torch.float64)
    # after 1: token 2 with .9, 3 with .001 (NLL 6.9 > 5), 4 with .0099 (NLL 4.6 < 5)
    probs[1] = torch.tensor([0.0, 0.0, 0.9, 0.001, 0.0099, 0.0891])
    # after 2: 3 with .5, 5 with .002 (NLL 6.2 > 5)
    probs[2] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.498, 0.002])
    model = Bigram((probs + 1e-12).log().float())
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            # 1->3 (6.9, E), 3->4 uniform (1.79, N); 1->4 (4.6, N) is just below the threshold
            {"id": "a", "prompt_ids": [0, 1], "target_ids": [3, 4], "branch": "EN"},
            {"id": "b", "prompt_ids": [1], "target_ids": [4], "branch": "N"},
            # 1->2 (0.1, G), 2->5 (6.2, G)
            {"id": "c", "prompt_ids": [1], "target_ids": [2, 5], "branch": "GG"},
        ],
    )
    r = target_nll(NLLConfig(model="bigram", targets=str(path)), model=model)
    high = r["overall"]["high_nll"]
    assert (high["threshold"], high["count"], high["n"]) == (5.0, 2, 5)
    assert high["value"] == pytest.approx(2 / 5)
    low, up = wilson_interval(2, 5)
    assert high["ci95"] == [pytest.approx(low, abs=1e-6), pytest.approx(up, abs=1e-6)]
    assert (r["by_branch"]["E"]["high_nll"]["count"], r["by_branch"]["E"]["high_nll"]["n"]) == (1, 1)
    assert (r["by_branch"]["N"]["high_nll"]["count"], r["by_branch"]["N"]["high_nll"]["n"]) == (0, 2)
    assert r["by_branch"]["N"]["high_nll"]["ci95"][0] == 0.0  # Wilson at 0/n: lower bound exactly 0
    assert (r["by_branch"]["G"]["high_nll"]["count"], r["by_branch"]["G"]["high_nll"]["n"]) == (1, 2)
    assert ">5 [95%]" in format_nll(r) and "2 40.0% [" in format_nll(r)
    # the paper counts tokens strictly above the threshold
    assert high_nll_share([5.0, 5.0001, 1.0])["count"] == 1
    assert high_nll_share([]) == {"threshold": 5.0, "count": 0, "n": 0, "value": None, "ci95": None}


def test_high_nll_count_on_a_tiny_llama_matches_a_direct_forward_pass(tmp_path):
    model = make_tiny_model(40, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharpen the random model: NLLs spread on both sides of 5
    generator = random.Random(5)
    rows = [
        {
            "id": str(i),
            "prompt_ids": [generator.randrange(3, 40) for _ in range(generator.randint(2, 6))],
            "target_ids": [generator.randrange(3, 40) for _ in range(generator.randint(1, 7))],
        }
        for i in range(9)
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    expected, tokens = 0, 0
    with torch.no_grad():
        for row in rows:  # one sequence at a time, no padding: the reference the batched pass must match
            ids = torch.tensor([row["prompt_ids"] + row["target_ids"]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(row["prompt_ids"])
            nll = [-float(logprobs[start - 1 + j, t]) for j, t in enumerate(row["target_ids"])]
            assert all(abs(v - 5.0) > 1e-3 for v in nll)  # no token on the edge: float noise cannot flip it
            expected += sum(v > 5.0 for v in nll)
            tokens += len(nll)
    assert 0 < expected < tokens  # the test can see both kinds of token
    r = target_nll(NLLConfig(model="tiny", targets=str(path), batch_size=4), model=model)
    assert (r["overall"]["high_nll"]["count"], r["overall"]["high_nll"]["n"]) == (expected, tokens)
    assert r["by_branch"]["?"]["high_nll"]["count"] == expected  # no branch letters: one group "?"


def test_analysis_columns_name_the_fisher_ratio_and_raw_displacement():
    nll = {
        "overall": {
            "mean": 1.5,
            "median": 1.0,
            "high_nll": {"count": 3, "n": 12, "value": 0.25, "ci95": [0.1, 0.5]},
        },
        "by_branch": {"E": {"high_nll": {"value": 0.0}}, "N": {"high_nll": {"value": 0.5}}},
    }
    fisher = {
        "totals": {
            "displacement": 6.0,
            "normalized_by_fisher": 0.5,
            "normalized_by_delta": 2.0,
            "delta_sq": 3.0,
        }
    }
    columns = analysis_columns(nll, fisher)
    assert columns["target_nll_above_5"] == 0.25 and columns["target_nll_above_5_ci95"] == [0.1, 0.5]
    assert (columns["target_nll_above_5_count"], columns["target_nll_above_5_n"]) == (3, 12)
    assert columns["target_nll_above_5_E"] == 0.0 and columns["target_nll_above_5_N"] == 0.5
    assert columns["target_nll_above_5_G"] is None
    assert columns["fisher_ratio"] == 2.0 and columns["delta_norm_sq"] == 3.0
    assert columns["fisher_displacement"] == 6.0 and columns["fisher_displacement_norm"] == 0.5
    empty = analysis_columns({}, {})  # analyses not run (base cell): every column present, None
    assert set(empty) == set(columns) and all(v is None for v in empty.values())
    # the experiment row carries them under the same names
    from mixsd.experiments.experiment import Cell, cell_row

    row = cell_row(
        Cell("sft", seed=1), {"eval": {}, "retention": {}}, {"nll": nll, "fisher": fisher}, None, None
    )
    assert row["fisher_ratio"] == 2.0 and row["target_nll_above_5"] == 0.25


def test_correlation_perfect_none_and_negative_on_hand_made_cells():
    x = [0.1, 0.4, 0.2, 0.9, 0.5, 0.7]
    perfect = correlation_with_interval(x, [3 * v + 1 for v in x], 500, 0)
    assert perfect["n"] == 6 and perfect["note"] is None
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert perfect["pearson_ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]
    # monotone but bent: ranks agree perfectly, values do not lie on a line
    bent = correlation_with_interval(x, [v**4 for v in x], 500, 0)
    assert bent["spearman"] == pytest.approx(1.0) and 0.8 < bent["pearson"] < 0.99
    # symmetric parabola: r is exactly 0 by construction, and the interval straddles it
    none = correlation_with_interval([-3, -2, -1, 0, 1, 2, 3], [9, 4, 1, 0, 1, 4, 9], 1000, 0)
    assert none["pearson"] == pytest.approx(0.0, abs=1e-12) and none["spearman"] == pytest.approx(
        0.0, abs=1e-12
    )
    assert none["pearson_ci95"][0] < 0 < none["pearson_ci95"][1]
    negative = correlation_with_interval(
        [1, 2, 3, 4, 5, 6, 7, 8], [8.2, 7.1, 5.8, 5.2, 3.9, 3.1, 1.8, 1.2], 1000, 0
    )
    assert negative["pearson"] < -0.99 and negative["spearman"] == pytest.approx(-1.0)
    assert negative["pearson_ci95"][1] < -0.95  # the whole interval is negative
    # hand-computed r of a small non-trivial case: x = 1,2,3,4 ; y = 1,3,2,5
    # dx = -1.5,-.5,.5,1.5 ; dy = -1.75,.25,-.75,2.25 ; sum dx dy = 5.5 ; Sxx = 5 ; Syy = 8.75
    assert pearson([1, 2, 3, 4], [1, 3, 2, 5]) == pytest.approx(5.5 / math.sqrt(5 * 8.75))


def test_correlation_too_few_cells_constant_and_missing_values_do_not_crash():
    few = correlation_with_interval([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], 200, 0)
    assert few["n"] == 3 and few["pearson"] is None and few["pearson_ci95"] is None
    assert few["note"].startswith("not enough cells")
    assert correlation_with_interval([], [], 200, 0)["note"].startswith("not enough cells")
    constant = correlation_with_interval([1.0] * 5, [1, 2, 3, 4, 5], 200, 0)
    assert constant["pearson"] is None and "same in every cell" in constant["note"]
    # cells missing either value (a base cell without Fisher, a cell without retention) are left out
    gaps = correlation_with_interval([1, 2, None, 3, 4, float("nan"), 5], [2, 4, 9, 6, None, 1, 10], 200, 0)
    assert gaps["n"] == 4 and gaps["pearson"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one x and one y per cell"):
        correlation_with_interval([1, 2], [1], 10, 0)


def test_correlation_interval_is_seeded_and_ranks_average_ties():
    x, y = [0.3, 0.1, 0.8, 0.5, 0.9, 0.2, 0.6], [0.2, 0.3, 0.7, 0.2, 0.8, 0.1, 0.4]
    first = correlation_with_interval(x, y, 300, 7)
    assert first == correlation_with_interval(x, y, 300, 7)
    assert first["pearson_ci95"] != correlation_with_interval(x, y, 300, 8)["pearson_ci95"]
    assert first["pearson_ci95"][0] <= first["pearson"] <= first["pearson_ci95"][1]
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # Spearman with ties = Pearson of the average ranks: x ranks 1,2,3,4 ; y ranks 1.5,1.5,3,4
    assert spearman([1, 2, 3, 4], [5, 5, 6, 7]) == pytest.approx(pearson([1, 2, 3, 4], [1.5, 1.5, 3, 4]))


def _synthetic_cells(count: int) -> list[dict]:
    """Tuned cells where the drop follows the Fisher ratio exactly and not the raw displacement."""
    rows = [
        {"cell": "base", "group": "base", "method": "base", "lam": None, "seed": 0, "retention_mean": 1.0}
    ]
    for i in range(count):
        ratio = 0.1 * (i + 1)
        rows.append(
            {
                "cell": f"sft-s{i}",
                "group": "SFT",
                "method": "sft",
                "lam": None,
                "seed": i,
                "fisher_ratio": ratio,
                "fisher_displacement_norm": ratio * 2,
                "delta_norm_sq": [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 1.5, 4.5][i % 8],
                "retention_mean": 1 - 0.5 * ratio,
            }
        )
    return rows


def test_report_correlations_and_analyses_section_on_synthetic_cells(tmp_path):
    from mixsd.experiments.correlations import displacement_correlations
    from mixsd.experiments.report_figures import correlation_figure
    from mixsd.experiments.report_sections import analyses_markdown, high_nll_rows, table_cell
    from mixsd.experiments.target_nll import high_nll_counts

    rows = _synthetic_cells(8)
    result = displacement_correlations(rows, n_boot=300, seed=0)
    assert result["drop"] == "1 − retention_mean" and result["cells"] == 8  # the base cell is not a point
    by_column = {m["column"]: m for m in result["measures"]}
    assert by_column["fisher_ratio"]["pearson"] == pytest.approx(1.0)
    assert by_column["fisher_ratio"]["paper"] == "+0.56 / +0.82 / +0.57"
    raw = by_column["delta_norm_sq"]
    assert raw["pearson"] == pytest.approx(pearson([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 1.5, 4.5], range(8)))
    assert by_column["target_nll_above_5"]["note"].startswith("not enough cells")  # no column: n = 0

    # NLL > 5: counts of both seeds pooled per branch, Wilson interval
    for i, (count, n) in enumerate([(1, 10), (3, 10)]):
        folder = tmp_path / f"sft-s{i}"
        folder.mkdir()
        high = {"count": count, "n": n}
        (folder / "nll.json").write_text(
            json.dumps({"overall": {"high_nll": high}, "by_branch": {"G": {"high_nll": high}}})
        )
    two = rows[:3]
    table = high_nll_rows(high_nll_counts(tmp_path, two))
    low, up = wilson_interval(4, 20)
    assert table == [["SFT", "2", f"4/20 = 20.0% [{low:.1%}, {up:.1%}]", "-", "-", table[0][2]]]

    md = "\n".join(analyses_markdown(high_nll_counts(tmp_path, two), displacement_correlations(two)))
    assert "NLL > 5 nats" in md and "not enough cells (2 with both values" in md
    assert "+0.56 / +0.82 / +0.57" in md and "+0.34 / +0.02 / +0.10" in md
    md = "\n".join(analyses_markdown(high_nll_counts(tmp_path, rows), result))
    assert "| Fisher-weighted ratio Σ F·Δθ² / ‖Δθ‖² (`fisher_ratio`) | 8 | +1.00 [+1.000, +1.000]" in md
    assert correlation_figure(result, tmp_path / "c.png").stat().st_size > 0
    one_point = displacement_correlations(rows[:2], n_boot=10)
    assert correlation_figure(one_point, tmp_path / "none.png") is None  # one point: no figure

    # the results table pools the token counts of the seeds for the NLL > 5 column's interval
    members = [
        {"target_nll_above_5": 0.1, "target_nll_above_5_count": 1, "target_nll_above_5_n": 10},
        {"target_nll_above_5": 0.3, "target_nll_above_5_count": 3, "target_nll_above_5_n": 10},
    ]
    text = table_cell(
        {"target_nll_above_5": 0.2, "target_nll_above_5_sd": 0.14}, members, "target_nll_above_5"
    )
    assert text == f"0.2 [{low:.3g}, {up:.3g}] ± 0.14"
