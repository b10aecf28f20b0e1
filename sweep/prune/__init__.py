"""Prune stage: the pruning methods (registry ``PRUNERS``), layer selection and cost accounting."""

from sweep.prune.accounting import accounting
from sweep.prune.methods import PRUNERS, select_convs

__all__ = ["PRUNERS", "accounting", "select_convs"]
