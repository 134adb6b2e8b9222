"""Structured extraction to JSON: order messages (``task``)."""
