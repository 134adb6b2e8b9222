"""Shop tool calls: one natural request in, one canonical function call out (``task``; ``python -m tunelab.examples.toolcall.task`` regenerates the JSONL)."""
