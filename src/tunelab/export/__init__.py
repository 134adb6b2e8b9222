"""``tunelab export``: write a run or model as HF or GGUF, verified with the runtime that will run it."""
