"""How alike MEMIT's keys are for facts that share a subject, against facts that do not.

MEMIT writes one value per key, and a fact's key is the edited projection's input at the subject's last
token; two facts about one subject (KGFact has two per invented person) get nearly the same key, and so may
two subjects whose names end on the same token ("Kodrath Guild", "Vemno Guild"). This prints the cosine
similarity of the keys at each edited layer, for same-subject pairs, for pairs of different subjects that
end on the same token, and for all other pairs.

Usage: python scripts/memit_key_overlap.py CORPUS.jsonl [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mixsd.core import models
from mixsd.editing.edit import edit_requests, load_edits
from mixsd.editing.memit import _keys_and_outputs, default_layers, projection_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    records = load_edits(args.corpus)
    handle = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(handle)
    model = models.load_model(handle, dtype="float32", device="cpu")
    requests = edit_requests(tokenizer, records)
    template = projection_template(model)
    same = torch.tensor([[a.subject == b.subject for b in records] for a in records])
    last = [r.prompt_ids[r.subject_position] for r in requests]
    same_token = torch.tensor([[a == b for b in last] for a in last]) & ~same
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    subjects = {r.subject: token for r, token in zip(records, last, strict=True)}
    print(
        f"{len(records)} facts, {len(subjects)} subjects ending on {len(set(subjects.values()))} distinct "
        f"tokens; {sum(list(subjects.values()).count(t) > 1 for t in subjects.values())} subjects share "
        "their last token with another"
    )
    print(
        "layer | same-subject pairs: median cos (min) | other subjects, same last token: median cos (min) "
        "| all other pairs: median cos (max)"
    )
    for layer in default_layers(model):
        keys, _ = _keys_and_outputs(model, template, layer, layer, requests, tokenizer.pad_token_id or 0)
        unit = torch.nn.functional.normalize(keys, dim=1)
        cos = unit @ unit.T
        pairs = cos[same & upper].tolist()
        token_pairs = cos[same_token & upper].tolist() or [float("nan")]
        others = cos[~same & ~same_token & upper].tolist()
        print(
            f"{layer} | {statistics.median(pairs):.3f} ({min(pairs):.3f}) | "
            f"{statistics.median(token_pairs):.3f} ({min(token_pairs):.3f}, {len(token_pairs)} pairs) | "
            f"{statistics.median(others):.3f} ({max(others):.3f})"
        )


if __name__ == "__main__":
    main()
