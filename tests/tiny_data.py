"""A tiny, easy 2D segmentation data set in nnU-Net raw format, and running nnU-Net's console scripts."""
import os
import subprocess
import sys
import time
from typing import Dict, List

from nnunet_emcad.demo_data import make_synthetic_dataset

BIN = os.path.dirname(sys.executable)


def make_dataset(raw: str, dataset_id: int = 901, n_train: int = 10, n_test: int = 3, seed: int = 0) -> str:
    """Write Dataset{id}_Tiny (png, 64x64, 3 classes) under ``raw``; returns its folder."""
    return make_synthetic_dataset(raw, dataset_id, n_train, n_test, seed)


def nnunet_env(root: str) -> Dict[str, str]:
    """A clean environment for nnU-Net's scripts: its folders under ``root``, no nnUNet_extTrainer, 2 workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env.update(nnUNet_raw=os.path.join(root, 'raw'), nnUNet_preprocessed=os.path.join(root, 'preprocessed'),
               nnUNet_results=os.path.join(root, 'results'), nnUNet_def_n_proc='2', nnUNet_n_proc_DA='2',
               OMP_NUM_THREADS='2', MPLBACKEND='Agg')
    env['PATH'] = BIN + os.pathsep + env.get('PATH', '')
    return env


def run(args: List[str], env: Dict[str, str], log: str, timeout: float = 900) -> str:
    """Run one nnU-Net console script; its output goes to ``log``. Fails with the log's tail."""
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(args)}\n{proc.stdout}\n# {time.perf_counter() - start:.1f} s, exit {proc.returncode}\n")
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout
