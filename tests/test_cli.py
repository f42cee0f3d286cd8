"""The command line answers ``--help`` without loading torch, Composer or transformers, and the package's public
names still resolve to the objects their modules define."""

import importlib
import subprocess
import sys

import composer_kd

HEAVY = ('torch', 'composer', 'transformers', 'streaming')


def test_help_loads_no_heavy_library() -> None:
    code = ('import sys\nfrom composer_kd.cli import main\ntry:\n    main(["--help"])\nexcept SystemExit:\n    pass\n'
            f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == '[]', out
    assert 'quickstart' in out and 'prepare-data' in out


def test_public_names_resolve_to_their_modules() -> None:
    for name in composer_kd.__all__:
        module = importlib.import_module(composer_kd._EXPORTS[name])
        assert getattr(composer_kd, name) is getattr(module, name)
    assert set(composer_kd.__all__) <= set(dir(composer_kd))
