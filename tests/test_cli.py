"""The command line answers ``--help`` without loading torch, Composer or transformers, and the package's public
names still resolve to the objects their modules define."""

import importlib
import subprocess
import sys

import composer_kd
import composer_kd.data as composer_kd_data

HEAVY = ('torch', 'composer', 'transformers', 'streaming')


def test_help_loads_no_heavy_library() -> None:
    code = ('import sys\nfrom composer_kd.cli import main\ntry:\n    main(["--help"])\nexcept SystemExit:\n    pass\n'
            f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == '[]', out
    assert 'quickstart' in out and 'prepare-data' in out


def test_tokenize_worker_loads_no_heavy_library() -> None:
    """What a spawned ``prepare-data`` worker imports: every worker pays for it at start."""
    code = ('import sys\nimport composer_kd.data.tokenize_worker\n'
            f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]', out


def test_public_names_resolve_to_their_modules() -> None:
    for package in (composer_kd, composer_kd_data):
        for name in package.__all__:
            module = importlib.import_module(package._EXPORTS[name])
            assert getattr(package, name) is getattr(module, name)
        assert set(package.__all__) <= set(dir(package))
