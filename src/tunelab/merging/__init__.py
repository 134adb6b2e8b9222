"""Merging: fold a run's update into its base model (``merge_run``), and merge several models of one family
(``merge_state_dicts`` with the registered rules: linear, task arithmetic, TIES, DARE)."""

from tunelab.merging.checks import check_same_family, check_state_dicts, model_family_differences
from tunelab.merging.fold import merge_run, refusal_reason
from tunelab.merging.rules import (MergeInput, get_merge_rule, merge_rule_names, merge_state_dicts,
                                   register_merge_rule)

__all__ = [
    "MergeInput",
    "check_same_family",
    "check_state_dicts",
    "get_merge_rule",
    "merge_rule_names",
    "merge_run",
    "merge_state_dicts",
    "model_family_differences",
    "refusal_reason",
    "register_merge_rule",
]
