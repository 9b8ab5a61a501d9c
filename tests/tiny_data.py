"""A tiny, easy 2D segmentation data set in nnU-Net raw format, and running nnU-Net's console scripts."""
import os
import shutil
import time
from typing import Dict, List, Tuple

import warm_commands
from nnunet_emcad.command import scripts
from nnunet_emcad.command.demo_data import make_synthetic_dataset


def make_dataset(raw: str, dataset_id: int = 901, n_train: int = 10, n_test: int = 3, seed: int = 0) -> str:
    """Write Dataset{id}_Tiny (png, 64x64, 3 classes) under ``raw``; returns its folder."""
    return make_synthetic_dataset(raw, dataset_id, n_train, n_test, seed)


def plan_tiny_dataset(root: str) -> str:
    """Dataset901_Tiny generated under ``root`` and planned and preprocessed for 2d by nnU-Net (with its
    integrity check), in the folders ``scripts.nnunet_env(root)`` names; returns ``root``."""
    env = scripts.nnunet_env(root, package_settings=False)
    make_dataset(env['nnUNet_raw'])
    run(scripts.plan_command('901', '2d', env, '--verify_dataset_integrity'), env, os.path.join(root, 'log.txt'))
    return root


def plan_tiny_3d_dataset(root: str) -> str:
    """Dataset902_Tiny3D generated under ``root`` and planned and preprocessed for 3d_fullres by nnU-Net, in the
    folders ``scripts.nnunet_env(root)`` names; returns ``root``."""
    env = scripts.nnunet_env(root, package_settings=False, configuration='3d_fullres')
    make_3d_dataset(env['nnUNet_raw'])
    run(scripts.plan_command('902', '3d_fullres', env), env, os.path.join(root, 'log.txt'))
    return root


def copy_planned(source_root: str, env: Dict[str, str]) -> None:
    """The raw and preprocessed folders of ``plan_tiny_dataset(source_root)`` (or ``plan_tiny_3d_dataset``)
    copied into ``env``'s nnU-Net folders, so that a test writes into copies of its own."""
    source = scripts.nnunet_env(source_root, package_settings=False)
    for folder in ('nnUNet_raw', 'nnUNet_preprocessed'):
        shutil.copytree(source[folder], env[folder], dirs_exist_ok=True)


def run(args: List[str], env: Dict[str, str], log: str, timeout: float = 900) -> str:
    """Run one console script (started warm: ``warm_commands``) with its output appended to ``log`` as
    ``scripts.run_logged`` writes it; returns its output, raises ``scripts.CommandFailed`` where it fails."""
    start = time.perf_counter()
    proc = warm_commands.run(args, env, timeout=timeout)
    code, output = proc.returncode, proc.stdout
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(args)}\n{output}# {time.perf_counter() - start:.1f} s, exit {code}\n")
    if code:
        tail = ''.join(output.splitlines(True)[-40:])
        raise scripts.CommandFailed(f"{' '.join(args)} failed (exit {code}); the end of {log}:\n{tail}")
    return output


def make_3d_dataset(raw: str, dataset_id: int = 902, n_train: int = 10, n_test: int = 2, seed: int = 0,
                    shape=(8, 32, 32), spacing=(3.0, 1.0, 1.0)) -> str:
    """Write Dataset{id}_Tiny3D: thick-slice volumes (nii.gz) with a bright ball (1) and a dark box (2)."""
    import json

    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder = os.path.join(raw, f'Dataset{dataset_id}_Tiny3D')
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    zz, yy, xx = np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing='ij')
    for split, n in (('Tr', n_train), ('Ts', n_test)):
        for i in range(n):
            image = rng.normal(0.0, 0.15, shape)
            label = np.zeros(shape, np.uint8)
            centre = [rng.uniform(8, s * sp - 8) for s, sp in zip(shape, spacing)]
            ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= rng.uniform(5, 7) ** 2
            corner = [rng.integers(0, s - w) for s, w in zip(shape, (3, 10, 10))]
            box = np.zeros(shape, bool)
            box[corner[0]:corner[0] + 3, corner[1]:corner[1] + 10, corner[2]:corner[2] + 10] = True
            box &= ~ball
            image[ball] += 1.0
            image[box] -= 1.0
            label[ball], label[box] = 1, 2
            for array, sub, name in ((image.astype(np.float32), 'images', f'case{split}{i:03d}_0000'),
                                     (label, 'labels', f'case{split}{i:03d}')):
                volume = sitk.GetImageFromArray(array)
                volume.SetSpacing(tuple(float(s) for s in spacing[::-1]))
                sitk.WriteImage(volume, os.path.join(folder, f'{sub}{split}', f'{name}.nii.gz'))
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'MRI'}, 'labels': {'background': 0, 'ball': 1, 'box': 2},
                   'numTraining': n_train, 'file_ending': '.nii.gz'}, f)
    return folder


def export_trained_fold(env: Dict[str, str], log: str, dataset: str, configuration: str, trainer: str,
                        onnx_file: str) -> Tuple[str, dict, object]:
    """``nnunet-emcad export-onnx`` of fold 0; returns its output, the facts file's content and nnU-Net's predictor."""
    import json

    from nnunet_emcad.nnunet.export import load_predictor

    out = run(['nnunet-emcad', 'export-onnx', '-d', dataset, '-c', configuration, '-f', '0', '-tr', trainer,
               '-o', onnx_file], env, log)
    with open(os.path.splitext(onnx_file)[0] + '.json') as f:
        facts = json.load(f)
    predictor = load_predictor(os.path.join(env['nnUNet_results'], dataset,
                                                  f'{trainer}__nnUNetPlans__{configuration}'), '0')
    return out, facts, predictor


def assert_onnx_matches_pytorch(onnx_file: str, network, input_shape: List[int], batches: List[int],
                                tolerance: float):
    """onnxruntime and PyTorch agree on random inputs of each batch size (the batch axis is dynamic), within
    ``tolerance`` relative to the largest logit: float32 rounding grows with the scale of the activations, and
    a trained network's logits on noise are far larger than 1."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(onnx_file)
    for batch in batches:
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run(['logits'], {'image': x.numpy()})[0]
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, atol=tolerance * scale, rtol=tolerance)
    return expected
