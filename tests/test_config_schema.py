"""The config schemas (``composer_kd/config``): their static copies of Composer's and Streaming's vocabularies still
match the installed packages (a dependency upgrade that changes one fails here, by name), the walk's messages, and
the promise that a config is checked without importing torch."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from composer_kd.config.kinds import parse_time
from composer_kd.config.precompute_config import COMPRESSIONS, ENCODINGS
from composer_kd.config.registry import REGISTRIES, resolve
from composer_kd.config.run_schema import (
    BATCHING_METHODS,
    FSDP_KEYS,
    HASHES,
    PARTITION_ALGOS,
    RUN_SCHEMA,
    SAMPLING_METHODS,
    SHUFFLE_ALGOS,
    trainer_keys,
)
from composer_kd.config.schema import check, did_you_mean
from composer_kd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_fsdp_keys_are_composers() -> None:
    from composer.utils import FSDP2Config, FSDPConfig
    composer = {f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith('_')}
    assert set(FSDP_KEYS) == composer | FSDP2Config.settable_attrs(), 'Composer\'s FSDP settings changed'


def test_streaming_vocabularies_are_streamings() -> None:
    from streaming.base.batching import batching_methods
    from streaming.base.compression import get_compressions
    from streaming.base.hashing import get_hashes
    from streaming.base.partition import algos as partition_algos
    from streaming.base.shuffle import algos as shuffle_algos
    assert set(SHUFFLE_ALGOS) == set(shuffle_algos)
    assert set(PARTITION_ALGOS) == set(partition_algos)
    assert set(BATCHING_METHODS) == set(batching_methods)
    assert set(HASHES) == set(get_hashes())
    assert set(COMPRESSIONS) == set(get_compressions())
    assert set(SAMPLING_METHODS) == {'balanced', 'fixed'}


def test_encodings_are_the_datasets() -> None:
    from composer_kd.data import teacher_topk
    assert teacher_topk.ENCODINGS is ENCODINGS


@pytest.mark.parametrize('value', ['10ba', '3e4tok', '0.5dur', '2ep', '100sp', '1iter', 5, '1.5ba', 'ba', '10xx', '5sec',
                                   '-3ba', True, 2.5, None, '10BA'])
def test_time_strings_read_as_composer_reads_them(value) -> None:
    from composer.core import Time, TimeUnit
    try:
        time = Time.from_input(value, TimeUnit.EPOCH) if not isinstance(value, bool) and value is not None else None
        want = None if time is None else (float(time.value), time.unit.value)
    except (ValueError, TypeError):
        want = None
    assert parse_time(value) == want


def test_every_registered_name_imports_and_trainer_keys_are_trainer_arguments() -> None:
    import inspect

    from composer import Trainer
    for table, names in REGISTRIES.items():
        for name in names:
            assert callable(resolve(table, name)), (table, name)
    assert set(trainer_keys()) <= set(inspect.signature(Trainer).parameters)


def test_unknown_keys_are_named_with_the_closest_known_one() -> None:
    assert did_you_mean('alpah', ['alpha', 'beta']) == " (did you mean 'alpha'?)"
    assert did_you_mean('zzz', ['alpha', 'beta']) == ''
    cfg = {'model': {'student': {'config': {'model_type': 'gpt2'}}, 'distillation': {'temprature': 2}},
           'tokenizer': {'name': 't'}, 'train_loader': {'dataset': {'local': 'x'}}, 'optimizer': {'name': 'adamw'},
           'max_duration': '1ba', 'global_train_batch_size': 1}
    with pytest.raises(ConfigError, match=r"unknown key model.distillation.temprature \(did you mean 'temperature'\?\)"):
        check(cfg, RUN_SCHEMA)
    cfg['model']['distillation'] = {}
    check(cfg, RUN_SCHEMA)
    with pytest.raises(ConfigError, match=r"optimizer: unknown name 'adamww' \(did you mean 'adamw'\?\)"):
        check({**cfg, 'optimizer': {'name': 'adamww'}}, RUN_SCHEMA)


def test_a_config_is_checked_without_importing_torch(tmp_path: Path) -> None:
    code = ('import sys\n'
            'from composer_kd.config.run_config import load_config\n'
            'from composer_kd.config.run_rules import check_run_rules\n'
            'from composer_kd.config.paths import LocalPaths\n'
            f'cfg = load_config({str(REPO / "yamls" / "llama3-8b-to-1b.yaml")!r})\n'
            'check_run_rules(cfg, 8, True, None, LocalPaths(elsewhere=True))\n'
            'heavy = [m for m in ("torch", "composer", "transformers", "streaming") if m in sys.modules]\n'
            'assert not heavy, heavy\n')
    subprocess.run([sys.executable, '-c', code], check=True)
