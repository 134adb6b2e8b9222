"""``tunelab ui``: a web dashboard over run directories (the ``serve`` extra: FastAPI + uvicorn).

The pages only read what runs write (``runs/`` layout: manifest, config, metrics, eval results), so they
never import torch; a run that is still training updates its page live (the page polls its metrics).
"""
