"""A multi-round config (``composer-kd rounds``): a run config plus ``rounds`` (each round a list of dot-list
overrides) and ``rounds_folder``; every round's config read and checked (schema and rules) before the first round
trains, without importing torch.

Round N+1's teacher is round N's exported student unless its overrides name ``model.teacher`` or
``model.teachers``.
"""

import os
from typing import Any, Sequence

from composer_kd.config.loading import read_yaml
from composer_kd.config.paths import LocalPaths
from composer_kd.config.run_config import validate_run_config
from composer_kd.config.run_rules import check_run_rules
from composer_kd.errors import ConfigError

__all__ = ['load_rounds', 'round_dir']


def _round_entries(path: str, overrides: Sequence[str]) -> tuple[list[list[str]], str]:
    """The ``rounds`` list (each a list of ``key=value`` strings) and the rounds folder, from the YAML as written
    (a round's overrides may use ``${variables.x}``; they resolve in the round's config)."""
    raw = read_yaml(path, overrides)
    rounds = raw.get('rounds')
    if not isinstance(rounds, list) or not rounds:
        raise ConfigError(f'rounds must be a non-empty list of rounds (each a list of key=value overrides), got '
                          f'{rounds!r}')
    entries = []
    for i, entry in enumerate(rounds):
        if entry is None:
            entry = []
        if not isinstance(entry, list) or not all(isinstance(item, str) and '=' in item for item in entry):
            raise ConfigError(f'rounds.{i} must be a list of key=value overrides (e.g. [max_duration=40ba]), got '
                              f'{entry!r}')
        entries.append(entry)
    if not raw.get('run_name'):
        raise ConfigError('rounds need a run_name (each round runs as RUN_NAME-round-N, and autoresumes by it)')
    folder = raw.get('rounds_folder') or os.path.join('runs', f'{raw["run_name"]}-rounds')
    if not isinstance(folder, str):
        raise ConfigError(f'rounds_folder must be a folder, got {folder!r}')
    return entries, os.path.abspath(folder)


def _names_teacher(overrides: Sequence[str]) -> bool:
    keys = [item.split('=', 1)[0] for item in overrides]
    return any(k == p or k.startswith(p + '.') for k in keys for p in ('model.teacher', 'model.teachers'))


def load_rounds(path: str, overrides: Sequence[str] = (), gpu: bool = False, world_size: int = 1,
                paths_elsewhere: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Every round's resolved, validated run config, and the rounds folder (for a run of ``world_size``
    processes on GPUs (``gpu``) or CPUs; ``paths_elsewhere``: local paths missing here are not refused).

    Raises:
        ConfigError: for a bad ``rounds`` entry or a round whose config is invalid (named ``rounds.N: ...``).
    """
    entries, folder = _round_entries(path, overrides)
    configs = []
    for r, entry in enumerate(entries, start=1):
        chain, later = [], LocalPaths(elsewhere=paths_elsewhere)
        if r > 1 and not _names_teacher(entry):
            previous = os.path.join(round_dir(folder, r - 1), 'student')
            chain = ['model.teachers=null', 'model.teacher=null',
                     f'model.teacher.pretrained_model_name_or_path={previous}']
            later = LocalPaths(paths_elsewhere, made_later=[previous])  # the previous round writes it
        try:
            cfg = read_yaml(path, [*overrides, *chain, *entry])
            run_name = f'{cfg["run_name"]}-round-{r}'
            cfg.pop('rounds', None)
            cfg.pop('rounds_folder', None)
            cfg.update({'run_name': run_name, 'save_folder': os.path.join(round_dir(folder, r), 'checkpoints'),
                        'autoresume': True})
            validate_run_config(cfg)
            check_run_rules(cfg, world_size, gpu, os.environ.get('FSDP_VERSION'), later)
        except ConfigError as e:
            raise ConfigError(f'rounds.{r - 1}: {e}') from e
        configs.append(cfg)
    return configs, folder


def round_dir(folder: str, r: int) -> str:
    return os.path.join(folder, f'round-{r}')
