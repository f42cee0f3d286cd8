"""Every recipe under ``yamls/`` parses and passes every check that needs no model, data or GPU."""

import importlib.util
from pathlib import Path

import pytest
from composer.utils import FSDPConfig
from omegaconf import OmegaConf

from composer_kd.config.loading import read_yaml
from composer_kd.config.paths import LocalPaths
from composer_kd.config.precompute_config import check_precompute_config, load_precompute_config
from composer_kd.config.rounds_config import load_rounds
from composer_kd.config.run_config import load_config
from composer_kd.errors import ConfigError
from composer_kd.run.train import check_run_config

ALL = sorted((Path(__file__).resolve().parents[1] / 'yamls').rglob('*.yaml'))
PRECOMPUTE = [p for p in ALL if 'precompute' in read_yaml(str(p))]
ROUNDS = [p for p in ALL if 'rounds' in read_yaml(str(p))]
RECIPES = [p for p in ALL if p not in PRECOMPUTE and p not in ROUNDS]
ELSEWHERE = LocalPaths(elsewhere=True)  # recipes checked here whose models and data live elsewhere (a cluster, assets)


def test_there_are_cpu_and_gpu_recipes() -> None:
    precisions = {load_config(str(p)).get('precision', 'amp_bf16') for p in RECIPES}
    assert 'fp32' in precisions and 'amp_bf16' in precisions


@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(recipe: Path) -> None:
    cfg = load_config(str(recipe))
    if cfg.get('precision', 'amp_bf16') == 'fp32':  # a CPU recipe: one process and the launcher's two
        for world_size in (1, 2):
            check_run_config(cfg, world_size=world_size, gpu=False, fsdp_version='2', paths=ELSEWHERE)
    else:  # a GPU recipe, as launched on one node of 8 GPUs (its data and models are on the cluster)
        check_run_config(cfg, world_size=8, gpu=True, paths=ELSEWHERE)
        with pytest.raises(ConfigError, match='needs a GPU'):
            check_run_config(cfg, world_size=8, gpu=False, paths=ELSEWHERE)
    if cfg.get('fsdp_config'):
        FSDPConfig(**cfg['fsdp_config'])


def test_fsdp_config_typos_are_refused() -> None:
    gpu_recipe = next(p for p in RECIPES if 'llama3' in p.name)
    with pytest.raises(ConfigError, match='unknown key fsdp_config.sharding_stratgy'):
        check_run_config(load_config(str(gpu_recipe), ['fsdp_config.sharding_stratgy=FULL_SHARD']), world_size=8,
                         gpu=True, paths=ELSEWHERE)


def test_there_are_precompute_and_rounds_recipes() -> None:
    assert PRECOMPUTE and ROUNDS and len(PRECOMPUTE) + len(ROUNDS) + len(RECIPES) == len(ALL)


@pytest.mark.parametrize('recipe', ROUNDS, ids=lambda p: p.name)
def test_rounds_recipe_is_valid(recipe: Path) -> None:
    configs, _ = load_rounds(str(recipe), paths_elsewhere=True)  # every round's config, checked as for one process
    assert len(configs) >= 2 and all(cfg['autoresume'] for cfg in configs)


@pytest.mark.parametrize('recipe', PRECOMPUTE, ids=lambda p: p.name)
def test_precompute_recipe_is_valid(recipe: Path) -> None:
    cfg = load_precompute_config(str(recipe))
    if cfg.get('precision', 'amp_bf16') == 'fp32':
        for world_size in (1, 2):
            check_precompute_config(cfg, world_size=world_size, gpu=False, fsdp_version='2', paths=ELSEWHERE)
    else:
        check_precompute_config(cfg, world_size=8, gpu=True, paths=ELSEWHERE)
        with pytest.raises(ConfigError, match='needs a GPU'):
            check_precompute_config(cfg, world_size=8, gpu=False, paths=ELSEWHERE)
    if cfg.get('fsdp_config'):
        FSDPConfig(**cfg['fsdp_config'])


def test_the_readme_yaml_parses_and_passes_every_check(tmp_path: Path) -> None:
    """The full config block is checked as launched on 8 GPUs; each fragment on top of it; the precompute block
    as a precompute config; every block must parse."""
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    blocks = [b.split('```', 1)[0] for b in readme.split('```yaml\n')[1:]]
    parsed = []
    for i, block in enumerate(blocks):
        path = tmp_path / f'block{i}.yaml'
        path.write_text(block)
        parsed.append(read_yaml(str(path)))
    full = [cfg for cfg in parsed if 'max_duration' in cfg]
    assert len(full) == 1, 'the README has one full run config'
    check_run_config(load_config(str(tmp_path / f'block{parsed.index(full[0])}.yaml')), world_size=8, gpu=True,
                     paths=ELSEWHERE)
    for i, cfg in enumerate(parsed):
        if 'precompute' in cfg:
            check_precompute_config(load_precompute_config(str(tmp_path / f'block{i}.yaml')), world_size=8, gpu=True,
                                    paths=ELSEWHERE)
        elif 'rounds' not in cfg and cfg is not full[0]:
            merged = OmegaConf.to_container(OmegaConf.merge(full[0], cfg))
            if 'teachers' in cfg.get('model', {}):
                merged['model']['teacher'] = None
            path = tmp_path / f'merged{i}.yaml'
            OmegaConf.save(merged, path)
            if 'wandb' in (merged.get('loggers') or {}) and importlib.util.find_spec('wandb') is None:
                with pytest.raises(ConfigError, match='loggers.wandb: the wandb package is not installed'):
                    check_run_config(load_config(str(path)), world_size=8, gpu=True, paths=ELSEWHERE)
                del merged['loggers']['wandb']
                OmegaConf.save(merged, path)
            check_run_config(load_config(str(path)), world_size=8, gpu=True, paths=ELSEWHERE)


def test_eval_interval_zero_means_never_and_format_load_paths_are_not_checked(tiny_assets: Path) -> None:
    cfg = load_config(str(next(p for p in RECIPES if p.name == 'tiny-cpu.yaml')), [f'variables.assets={tiny_assets}'])
    check_run_config({**cfg, 'eval_interval': 0, 'load_path': './ckpt/latest-rank{rank}.pt'}, world_size=1, gpu=False)
    with pytest.raises(ConfigError, match='eval_interval must be a positive time'):
        check_run_config({**cfg, 'eval_interval': -1}, world_size=1, gpu=False)
    with pytest.raises(ConfigError, match='load_path: no such checkpoint file or folder: ./ckpt/latest.pt'):
        check_run_config({**cfg, 'load_path': './ckpt/latest.pt'}, world_size=1, gpu=False)  # every path is here
