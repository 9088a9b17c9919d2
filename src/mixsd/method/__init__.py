"""The method: the mixed decoder and its yardstick, prompts, greedy answers, the targets of `mixsd mix`, `mixsd sft-targets` and `mixsd rewrite`, their fidelity and accounting, the TRL export."""
