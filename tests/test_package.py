"""The package's floors: the model, the nnU-Net adapter and the command, imports running one way."""
import ast
import glob
import os
from typing import Dict, List

import nnunet_emcad

PACKAGE = os.path.dirname(nnunet_emcad.__file__)
FLOORS = ('model', 'nnunet', 'command')
"""Lowest first: a module imports from its own floor and the floors below it."""


def _imports() -> Dict[str, List[str]]:
    """Each of the package's modules (a path below the package) -> the modules it imports, at any depth."""
    found = {}
    for path in glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        modules = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.append(node.module)
        found[os.path.relpath(path, PACKAGE)] = modules
    return found


def test_every_module_lives_on_a_floor_or_is_the_packages_entry():
    assert {path.split(os.sep)[0] for path in _imports()} == {*FLOORS, '__init__.py', '_startup.py'}


def test_imports_run_one_way_command_to_adapter_to_model():
    for path, modules in _imports().items():
        floor = path.split(os.sep)[0]
        allowed = FLOORS[:FLOORS.index(floor) + 1] if floor in FLOORS else FLOORS
        below = [m for m in modules if m.startswith('nnunet_emcad.') and m.split('.')[1] not in allowed]
        assert not below, f"{path} imports {below} from a floor above its own"


def test_the_model_imports_nothing_of_nnunet_and_the_package_nothing_of_the_checkout():
    for path, modules in _imports().items():
        assert not [m for m in modules if m.split('.')[0] in ('benchmarks', 'tests')], path
        if path.startswith('model'):
            assert not [m for m in modules if m.split('.')[0] == 'nnunetv2'], path
