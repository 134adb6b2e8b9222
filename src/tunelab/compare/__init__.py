"""``tunelab compare``: run several methods and baselines on one task and report what each learned, forgot and cost."""
