"""What the package may load and run: no ``eval``/``exec``, no import of names a config could choose, no pickle
of our own artifacts, ``trust_remote_code`` only from the YAML, and ``weights_only=False`` only behind
``export --trust-pickle``. An AST scan, so a new call site fails here by file and line."""

import ast
from pathlib import Path

from reliability import record

PACKAGE = Path(__file__).resolve().parents[1] / 'composer_kd'
BUILTINS = {'eval', 'exec', '__import__', 'compile'}  # as bare calls (``model.eval()`` is a method)
UNSAFE_OWNERS = {'pickle', 'marshal', 'dill', 'cloudpickle', 'yaml', 'importlib'}  # any call on these modules


def _calls(tree: ast.AST) -> list[tuple[str, str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                found.append(('', func.id, node))
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else '<expression>'
                found.append((owner, func.attr, node))
    return found


def _is_lazy_export(path: Path, node: ast.Call) -> bool:
    """``lazy_exports``'s ``importlib.import_module(exports[name])``: a module from a package's own fixed table."""
    arg = node.args[0] if node.args else None
    return path == PACKAGE / 'lazy_exports.py' and isinstance(arg, ast.Subscript) and \
        isinstance(arg.value, ast.Name) and arg.value.id == 'exports'


def test_no_code_from_configs_or_pickles() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob('*.py')):
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE.parent)
        for owner, name, node in _calls(tree):
            if ((owner == '' and name in BUILTINS) or owner in UNSAFE_OWNERS or name == 'import_module') and \
                    not _is_lazy_export(path, node):
                problems.append(f'{where}:{node.lineno}: {owner}.{name}()')
            for keyword in node.keywords:
                if keyword.arg == 'weights_only' and isinstance(keyword.value, ast.Constant) and \
                        keyword.value.value is False and path.name != 'export.py':
                    problems.append(f'{where}:{node.lineno}: weights_only=False')
                if keyword.arg == 'allow_unsafe_types' and not (isinstance(keyword.value, ast.Constant) and
                                                                keyword.value.value is False):
                    problems.append(f'{where}:{node.lineno}: allow_unsafe_types')
                if keyword.arg == 'trust_remote_code' and isinstance(keyword.value, ast.Constant) and \
                        keyword.value.value is True:
                    problems.append(f'{where}:{node.lineno}: trust_remote_code=True')
    assert not problems, problems
    record('a config value or artifact that would run code', 'nothing of ours evaluates, imports or unpickles what '
           'a config or artifact names (AST scan of the package)', lost='nothing')
