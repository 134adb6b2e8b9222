"""Merging: fold a run's update into its base model (``merge_run``), merge several models of one family
(``merge_state_dicts`` with the registered rules: linear, task arithmetic, TIES, DARE; ``merge_models`` for a
``MERGE.yaml``), and blend a run with its base (``interpolate_run``)."""

from tunelab.merging.checks import check_same_family, check_state_dicts, model_family_differences
from tunelab.merging.fold import fold_in_memory, merge_run, refusal_reason
from tunelab.merging.interpolate import interpolate_run, parse_blends, pick_blend
from tunelab.merging.many import merge_models
from tunelab.merging.spec import load_merge_spec
from tunelab.merging.rules import (MergeInput, get_merge_rule, merge_rule_names, merge_state_dicts,
                                   register_merge_rule)

__all__ = [
    "MergeInput",
    "check_same_family",
    "check_state_dicts",
    "fold_in_memory",
    "interpolate_run",
    "load_merge_spec",
    "merge_models",
    "get_merge_rule",
    "merge_rule_names",
    "merge_run",
    "merge_state_dicts",
    "model_family_differences",
    "parse_blends",
    "pick_blend",
    "refusal_reason",
    "register_merge_rule",
]
