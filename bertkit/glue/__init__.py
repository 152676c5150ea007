"""GLUE and your own sentence pairs: the nine tasks and their files (tasks), a run's files
(examples), pairs to model inputs (sentences), the classifier (classifier), GLUE's metrics
(metrics)."""
