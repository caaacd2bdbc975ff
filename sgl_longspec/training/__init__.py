"""OWL drafter training (``python -m sgl_longspec.training.owl_train``), its data and its
evaluation; not imported by the serving path."""
