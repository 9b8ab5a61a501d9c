"""The README's own-dataset CPU route and its own-schedule recipe, run as the README writes them (the route on a
shorter schedule of its trainer)."""
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from helpers import code_block, readme_section, readme_text
from nnunet_emcad import trainers as T
from nnunet_emcad.demo_data import make_synthetic_dataset
from nnunet_emcad.scripts import MALLOC_SETTINGS
from test_trainers import DATASET_JSON, make_plans

TESTS = os.path.dirname(os.path.abspath(__file__))


def _user_env(home) -> dict:
    """A fresh shell of a user whose home is ``home``: no nnU-Net settings, this interpreter's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env.update(HOME=str(home), MPLBACKEND='Agg', PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
    return env


ROUTE_TRAINER = 'nnUNetTrainerEMCAD_PVTb0_500it'
# the route's trainer on fewer epochs, as nnU-Net finds it through nnUNet_extTrainer
STAND_IN = runpy.run_path(os.path.join(TESTS, 'ext_trainers', 'short_route_trainers.py'))


@pytest.mark.slow
def test_the_cpu_route_runs_as_written_on_generated_images(tmp_path):
    """Generated images stand in for ACDC under its name: the commands run unchanged but for the trainer, which
    trains on a fifth of the route trainer's iterations (tests/ext_trainers; the schedule is checked below)."""
    script = code_block(readme_section('### On a CPU: a first model in minutes'), 'bash')
    assert script.count(ROUTE_TRAINER) == 2  # the training and the prediction
    make_synthetic_dataset(str(tmp_path / 'nnUNet_raw'), 27, n_train=10, n_test=3, name='ACDC')
    env = dict(_user_env(tmp_path), nnUNet_extTrainer=os.path.join(TESTS, 'ext_trainers'))
    proc = subprocess.run(['bash', '-e', '-c', script.replace(ROUTE_TRAINER, 'nnUNetTrainerEMCAD_PVTb0_route')],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = 'nnUNetTrainerEMCAD_PVTb0_route__nnUNetPlans__2d'
    fold = tmp_path / 'nnUNet_results' / 'Dataset027_ACDC' / model / 'fold_0'
    log = next(fold.glob('training_log_*.txt')).read_text()
    epochs = STAND_IN['ROUTE_EPOCHS']
    assert re.findall(r': Epoch (\d+)\s*$', log, re.M)[-1] == str(epochs - 1) and (fold / 'progress.png').is_file()
    with open(tmp_path / 'acdc_predictions' / 'summary.json') as f:
        summary = json.load(f)
    assert summary['mean']['1']['Dice'] > 0.5, summary['mean']  # an untrained network scores near 0


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
    assert proc.stdout.strip().splitlines()[-1] == 'nnUNetTrainerEMCAD_PVTb0 nnunet_emcad.trainers'


def test_the_quick_check_from_the_readme_leaves_out_the_slow_tests_and_only_them():
    command = re.search(r'`bash bootstrap\.sh test ([^`]+)`', readme_text()).group(1)

    def collected(*args: str) -> set:
        proc = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', *args],
                              cwd=os.path.dirname(TESTS), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return {line for line in proc.stdout.splitlines() if '::' in line}

    quick, slow = collected(*shlex.split(command)), collected('-m', 'slow')
    this_test = test_the_quick_check_from_the_readme_leaves_out_the_slow_tests_and_only_them.__name__
    assert not quick & slow and f'tests/test_readme_routes.py::{this_test}' in quick
    assert {name.split('::')[0] for name in slow} >= {'tests/test_nnunet_end_to_end.py', 'tests/test_nnunet_3d.py'}
    assert not [name for name in quick if name.startswith(('tests/test_nnunet_end_to_end.py::',
                                                           'tests/test_nnunet_3d.py::'))]
