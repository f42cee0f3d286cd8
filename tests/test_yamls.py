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

ALL = sorted(p for p in (Path(__file__).resolve().parents[1] / 'yamls').rglob('*.yaml')
             if 'foundry' not in p.parts)  # LLM Foundry's dialect: tests/test_foundry_plugin.py
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


# The pages whose YAML blocks belong to a run config: whole configs, or fragments of one.
DOC_PAGES = ('README.md', 'docs/config.md', 'docs/offline.md', 'docs/ensembles-and-rounds.md', 'docs/fused-head.md')


def test_the_docs_yaml_parses_and_passes_every_check(tmp_path: Path) -> None:
    """docs/config.md's full config block is checked as launched on 8 GPUs, and so is the README's minimal one;
    each fragment of these pages on top of the full config; the precompute block as a precompute config; every
    block must parse."""
    root = Path(__file__).resolve().parents[1]
    paths, parsed = {}, {}
    for page in DOC_PAGES:
        blocks = [b.split('```', 1)[0] for b in (root / page).read_text().split('```yaml\n')[1:]]
        for i, block in enumerate(blocks):
            path = tmp_path / f'{page.replace("/", "_")}-block{i}.yaml'
            path.write_text(block)
            paths[path], parsed[path] = page, read_yaml(str(path))
    assert set(paths.values()) == set(DOC_PAGES), 'each page has YAML blocks'
    full = [path for path, cfg in parsed.items() if 'max_duration' in cfg and paths[path] == 'docs/config.md']
    assert len(full) == 1, 'docs/config.md has one full run config'
    assert [paths[p] for p, cfg in parsed.items() if 'max_duration' in cfg].count('README.md') == 1, \
        'the README has one minimal run config'
    base = parsed[full[0]]
    for i, (path, cfg) in enumerate(parsed.items()):
        if 'max_duration' in cfg:
            check_run_config(load_config(str(path)), world_size=8, gpu=True, paths=ELSEWHERE)
        elif 'precompute' in cfg:
            check_precompute_config(load_precompute_config(str(path)), world_size=8, gpu=True, paths=ELSEWHERE)
        elif 'rounds' not in cfg:
            merged = OmegaConf.to_container(OmegaConf.merge(base, cfg))
            if 'teachers' in cfg.get('model', {}):
                merged['model']['teacher'] = None
            merged_path = tmp_path / f'merged{i}.yaml'
            OmegaConf.save(merged, merged_path)
            if 'wandb' in (merged.get('loggers') or {}) and importlib.util.find_spec('wandb') is None:
                with pytest.raises(ConfigError, match='loggers.wandb: the wandb package is not installed'):
                    check_run_config(load_config(str(merged_path)), world_size=8, gpu=True, paths=ELSEWHERE)
                del merged['loggers']['wandb']
                OmegaConf.save(merged, merged_path)
            check_run_config(load_config(str(merged_path)), world_size=8, gpu=True, paths=ELSEWHERE)


def test_eval_interval_zero_means_never_and_format_load_paths_are_not_checked(tiny_assets: Path) -> None:
    cfg = load_config(str(next(p for p in RECIPES if p.name == 'tiny-cpu.yaml')), [f'variables.assets={tiny_assets}'])
    check_run_config({**cfg, 'eval_interval': 0, 'load_path': './ckpt/latest-rank{rank}.pt'}, world_size=1, gpu=False)
    with pytest.raises(ConfigError, match='eval_interval must be a positive time'):
        check_run_config({**cfg, 'eval_interval': -1}, world_size=1, gpu=False)
    with pytest.raises(ConfigError, match='load_path: no such checkpoint file or folder: ./ckpt/latest.pt'):
        check_run_config({**cfg, 'load_path': './ckpt/latest.pt'}, world_size=1, gpu=False)  # every path is here
