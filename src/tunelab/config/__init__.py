"""Typed run configuration: schema, YAML reading, overrides and hashing. Imports nothing above it.

A run description is resolved by :func:`tunelab.resolve.load_config` (it needs the method and recipe registries).
"""

from tunelab.config.load import config_hash, resolved_dict
from tunelab.config.schema import RunConfig

__all__ = ["RunConfig", "config_hash", "resolved_dict"]

