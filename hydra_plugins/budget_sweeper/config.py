"""The sweeper's config node, ``hydra/sweeper=budget``. Hydra imports this module when it scans the
``hydra_plugins`` namespace (its plugin discovery), which is what registers the option."""

from dataclasses import dataclass
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore

from sweep.contract import BUDGET_SWEEPER


@dataclass
class BudgetSweeperConf:
    """``params``: more axes, as the basic sweeper's (``model: yolov5n,yolov5s``); never ``sparsity``.
    The search's own settings (keep, metric, tol, hi, points) are the primary config's ``budget`` node."""

    _target_: str = BUDGET_SWEEPER
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="budget", node=BudgetSweeperConf,
                             provider="budget_sweeper")
