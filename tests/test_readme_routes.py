"""The README's own-dataset CPU route and its own-schedule recipe, run exactly as the README writes them."""
import json
import os
import re
import subprocess
import sys

from helpers import code_block, readme_section
from nnunet_emcad.demo_data import make_synthetic_dataset
from nnunet_emcad.scripts import MALLOC_SETTINGS

def _user_env(home) -> dict:
    """A fresh shell of a user whose home is ``home``: no nnU-Net settings, this interpreter's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env.update(HOME=str(home), MPLBACKEND='Agg', PATH=os.path.dirname(sys.executable) + os.pathsep + env['PATH'])
    return env


def test_the_cpu_route_runs_as_written_on_generated_images(tmp_path):
    """Generated images stand in for ACDC under its name: the commands run unchanged."""
    script = code_block(readme_section('### On a CPU: a first model in minutes'), 'bash')
    make_synthetic_dataset(str(tmp_path / 'nnUNet_raw'), 27, n_train=10, n_test=3, name='ACDC')
    proc = subprocess.run(['bash', '-e', '-c', script], env=_user_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=1500, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = 'nnUNetTrainerEMCAD_PVTb0_500it__nnUNetPlans__2d'
    fold = tmp_path / 'nnUNet_results' / 'Dataset027_ACDC' / model / 'fold_0'
    log = next(fold.glob('training_log_*.txt')).read_text()
    assert re.findall(r': Epoch (\d+)\s*$', log, re.M)[-1] == '19' and (fold / 'progress.png').is_file()
    with open(tmp_path / 'acdc_predictions' / 'summary.json') as f:
        summary = json.load(f)
    assert summary['mean']['1']['Dice'] > 0.5, summary['mean']  # an untrained network scores near 0


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
