"""Shared plumbing every stage uses: files and their errors, stage records, options, the model resolver and loader, weights, answer matching, corpus records, the statistics."""
