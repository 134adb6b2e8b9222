"""Probe sets (JSONL) that measure general skills before and after fine-tuning, to show forgetting."""
