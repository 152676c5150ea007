"""The machinery under the task scripts, one concern a module.

The readable core sits on the top level beside the scripts: model.py (the modules),
data.py (batches and masking), metrics.py (SQuAD's official scorer), utils.py (device,
precision, errors, value rules). This package builds on that core and the core never
imports it (docs/layout.rst):

- ``files``, ``checks``: atomic writes and output paths; path checks and locks before work
- ``flags``, ``mains``: the scripts' flags, as the settings objects the library takes; what
  the scripts' main functions share (the only modules that read the parsed flags)
- ``checkpoint``, ``transformers_format``: model files, this project's and transformers'
- ``text``: tokenizers, corpora on disk, text to token ids
- ``training``: the trainer, its state files, optimizer, logs, processes
- ``squad``: SQuAD's files, windows and answers
- ``glue``: GLUE's tasks and files, sentence pairs, the classifier, GLUE's metrics
- ``bench``: the pieces of bench.py
"""
