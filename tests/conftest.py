import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings('ignore', category=FutureWarning)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(PROJECT_ROOT), 'shared')


@pytest.fixture(scope='session')
def shared_dir() -> str:
    """../shared from the project root; tests that need it skip where it is absent (a user's clone)."""
    if not os.path.isdir(SHARED):
        pytest.skip(f"{SHARED} is absent: it holds the project's reference files and real data (present in CI)")
    return SHARED


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """nnU-Net's folders in a temporary directory, and no ImageNet weights named by the user's environment."""
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv('nnUNet_EMCAD_PVT_WEIGHTS', raising=False)
