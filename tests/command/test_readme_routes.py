"""The README's own-dataset CPU route and its own-schedule recipe, run as the README writes them (the route on a
shorter schedule of its trainer)."""
import ast
import glob
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from helpers import TESTS
from benchmarks.cpu_route import link_dataset
from benchmarks.source_tree import code_block, readme_section, readme_text
from nnunet_emcad.command.demo_data import make_synthetic_dataset
from nnunet_emcad.command.scripts import MALLOC_SETTINGS
from nnunet_emcad.nnunet import trainers as T
from tiny_plans import DATASET_JSON, make_plans

BENCHMARKS = os.path.join(os.path.dirname(TESTS), 'benchmarks')


def _user_env(home) -> dict:
    """A fresh shell of a user whose home is ``home``: no nnU-Net settings, this interpreter's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env.update(HOME=str(home), MPLBACKEND='Agg', PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
    return env


ROUTE_TRAINER = 'nnUNetTrainerEMCAD_PVTb0_500it'
# the route's trainer on fewer epochs, as nnU-Net finds it through nnUNet_extTrainer
STAND_IN = runpy.run_path(os.path.join(TESTS, 'ext_trainers', 'short_route_trainers.py'))


@pytest.mark.slow
def test_the_cpu_route_runs_as_written_on_generated_images_and_its_benchmark_times_it(tmp_path):
    """Generated images stand in for ACDC under its name: benchmarks/cpu_route.py runs the commands unchanged but
    for the trainer, which trains on a fifth of the route trainer's iterations (tests/ext_trainers; the schedule
    is checked below), and reports each command's time and the Dice."""
    script = code_block(readme_section('### On a CPU: a first model in minutes'), 'bash')
    assert script.count(ROUTE_TRAINER) == 2  # the training and the prediction
    source = make_synthetic_dataset(str(tmp_path / 'source'), 27, n_train=10, n_test=3, name='ACDC')
    home, results = tmp_path / 'home', tmp_path / 'results'
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'cpu_route.py'), '--source', source,
                           '--trainer', 'nnUNetTrainerEMCAD_PVTb0_route', '--ext-trainers',
                           os.path.join(TESTS, 'ext_trainers'), '--home', str(home), '--out', str(results)],
                          env=_user_env(tmp_path), capture_output=True, text=True, timeout=1500,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / 'cpu_route_acdc.json').read_text())
    model = 'nnUNetTrainerEMCAD_PVTb0_route__nnUNetPlans__2d'
    assert (home / 'nnUNet_results' / 'Dataset027_ACDC' / model / 'fold_0' / 'progress.png').is_file()
    assert result['epochs'] == STAND_IN['ROUTE_EPOCHS'] and result['held_out_cases'] == ['caseTs000', 'caseTs001',
                                                                                          'caseTs002']
    seconds = result['seconds']
    assert list(seconds) == ['nnUNetv2_plan_and_preprocess', 'nnUNetv2_train', 'nnUNetv2_predict',
                             'nnUNetv2_evaluate_folder']
    assert all(s > 0 for s in seconds.values()) and sum(seconds.values()) <= result['total_seconds']
    assert 0 < result['epoch_seconds'] < seconds['nnUNetv2_train']  # its start and final validation besides
    # The disks cover about 5% of each image: a network that marks everything as disk scores about 0.1, one that
    # marks nothing 0. The four short epochs vary with the random data order (one CI run scored 0.495)
    assert result['held_out_dice']['1'] > 0.3, result
    assert 0 < result['validation_dice']['mean'] <= 1
    markdown = (results / 'cpu_route_acdc.md').read_text()
    assert f"| the whole route | {result['total_seconds']:.0f} |" in markdown
    assert f"Reproduce: `python benchmarks/cpu_route.py --source {source} --trainer" in markdown


def test_the_cpu_route_benchmark_holds_out_fold_0s_validation_cases_where_the_source_has_no_test_set(tmp_path):
    source = make_synthetic_dataset(str(tmp_path / 'source'), 27, n_train=6, n_test=2, name='ACDC')
    for folder in ('imagesTs', 'labelsTs'):
        shutil.rmtree(os.path.join(source, folder))
    with open(os.path.join(source, 'splits_final.json'), 'w') as f:
        json.dump([{'train': [f'caseTr00{i}' for i in range(2, 6)], 'val': ['caseTr000', 'caseTr001']}], f)
    target = str(tmp_path / 'linked')
    assert link_dataset(source, target) == ['caseTr000', 'caseTr001']
    assert sorted(os.listdir(os.path.join(target, 'imagesTs'))) == ['caseTr000_0000.png', 'caseTr001_0000.png']
    assert sorted(os.listdir(os.path.join(target, 'labelsTs'))) == ['caseTr000.png', 'caseTr001.png']
    assert sorted(os.listdir(os.path.join(target, 'labelsTr'))) == [f'caseTr00{i}.png' for i in range(2, 6)]
    with open(os.path.join(target, 'dataset.json')) as f:
        assert json.load(f)['numTraining'] == 4


def test_the_cpu_routes_trainer_trains_500_iterations_at_batch_8_and_the_tests_stand_in_differs_only_in_epochs(
        nnunet_folders):
    short, epochs = STAND_IN['nnUNetTrainerEMCAD_PVTb0_route'], STAND_IN['ROUTE_EPOCHS']
    route = recursive_find_trainer_class_by_name(ROUTE_TRAINER)
    assert route is T.nnUNetTrainerEMCAD_PVTb0_500it
    schedules = {}
    for cls in (route, short):
        trainer = cls(make_plans(5, [64, 64]), '2d', 0, DATASET_JSON, device=torch.device('cpu'))
        schedules[cls] = (trainer.num_epochs, trainer.num_iterations_per_epoch,
                          trainer.configuration_manager.batch_size, trainer.num_val_iterations_per_epoch)
        assert isinstance(trainer, T.nnUNetTrainerEMCAD_PVTb0)
    assert schedules[route] == (20, 25, 8, 2) and schedules[route][0] * schedules[route][1] == 500
    assert schedules[short] == (epochs,) + schedules[route][1:]


def test_the_cpu_routes_malloc_line_sets_what_the_projects_own_commands_get():
    script = code_block(readme_section('### On a CPU: a first model in minutes'), 'bash')
    line = next(line for line in script.splitlines() if 'MALLOC_' in line)
    assert dict(re.findall(r'(MALLOC_\w+)=(\d+)', line)) == MALLOC_SETTINGS


def test_your_own_schedule_from_the_readme_is_found_next_to_the_plugins_trainers(tmp_path):
    section = readme_section('### On a CPU: a first model in minutes')
    code = code_block(section, 'python')
    path = os.path.expanduser(code.splitlines()[0].lstrip('# ').replace('~', str(tmp_path)))
    os.makedirs(os.path.dirname(path))
    with open(path, 'w') as f:
        f.write(code)
    export = re.search(r'`(export nnUNet_extTrainer=[^`]+)`', section).group(1)
    name = re.search(r'class (\w+)\(', code).group(1)
    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; "
              f"print(find({name!r}).__mro__[1].__name__, find('nnUNetTrainerEMCAD').__module__)")
    proc = subprocess.run(['bash', '-e', '-c', f'{export}\n{sys.executable} -c "{lookup}"'], env=_user_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == 'nnUNetTrainerEMCAD_PVTb0 nnunet_emcad.nnunet.trainers.base'


SORTED_BY_MARK = """
import json, os


def pytest_collection_finish(session):
    with open(os.environ['SORTED_BY_MARK'], 'w') as f:
        json.dump({'kept': [[i.nodeid, bool(i.get_closest_marker('slow'))] for i in session.items],
                   'left_out': [[i.nodeid, bool(i.get_closest_marker('slow'))] for i in LEFT_OUT]}, f)


LEFT_OUT = []


def pytest_deselected(items):
    LEFT_OUT.extend(items)
"""


def test_the_quick_check_from_the_readme_leaves_out_the_slow_tests_and_only_them(tmp_path):
    command = re.search(r'`bash bootstrap\.sh test ([^`]+)`', readme_text()).group(1)
    # one collection with the README's options: a plugin writes what they kept and left out, with each one's mark
    (tmp_path / 'sorted_by_mark.py').write_text(SORTED_BY_MARK)
    out = tmp_path / 'sorted.json'
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'sorted_by_mark',
                           *shlex.split(command)], cwd=os.path.dirname(TESTS), capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, SORTED_BY_MARK=str(out), PYTHONPATH=path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sorted_by_mark = json.loads(out.read_text())
    quick = {name for name, slow in sorted_by_mark['kept'] if not slow}
    slow = {name for name, slow in sorted_by_mark['left_out'] if slow}
    assert len(quick) == len(sorted_by_mark['kept']) and len(slow) == len(sorted_by_mark['left_out'])
    this_test = test_the_quick_check_from_the_readme_leaves_out_the_slow_tests_and_only_them.__name__
    assert f'tests/command/test_readme_routes.py::{this_test}' in quick
    end_to_end = ('tests/nnunet/test_nnunet_end_to_end.py', 'tests/nnunet/test_nnunet_3d.py')
    assert {name.split('::')[0] for name in slow} >= set(end_to_end)
    assert not [name for name in quick if name.split('::')[0] in end_to_end]


def _tests_taking(fixture: str) -> list:
    """The node ids of the test functions in tests/ that take ``fixture`` as an argument."""
    found = []
    for path in sorted(glob.glob(os.path.join(TESTS, '**', 'test_*.py'), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read())
        name = os.path.relpath(path, os.path.dirname(TESTS))
        found += [f'{name}::{node.name}' for node in tree.body if isinstance(node, ast.FunctionDef)
                  and node.name.startswith('test_') and fixture in [a.arg for a in node.args.args]]
    return found


def test_the_test_command_beside_a_data_only_shared_folder_skips_what_needs_other_shared_files(tmp_path):
    # the README's layout for a user: ../shared/data with their data sets, nothing else of the project's shared folder
    (tmp_path / 'shared' / 'data').mkdir(parents=True)
    tests = _tests_taking('shared_file')
    assert 'tests/model/test_reference_numbers.py::test_official_key_names_and_shapes' in tests
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-n', '0', '-rs', '-p', 'no:cacheprovider', *tests],
                          cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NNUNET_EMCAD_SHARED_DATA=str(tmp_path / 'shared' / 'data')))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'{len(tests)} skipped' in proc.stdout.splitlines()[-1]
    assert 'slowest 10 durations' in proc.stdout  # every run shows where the suite's minutes go (docs/testing.md)
    assert f"{tmp_path / 'shared' / 'reference' / 'official_emcad_keys_b2.tsv'} is absent" in proc.stdout
    assert f"{tmp_path / 'shared' / 'data' / 'Dataset027_ACDC'} is absent" in proc.stdout
