"""Experiments as Python APIs, for scripts and notebooks as much as for the commands built on them: plain
arguments (train options as a dict, by name), no argparse.

- :mod:`.compare`: methods × datasets × seeds, one table (``mlae compare``); :mod:`.variants` are its columns and
  :mod:`.summary` its tables.
- :mod:`.sweep`: hyperparameter search selected on validation data (``mlae sweep``), with :mod:`.sweep_space`
  and :mod:`.sweep_report`.
- :mod:`.ablations`: the paper's ablation tables as presets of variants (``mlae analyze ablation``).
- :mod:`.analysis`: expert similarity, per-expert attention maps (:mod:`.attention_maps`) and learned masking
  probabilities of trained runs (``mlae analyze``).

This layer sits on the training layer (engine, recipes, data, ...) and below the commands (tests/test_layers.py).
"""
