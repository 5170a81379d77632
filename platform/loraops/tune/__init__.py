"""Hyperparameter search on Ray Tune: ``loraops tune``.

- :mod:`loraops.tune.space`: the YAML ``search.space`` -> Ray Tune domains / Optuna distributions,
  and a sampled point -> the trial's validated :class:`~loraops.config.Config`;
- :mod:`loraops.tune.trainable`: one trial = one :func:`loraops.training.train.train` run in its own Ray
  worker process, reporting eval loss and an adapter checkpoint at every evaluation;
- :mod:`loraops.tune.searcher`: Optuna TPE with its study in the project database, robust to a
  driver that is killed and resumed;
- :mod:`loraops.tune.experiment`: build, run and resume the experiment (``Tuner`` / ``Tuner.restore``);
- :mod:`loraops.tune.results`: the results table, ``best_trial.json`` and the search plot.

The ``loraops tune`` command (:mod:`loraops.commands.tune`) imports these modules only when it
runs, so ``loraops --help`` stays fast.
"""
