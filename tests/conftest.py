import os
import warnings

import pytest

from nnunet_emcad.source_tree import shared_data_dir
from tiny_data import plan_tiny_dataset

warnings.filterwarnings('ignore', category=FutureWarning)

SHARED = os.path.dirname(shared_data_dir())


@pytest.fixture(scope='session')
def shared_dir() -> str:
    """The project's shared folder (above its shared data: ../shared of a clone); tests that need it skip where
    it is absent (a user's clone)."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"{SHARED} is absent: it holds the project's reference files and real data (present in CI)")
    return SHARED


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """nnU-Net's folders in a temporary directory, and no ImageNet weights named by the user's environment."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv('nnUNet_EMCAD_PVT_WEIGHTS', raising=False)


@pytest.fixture(scope='session')
def tiny_planned(tmp_path_factory) -> str:
    """Dataset901_Tiny planned and preprocessed by nnU-Net once per session; tests take copies (``copy_planned``)."""
    return plan_tiny_dataset(str(tmp_path_factory.mktemp('tiny_planned')))
