"""The feature-update probes (config group ``probe/``, docs/probes.md): the paper's gamma
functions and feature-update magnitudes per layer (:mod:`~stablelora.probes.gamma`), the
update norms they are built from (:mod:`~stablelora.probes.feature_updates`) and the names of
the quantities they log (:mod:`~stablelora.probes.quantities`)."""
