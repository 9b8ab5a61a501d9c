import fcntl
import os
import warnings
from typing import Callable

import pytest
import torch

from nnunet_emcad.command.paths import shared_data_dir
from tiny_data import plan_tiny_3d_dataset, plan_tiny_dataset

warnings.filterwarnings('ignore', category=FutureWarning)

SHARED = os.path.dirname(shared_data_dir())


@pytest.fixture(scope='session')
def shared_file() -> Callable[[str], str]:
    """``shared_file('reference/official_emcad_keys_b2.tsv')``: that path in the project's shared folder (above its
    shared data: ../shared of a clone). The test skips, naming the path, where it is absent: a user's clone has no
    ../shared, or one with only the data the README tells them to put there."""
    def path(relative: str) -> str:
        full = os.path.join(SHARED, relative)
        if not os.path.exists(full):
            pytest.skip(f"{full} is absent: the project's shared folder holds it (present in CI)")
        return full
    return path


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """nnU-Net's folders in a temporary directory, and no ImageNet weights named by the user's environment."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv('nnUNet_EMCAD_PVT_WEIGHTS', raising=False)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest.ini) runs two workers whatever the core count: nnU-Net's CPU trainings and predictions
    each use every core (it sets torch's threads to the core count), so more workers would only oversubscribe;
    two overlap one's start-up, imports and waits with the other's computing."""
    return 2


def pytest_configure(config) -> None:
    """In an xdist worker: this process's torch, and nnU-Net's worker processes in the commands the tests run
    (each of which starts a Python of its own), on the worker's share of the cores; OpenMP threads in those
    commands that sleep instead of spinning while they wait (two nnU-Net trainings at once, each spinning on every
    core, ran slower together than one after the other: benchmarks/results/test_durations.md)."""
    if os.environ.get('PYTEST_XDIST_WORKER'):
        share = str(max(1, (os.cpu_count() or 2) // 2))
        os.environ.update(nnUNet_def_n_proc=share, nnUNet_n_proc_DA=share)
        os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
        torch.set_num_threads(int(share))


def _planned_once(tmp_path_factory, name: str, plan: Callable[[str], str]) -> str:
    """``plan(folder)`` once per test run: the first xdist worker to ask plans, the others wait for it."""
    if not os.environ.get('PYTEST_XDIST_WORKER'):
        return plan(str(tmp_path_factory.mktemp(name)))
    root = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    with open(f'{root}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / 'planned').exists():
            root.mkdir(exist_ok=True)
            plan(str(root))
            (root / 'planned').touch()
    return str(root)


@pytest.fixture(scope='session')
def tiny_planned(tmp_path_factory) -> str:
    """Dataset901_Tiny planned and preprocessed for 2d by nnU-Net once per test run; tests take copies
    (``copy_planned``)."""
    return _planned_once(tmp_path_factory, 'tiny_planned', plan_tiny_dataset)


@pytest.fixture(scope='session')
def tiny_planned_3d(tmp_path_factory) -> str:
    """Dataset902_Tiny3D planned and preprocessed for 3d_fullres by nnU-Net once per test run; tests take copies
    (``copy_planned``)."""
    return _planned_once(tmp_path_factory, 'tiny_planned_3d', plan_tiny_3d_dataset)
