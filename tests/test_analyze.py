"""`mixsd analyze nll` and `mixsd analyze fisher` on models whose answers are known by hand."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.analyze import (
    FisherConfig,
    NLLConfig,
    diagonal_fisher,
    displacement,
    fisher_displacement,
    parameter_group,
    probe_sequences,
    target_nll,
)
from mixsd.cli import main
from mixsd.files import InputError


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
    from mixsd.models import load_model, load_tokenizer

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

    from mixsd.models import load_model

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
    from mixsd.files import atomic_write_jsonl
    from mixsd.models import load_tokenizer
    from mixsd.records import load_corpus
    from mixsd.targets import sft_target_rows

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
