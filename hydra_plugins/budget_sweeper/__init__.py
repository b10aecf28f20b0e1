"""Hydra sweeper plugin ``hydra/sweeper=budget``: the budget search of ``sweep.budget`` (see its docs)."""
