"""Budget search (``hydra/sweeper=budget``): how far can this model be pruned? The search algorithm
(``search``), its jobs as Hydra overrides (``plan``) and its answer (``answer``); the sweeper itself is the
Hydra plugin ``hydra_plugins/budget_sweeper``."""
