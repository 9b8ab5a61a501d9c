"""3D EMCAD through the real nnU-Net commands on tiny generated thick-slice volumes, and its ONNX export."""
import json
import os

import pytest

from nnunet_emcad.command.scripts import nnunet_env
from tiny_data import assert_onnx_matches_pytorch, copy_planned, export_trained_fold, run


@pytest.mark.slow
def test_3d_fullres_train_predict_evaluate_and_export(tiny_planned_3d, tmp_path):
    root = str(tmp_path)
    # none of the developer's nnU-Net or nnunet-emcad settings
    env = nnunet_env(root, package_settings=False, configuration='3d_fullres')
    copy_planned(tiny_planned_3d, env)
    log = os.path.join(root, 'log.txt')
    with open(os.path.join(env['nnUNet_preprocessed'], 'Dataset902_Tiny3D', 'nnUNetPlans.json')) as f:
        arch = json.load(f)['configurations']['3d_fullres']['architecture']['arch_kwargs']
    assert [1, 3, 3] in arch['kernel_sizes'], arch['kernel_sizes']  # nnU-Net planned it anisotropic
    trainer = 'nnUNetTrainerEMCAD3D_smoke'
    run(['nnUNetv2_train', '902', '3d_fullres', '0', '-tr', trainer, '-device', 'cpu'], env, log)
    raw = os.path.join(env['nnUNet_raw'], 'Dataset902_Tiny3D')
    out = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', '902', '-c', '3d_fullres',
         '-f', '0', '-tr', trainer, '-device', 'cpu', '-npp', '1', '-nps', '1'], env, log)
    run(['nnUNetv2_evaluate_folder', os.path.join(raw, 'labelsTs'), out, '-djfile',
         os.path.join(out, 'dataset.json'), '-pfile', os.path.join(out, 'plans.json')], env, log)
    with open(os.path.join(out, 'summary.json')) as f:
        dice = {k: v['Dice'] for k, v in json.load(f)['mean'].items()}
    assert dice['1'] > 0.7 and dice['2'] > 0.5, dice  # an untrained network scores near 0

    onnx_file = os.path.join(root, 'emcad3d.onnx')
    stdout, facts, predictor = export_trained_fold(env, log, 'Dataset902_Tiny3D', '3d_fullres', trainer, onnx_file)
    assert 'max abs difference' in stdout
    assert facts['patch_size'] == list(predictor.configuration_manager.patch_size)
    assert facts['labels'] == {'background': 0, 'ball': 1, 'box': 2} and facts['max_abs_difference'] < 1e-3
    assert_onnx_matches_pytorch(onnx_file, predictor.network, [1, *facts['patch_size']], [2], 1e-3)
