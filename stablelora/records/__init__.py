"""A run's records (docs/records.md): the recorder, summaries and W&B mirror
(:mod:`~stablelora.records.recorder`), the per-layer probe records
(:mod:`~stablelora.records.layers`), the per-example predictions
(:mod:`~stablelora.records.examples`) and writes a crash cannot tear
(:mod:`~stablelora.records.atomic`). Imports no torch: the analysis reads records without it."""
