"""`mixsd eval` and `mixsd analyze`: scoring, the probe-kind registry, generative capability probes, lm-eval tasks, the error taxonomy and the forgetting measures."""
