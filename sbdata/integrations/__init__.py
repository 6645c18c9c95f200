"""Glue between sbdata and training frameworks.

Each integration lives in its own module and imports its framework only when that module is
imported, so ``import sbdata`` never needs them:

* :mod:`sbdata.integrations.lightning` -- :class:`~sbdata.integrations.lightning.SelectiveBackprop`,
  a Lightning ``Callback`` for a ``SelectiveBatchLoader`` returned from ``train_dataloader()``
  (``pip install lightning``).
* :mod:`sbdata.integrations.transformers` -- :class:`~sbdata.integrations.transformers.SelectiveTrainer`,
  a Hugging Face ``Trainer`` that trains on the selected examples (``pip install transformers``).
"""
