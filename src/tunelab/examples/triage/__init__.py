"""A small support-ticket triage example task: short multi-turn chats, each ending in one of five labels.

See ``tunelab.examples.triage.task``; ``python -m tunelab.examples.triage.task`` regenerates the JSONL files.
"""
