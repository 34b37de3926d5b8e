"""goldstone: Goldstone Gradient Descent and an experiment runner for dynamic embedding models.

Folder map (each module owns one idea):

- ``optim/``   Goldstone-GD (a ``torch.optim`` wrapper), the gauge solvers, couplings, schedules.
- ``models/``  dynamic models: local loss + coupling over time steps (dense MF, MovieLens MF, DWE).
- ``data/``    loaders and preprocessing (synthetic, MovieLens, Google Books Ngram, dated corpora).
- ``config.py`` structured (dataclass) configs and Hydra composition.
- ``train.py`` the training loop; ``checkpoint.py`` atomic checkpoints; ``report.py`` plots.
- ``cli.py``   the thin Typer front end (``goldstone ...``).
"""

__version__ = "0.1.0"
