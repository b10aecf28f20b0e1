"""The budget sweeper: a Hydra ``Sweeper`` whose jobs are the rounds of the budget search.

Kept light, like Hydra's own sweeper plugins: Hydra imports every public module of ``hydra_plugins`` when it
scans for plugins, so the work (and the project's heavier imports) lives in ``_impl``, imported at setup.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BudgetSweeper(Sweeper):
    def __init__(self, params: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self.params: Dict[str, str] = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from hydra_plugins.budget_sweeper._impl import run_search

        return run_search(self, arguments)
