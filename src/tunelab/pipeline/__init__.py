"""Multi-stage pipelines with lineage (``tunelab pipeline PIPELINE.yaml``): named stages of any kind — the
training recipes, merge, export, eval, and the ``tunelab data`` generators — each pointing at earlier ones
by name, content-addressed so a re-run skips what is unchanged, resumes what was interrupted and re-runs
only what is downstream of a change. ``spec`` reads the file, ``stages`` runs each kind, ``runner`` decides
and reports."""
