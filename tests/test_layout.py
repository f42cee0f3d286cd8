"""The package's folders form layers and imports flow one way: a module imports only from lower layers or
from its own folder. A back-edge (say the data layer importing the run layer) fails here by name."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'composer_kd'

# Lower numbers are lower layers. The package root (__init__, __main__) re-exports and may import any layer.
LAYERS = {
    'errors': 0,
    'lazy_exports': 0,
    'losses': 1,
    'config': 2,
    'data': 3,
    'model': 4,
    'callbacks': 5,  # callbacks drive the model (sampling continuations with it, reading its sums)
    'builders': 6,
    'run': 7,
    'foundry': 7,
    'quickstart': 8,
    'cli': 9,
}


def _unit(module: str) -> str:
    """``composer_kd.run.train`` → ``run``; ``composer_kd.cli`` → ``cli``."""
    return module.split('.')[1]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('composer_kd.'):
            found.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == 'composer_kd':
            found += [f'composer_kd.{alias.name}' for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith('composer_kd.')]
    return found


def test_every_module_belongs_to_a_layer() -> None:
    units = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob('*.py')}
    assert units - {'__init__', '__main__'} == set(LAYERS)


def test_imports_flow_from_higher_layers_to_lower_ones() -> None:
    back_edges = []
    for path in sorted(PACKAGE.rglob('*.py')):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1 and path.stem in ('__init__', '__main__'):
            continue
        own = path.stem if len(relative.parts) == 1 else relative.parts[0]
        for module in _imports(path):
            other = _unit(module)
            if other != own and LAYERS[other] >= LAYERS[own]:
                back_edges.append(f'{relative} imports {module}')
    assert not back_edges, back_edges
