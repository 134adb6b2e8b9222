"""Typed run configuration: schema, YAML loading, overrides and hashing."""

from tunelab.config.load import config_hash, load_config, method_options, resolved_dict
from tunelab.config.schema import RunConfig

__all__ = ["RunConfig", "config_hash", "load_config", "method_options", "resolved_dict"]
