"""A small text-to-SQL example task of our own making: schema, SQLite database, and train/test splits.

See ``tunelab.examples.sql.task``; ``python -m tunelab.examples.sql.task`` regenerates the JSONL files.
"""
