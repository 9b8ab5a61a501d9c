"""A tiny, easy 2D segmentation data set in nnU-Net raw format, and running nnU-Net's console scripts."""
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
from PIL import Image

BIN = os.path.dirname(sys.executable)


def _case(rng: np.random.Generator, size: int = 64):
    """Noise with a bright disk (label 1) and a dark square (label 2) at random places."""
    image = rng.normal(0.5, 0.08, (size, size))
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(6, 11)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    image[disk] += 0.35
    label[disk] = 1
    s = rng.integers(6, 12)
    y0, x0 = rng.integers(0, size - s, 2)
    square = np.zeros_like(disk)
    square[y0:y0 + s, x0:x0 + s] = True
    square &= ~disk
    image[square] -= 0.35
    label[square] = 2
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def make_dataset(raw: str, dataset_id: int = 901, n_train: int = 10, n_test: int = 3, seed: int = 0) -> str:
    """Write Dataset{id}_Tiny (png, 64x64, 3 classes) under ``raw``; returns its folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw, f'Dataset{dataset_id}_Tiny')
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, n in (('Tr', n_train), ('Ts', n_test)):
        for i in range(n):
            image, label = _case(rng)
            Image.fromarray(image).save(os.path.join(folder, f'images{split}', f'case{split}{i:03d}_0000.png'))
            Image.fromarray(label).save(os.path.join(folder, f'labels{split}', f'case{split}{i:03d}.png'))
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'grey'}, 'labels': {'background': 0, 'disk': 1, 'square': 2},
                   'numTraining': n_train, 'file_ending': '.png'}, f)
    return folder


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
