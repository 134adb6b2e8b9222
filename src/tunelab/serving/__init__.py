"""``tunelab serve`` and ``tunelab chat``."""
