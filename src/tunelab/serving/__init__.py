"""Serving fine-tunes: ``tunelab serve`` (an OpenAI-compatible server of a base and many adapters on it) and
``tunelab chat`` (a terminal conversation).

``models`` loads the base and the adapters (sharing the base in memory), ``scheduler`` batches waiting
requests per adapter on one decoding thread, ``app`` is the HTTP API (FastAPI), ``server`` runs it under
uvicorn, ``watch`` serves the checkpoints of a run still training, ``vllm`` builds vLLM's command line for
the same models, ``chat`` is the terminal chat. Nothing here is imported by ``tunelab --help``.
"""
