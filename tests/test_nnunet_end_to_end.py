"""The real nnU-Net console scripts, in subprocesses, on a tiny generated data set."""
import json
import os

import pytest

from tiny_data import make_dataset, nnunet_env, run

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def planned(tmp_path_factory):
    """Dataset901_Tiny, planned and preprocessed for 2d."""
    root = str(tmp_path_factory.mktemp('nnunet'))
    env = nnunet_env(root)
    make_dataset(env['nnUNet_raw'])
    log = os.path.join(root, 'log.txt')
    run(['nnUNetv2_plan_and_preprocess', '-d', '901', '-c', '2d', '-np', '2', '--verify_dataset_integrity'],
        env, log)
    return root, env, log


def _dice(summary_file: str) -> dict:
    with open(summary_file) as f:
        summary = json.load(f)
    return {label: metrics['Dice'] for label, metrics in summary['mean'].items()}


def test_train_predict_evaluate_with_stock_commands(planned):
    root, env, log = planned
    assert 'nnUNet_extTrainer' not in env
    run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainerEMCAD_smoke', '-device', 'cpu'], env, log)
    fold = os.path.join(env['nnUNet_results'], 'Dataset901_Tiny', 'nnUNetTrainerEMCAD_smoke__nnUNetPlans__2d',
                        'fold_0')
    assert os.path.isfile(os.path.join(fold, 'checkpoint_final.pth'))
    assert os.path.isfile(os.path.join(fold, 'validation', 'summary.json'))
    raw = os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny')
    out = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', '901', '-c', '2d', '-f', '0',
         '-tr', 'nnUNetTrainerEMCAD_smoke', '-device', 'cpu', '-npp', '1', '-nps', '1'], env, log)
    assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == ['caseTs000.png', 'caseTs001.png',
                                                                         'caseTs002.png']
    run(['nnUNetv2_evaluate_folder', os.path.join(raw, 'labelsTs'), out, '-djfile',
         os.path.join(out, 'dataset.json'), '-pfile', os.path.join(out, 'plans.json')], env, log)
    dice = _dice(os.path.join(out, 'summary.json'))
    assert dice['1'] > 0.8 and dice['2'] > 0.7, dice  # an untrained network scores near 0 on both
