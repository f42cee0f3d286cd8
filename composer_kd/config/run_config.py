"""A run config (``composer-kd train``): read, checked against ``RUN_SCHEMA``, and its rules — all before torch
is imported, so a mistake is one line in well under a second."""

from typing import Any, Mapping

from composer_kd.config.loading import read_yaml
from composer_kd.config.run_schema import RUN_SCHEMA
from composer_kd.config.schema import check
from composer_kd.errors import ConfigError

__all__ = ['load_config', 'validate_run_config']


def validate_run_config(cfg: Mapping[str, Any]) -> None:
    """Checks every key of a resolved run config against the schema: known, required ones present, each value of
    its kind. (The rules between keys: ``run_rules.check_run_rules``.)

    Raises:
        ConfigError: naming the key and the value.
    """
    if 'rounds' in cfg:
        raise ConfigError('rounds: this is a multi-round config; run it with `composer-kd rounds`')
    if isinstance(cfg.get('model'), dict) and cfg['model'].get('name') == 'composer_kd_distillation':
        raise ConfigError('model.name: composer_kd_distillation: this is an LLM Foundry config; run it with Foundry\'s '
                          'train script (llmfoundry.command_utils.train_from_yaml)')
    check(cfg, RUN_SCHEMA)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML run config (a file or a shipped recipe's name), applies ``key=value`` overrides, resolves
    ``${variables.x}`` and validates it.

    Raises:
        ConfigError: for a missing or unreadable file, a malformed override, a failed interpolation, or any schema
            violation.
    """
    resolved = read_yaml(path, overrides)
    validate_run_config(resolved)
    return resolved
