"""The GPU check packed for an offline CUDA machine without nnU-Net: the bundle holds what that machine lacks and
fits what the GPU machine's runner carries; run there, it installs what is missing and runs the check."""
import glob
import json
import os
import subprocess
import sys

import pytest

from benchmarks.source_tree import SOURCE_ROOT
from tiny_plans import DATASET_JSON, make_plans

PROBE_SETUP = ("from setuptools import setup\n"
               "setup(name='offline-gpu-probe', version='1.0', py_modules=['offline_gpu_probe'])\n")


def _offline_gpu(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'benchmarks.offline_gpu', *args], cwd=SOURCE_ROOT,
                          capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope='session')
def bundle(tmp_path_factory) -> str:
    """A bundle packed by the real command, from a tiny plan; skips where PyPI is unreachable."""
    root = tmp_path_factory.mktemp('offline_gpu')
    probe = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
                            'yacs==0.1.8', '-d', str(root / 'probe')], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"PyPI is not reachable, so no wheels can be packed: {probe.stderr.strip()[-300:]}")
    plans_dir = root / 'Dataset999_Plans'
    plans_dir.mkdir()
    (plans_dir / 'nnUNetPlans.json').write_text(json.dumps(make_plans(3, [32, 32])))
    (plans_dir / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    proc = _offline_gpu('--bundle', str(root / 'bundle'), 'pack', '--plans', str(plans_dir / 'nnUNetPlans.json'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'python3 -m benchmarks.offline_gpu run' in proc.stdout
    return str(root / 'bundle')


@pytest.mark.slow
@pytest.mark.xdist_group('offline_gpu_bundle')
def test_the_bundle_holds_wheels_for_the_gpu_machines_python_of_what_that_machine_lacks(bundle):
    wheels = [os.path.basename(w) for w in glob.glob(os.path.join(bundle, 'wheels', '*.whl'))]
    names = {w.split('-')[0].lower().replace('_', '-') for w in wheels}
    assert {'nnunetv2', 'dynamic-network-architectures', 'acvl-utils', 'batchgenerators', 'blosc2', 'timm'} <= names
    assert not names & {'torch', 'torchvision', 'triton', 'numpy', 'scipy', 'simpleitk', 'imagecodecs', 'argparse'}
    assert not [n for n in names if n.startswith('nvidia')]
    for wheel in wheels:  # pure Python, CPython 3.12's own, or the stable ABI
        tags = wheel[:-len('.whl')].split('-')[-3:]
        assert tags[1] == 'none' or tags[0] == 'cp312' or tags[1] == 'abi3', wheel
    size = sum(os.path.getsize(os.path.join(top, f)) for top, _, files in os.walk(bundle) for f in files)
    assert size < 64 * 2 ** 20
    assert json.load(open(os.path.join(bundle, 'plans', 'Dataset999_Plans', 'dataset.json'))) == DATASET_JSON
    assert os.path.isfile(os.path.join(bundle, 'stand_ins', 'SimpleITK', '__init__.py'))


@pytest.mark.slow
@pytest.mark.xdist_group('offline_gpu_bundle')
def test_run_installs_only_what_the_machine_lacks_and_runs_the_gpu_check_on_the_bundles_plans(bundle, tmp_path):
    # a distribution this environment lacks, as a wheel in the bundle beside those of distributions it has
    (tmp_path / 'probe').mkdir()
    (tmp_path / 'probe' / 'setup.py').write_text(PROBE_SETUP)
    (tmp_path / 'probe' / 'offline_gpu_probe.py').write_text('')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
                    '-w', os.path.join(bundle, 'wheels'), str(tmp_path / 'probe')], check=True)
    site = tmp_path / 'site'
    proc = _offline_gpu('--bundle', bundle, 'run', '--site', str(site), '--trainers', 'nnUNetTrainer',
                        '--steps', '2', '--batch-size', '1', '--device', 'cpu', '--backend', 'aot_eager',
                        env=dict(os.environ, OUT=str(tmp_path / 'out')))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f'installing 1 missing distributions into {site}: offline-gpu-probe' in proc.stdout
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith('-info')) == ['offline_gpu_probe.py']
    result = json.loads((tmp_path / 'out' / 'gpu.json').read_text())
    assert result['settings']['plans'] == os.path.join(bundle, 'plans', 'Dataset999_Plans', 'nnUNetPlans.json')
    assert [r['trainer'] for r in result['runs']] == ['nnUNetTrainer']
    assert result['runs'][0]['verdict']['trains']


def test_run_without_a_bundle_says_how_to_make_one(tmp_path):
    proc = _offline_gpu('--bundle', str(tmp_path / 'absent'), 'run')
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"no bundle at {tmp_path / 'absent'}: run python -m benchmarks.offline_gpu pack "
                                   f"where PyPI is reachable, and bring its folder along")


def test_pack_leaves_a_folder_alone_that_holds_something_else(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    proc = _offline_gpu('--bundle', str(tmp_path), 'pack', '--plans', str(tmp_path / 'nnUNetPlans.json'))
    assert proc.returncode == 1 and (tmp_path / 'notes.txt').read_text() == 'mine'
    assert proc.stderr.strip() == (f"{tmp_path} holds files but no packed bundle: name a new or empty folder "
                                   f"with --bundle")
