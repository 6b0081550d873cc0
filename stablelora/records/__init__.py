"""A run's records (docs/records.md): the recorder, summaries and W&B mirror
(:mod:`~stablelora.records.recorder`), the per-layer probe records
(:mod:`~stablelora.records.layers`), the per-example predictions
(:mod:`~stablelora.records.examples`), writes a crash cannot tear
(:mod:`~stablelora.records.atomic`) and a run folder read back
(:mod:`~stablelora.records.folder`). Imports no torch: the analysis reads records without it."""
