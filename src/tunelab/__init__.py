"""tunelab: fine-tune causal language models and prove what they learned and forgot."""

__version__ = "0.1.0"
