"""Running one job: what ``run.py`` calls (:mod:`~stablelora.runner.job`: every way a run ends
turned into records, one line and an exit code), the training loop
(:mod:`~stablelora.runner.train`), building a run from its config
(:mod:`~stablelora.runner.setup`), the run folder: locks, checkpoints, stop signals
(:mod:`~stablelora.runner.folder`), sweeps (:mod:`~stablelora.runner.sweep`), where the LM
head runs (:mod:`~stablelora.runner.lm_head`) and the check before packed batches
(:mod:`~stablelora.runner.packing`)."""
