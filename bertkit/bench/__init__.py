"""The pieces of bench.py: the data pipeline (data), GLUE fine-tuning (glue), the clock
(timing)."""
