"""Config stage: the Hydra schemas (the one place defaults live) and their registration."""

from sweep.config.schema import Config, ConfigError, register_configs

__all__ = ["Config", "ConfigError", "register_configs"]
