"""The real nnU-Net console scripts, in subprocesses, on a tiny generated data set."""
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import SimpleITK as sitk
import timm
import torch

from helpers import TESTS
from benchmarks.source_tree import code_block, readme_section
from nnunet_emcad.command.scripts import nnunet_env
from tiny_data import assert_onnx_matches_pytorch, copy_planned, export_trained_fold, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope='session')
def planned(tmp_path_factory, tiny_planned):
    """Dataset901_Tiny, planned and preprocessed for 2d, in nnU-Net folders of this module's own."""
    root = str(tmp_path_factory.mktemp('nnunet'))
    env = nnunet_env(root, package_settings=False)  # none of the developer's nnU-Net or nnunet-emcad settings
    copy_planned(tiny_planned, env)
    return root, env, os.path.join(root, 'log.txt')


SMOKE_FOLD = ('Dataset901_Tiny', 'nnUNetTrainerEMCAD_smoke__nnUNetPlans__2d', 'fold_0')


@pytest.fixture(scope='session')
def trained(planned):
    """nnUNetTrainerEMCAD_smoke's fold 0, trained once by ``nnUNetv2_train`` (with ``--npz``); tests that only
    read a trained fold (prediction, ``--val``, ONNX, model selection) share it, in one xdist worker (their group
    ``trained_fold``). Returns the fold's folder."""
    root, env, log = planned
    assert 'nnUNet_extTrainer' not in env
    run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainerEMCAD_smoke', '-device', 'cpu', '--npz'], env, log)
    return os.path.join(env['nnUNet_results'], *SMOKE_FOLD)


@pytest.fixture(scope='session')
def predicted(planned, trained):
    """``nnUNetv2_predict`` of the trained fold on the test images (eagerly); returns the output folder."""
    root, env, log = planned
    out = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny', 'imagesTs'), '-o', out, '-d',
         '901', '-c', '2d', '-f', '0', '-tr', 'nnUNetTrainerEMCAD_smoke', '-device', 'cpu', '-npp', '1', '-nps', '1'],
        env, log)
    return out


def _dice(summary_file: str) -> dict:
    with open(summary_file) as f:
        summary = json.load(f)
    return {label: metrics['Dice'] for label, metrics in summary['mean'].items()}


@pytest.mark.xdist_group('trained_fold')
def test_train_predict_evaluate_with_stock_commands(planned, trained, predicted):
    root, env, log = planned
    assert os.path.isfile(os.path.join(trained, 'checkpoint_final.pth'))
    assert os.path.isfile(os.path.join(trained, 'validation', 'summary.json'))
    raw = os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny')
    out = predicted
    assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == ['caseTs000.png', 'caseTs001.png',
                                                                         'caseTs002.png']
    run(['nnUNetv2_evaluate_folder', os.path.join(raw, 'labelsTs'), out, '-djfile',
         os.path.join(out, 'dataset.json'), '-pfile', os.path.join(out, 'plans.json')], env, log)
    dice = _dice(os.path.join(out, 'summary.json'))
    assert dice['1'] > 0.8 and dice['2'] > 0.7, dice  # an untrained network scores near 0 on both


@pytest.mark.xdist_group('trained_fold')
def test_compiled_prediction_on_a_cpu_runs_as_the_readme_writes_it_and_writes_the_eager_segmentations(planned,
                                                                                                   predicted):
    # nnU-Net compiles the network (torch.compile, inductor) when nnUNet_compile is set
    root, env, log = planned
    raw = os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny')
    eager, compiled = predicted, os.path.join(root, 'predictions_compiled')
    setting, *command = shlex.split(code_block(readme_section('### Predicting on a CPU'), 'bash'))
    variable, value = setting.split('=')
    assert variable == 'nnUNet_compile' and command[0] == 'nnUNetv2_predict'
    ours = {'IN': os.path.join(raw, 'imagesTs'), 'OUT': compiled, '27': '901',
            'nnUNetTrainerEMCAD': 'nnUNetTrainerEMCAD_smoke'}
    output = run([ours.get(word, word) for word in command], dict(env, **{variable: value}), log)
    assert 'Using torch.compile' in output
    for case in ('caseTs000.png', 'caseTs001.png', 'caseTs002.png'):
        want, got = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, case))) for folder in (eager, compiled))
        assert (got == want).mean() > 0.999, case  # float rounding may flip a boundary pixel, no more


@pytest.mark.xdist_group('trained_fold')
def test_onnx_export_of_the_trained_fold_matches_pytorch(planned, trained, tmp_path):
    import numpy as np

    root, env, log = planned
    onnx_file = str(tmp_path / 'emcad.onnx')
    out, facts, predictor = export_trained_fold(env, log, 'Dataset901_Tiny', '2d', 'nnUNetTrainerEMCAD_smoke',
                                                onnx_file)
    assert re.search(r'max abs difference \d\.\d+e-\d+', out), out
    assert facts['patch_size'] == list(predictor.configuration_manager.patch_size)
    assert facts['labels'] == {'background': 0, 'disk': 1, 'square': 2}
    assert facts['normalization_schemes'] == ['ZScoreNormalization'] and facts['spacing'] == [1.0, 1.0]
    expected = assert_onnx_matches_pytorch(onnx_file, predictor.network, [1, *facts['patch_size']], [1, 4], 1e-4)
    assert float(np.abs(expected).max()) > 1.0  # a trained network, not an all-zero one


def test_pvt_trainer_with_imagenet_weights_from_a_local_file_and_its_c_and_val_without_them(planned, tmp_path):
    root, env, log = planned
    weights = tmp_path / 'pvt_v2_b0.pth'
    torch.save(timm.create_model('pvt_v2_b0').state_dict(), weights)
    env = dict(env, nnUNet_EMCAD_PVT_WEIGHTS=str(tmp_path))
    out = run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainerEMCAD_PVTb0_smoke', '-device', 'cpu'],
              env, log)
    assert f'loaded ImageNet pvt_v2_b0 weights from {weights}' in out
    fold = os.path.join(env['nnUNet_results'], 'Dataset901_Tiny',
                        'nnUNetTrainerEMCAD_PVTb0_smoke__nnUNetPlans__2d', 'fold_0')
    # 4 smoke epochs at the PVT trainers' learning rate (1e-4) leave it far from converged, and where it ends varies
    # with the random data order (0.28-0.65 in seven runs); a network that marks every pixel as disk scores 0.14 at most,
    # one that marks none 0
    trained = _dice(os.path.join(fold, 'validation', 'summary.json'))
    assert trained['1'] > 0.15, trained
    # --c and --val load the trained checkpoint: they need neither the weights file, now gone, nor the hub; --val
    # validates the fold again (its summary, removed, comes back)
    weights.unlink()
    out = run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainerEMCAD_PVTb0_smoke', '-device', 'cpu', '--c'],
              env, log)
    assert 'loaded ImageNet' not in out
    offline = dict(env, nnUNet_EMCAD_PVT_WEIGHTS='timm', HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'empty_cache'))
    os.remove(os.path.join(fold, 'validation', 'summary.json'))
    out = run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainerEMCAD_PVTb0_smoke', '-device', 'cpu', '--val'],
              offline, log)
    # the same network as at the end of training: the same scores
    assert 'loaded ImageNet' not in out
    assert _dice(os.path.join(fold, 'validation', 'summary.json')) == pytest.approx(trained, abs=1e-6)


@pytest.mark.xdist_group('trained_fold')
def test_cross_validation_model_selection_and_ensembling_with_stock_nnunet(planned, trained):
    """Model selection between EMCAD and stock nnU-Net on fold 0 (nnU-Net's choice works the same on one fold as on
    five), prediction with several folds of EMCAD (a copy of the trained fold stands for fold 1: nnU-Net loads each
    fold's checkpoint into the one network), and the ensemble of the two trainers' predictions."""
    root, env, log = planned
    env = dict(env, nnUNet_extTrainer=os.path.join(TESTS, 'ext_trainers'))  # stock nnUNetTrainer_smoke
    run(['nnUNetv2_train', '901', '2d', '0', '-tr', 'nnUNetTrainer_smoke', '-device', 'cpu', '--npz'], env, log)
    fold_1 = os.path.join(os.path.dirname(trained), 'fold_1')
    os.makedirs(fold_1, exist_ok=True)
    shutil.copy(os.path.join(trained, 'checkpoint_final.pth'), fold_1)
    run(['nnUNetv2_find_best_configuration', '901', '-c', '2d', '-tr', 'nnUNetTrainer_smoke',
         'nnUNetTrainerEMCAD_smoke', '-f', '0', '-np', '2'], env, log)
    results = os.path.join(env['nnUNet_results'], 'Dataset901_Tiny')
    with open(os.path.join(results, 'inference_information.json')) as f:
        info = json.load(f)
    evaluated = set(info['all_results'])
    assert any('nnUNetTrainerEMCAD_smoke' in k and 'ensemble' not in k for k in evaluated)
    assert any('nnUNetTrainer_smoke' in k and 'ensemble' not in k for k in evaluated)
    assert any(k.startswith('ensemble') for k in evaluated), evaluated
    assert os.path.isfile(os.path.join(results, 'inference_instructions.txt'))

    raw = os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny')
    predictions = []
    for trainer, folds in (('nnUNetTrainerEMCAD_smoke', ['0', '1']), ('nnUNetTrainer_smoke', ['0'])):
        out = os.path.join(root, f'ts_{trainer}')
        run(['nnUNetv2_predict', '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', '901', '-c', '2d',
             '-f', *folds, '-tr', trainer, '-device', 'cpu', '-npp', '1', '-nps', '1', '--save_probabilities'],
            env, log)
        predictions.append(out)
    ensemble = os.path.join(root, 'ts_ensemble')
    run(['nnUNetv2_ensemble', '-i', *predictions, '-o', ensemble, '-np', '2'], env, log)
    assert len(glob.glob(os.path.join(ensemble, '*.png'))) == 3
    run(['nnUNetv2_evaluate_folder', os.path.join(raw, 'labelsTs'), ensemble, '-djfile',
         os.path.join(predictions[0], 'dataset.json'), '-pfile', os.path.join(predictions[0], 'plans.json')],
        env, log)
    dice = _dice(os.path.join(ensemble, 'summary.json'))
    assert dice['1'] > 0.8, dice


def _digest(paths) -> dict:
    out = {}
    for path in paths:
        with open(path, 'rb') as f:
            out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_killed_training_resumes_with_c_and_damages_nothing(planned):
    root, env, log = planned
    env = dict(env, nnUNet_extTrainer=os.path.join(TESTS, 'ext_trainers'))  # the user's own folder, kept
    preprocessed = os.path.join(env['nnUNet_preprocessed'], 'Dataset901_Tiny')
    results = os.path.join(env['nnUNet_results'], 'Dataset901_Tiny')
    earlier = [p for p in glob.glob(os.path.join(preprocessed, '**', '*'), recursive=True) if os.path.isfile(p)]
    earlier += [p for p in glob.glob(os.path.join(results, '**', '*'), recursive=True)
                if os.path.isfile(p) and 'resumable' not in p]
    before = _digest(earlier)
    fold = os.path.join(results, 'nnUNetTrainerEMCAD_resumable__nnUNetPlans__2d', 'fold_2')
    args = ['nnUNetv2_train', '901', '2d', '2', '-tr', 'nnUNetTrainerEMCAD_resumable', '-device', 'cpu']
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            logs = glob.glob(os.path.join(fold, 'training_log_*.txt'))
            if logs and re.search(r': Epoch 3\s*$', open(logs[0]).read(), re.M):
                time.sleep(1.0)  # into epoch 3: checkpoint_latest holds epochs 0-2
                break
            time.sleep(0.2)
        assert proc.poll() is None, 'training ended before it could be interrupted'
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.isfile(os.path.join(fold, 'checkpoint_final.pth'))
    # the epoch to go on from, as the checkpoint left by the kill holds it (3, or 4 where the kill came after the
    # checkpoint of epoch 3)
    holds = torch.load(os.path.join(fold, 'checkpoint_latest.pth'), map_location='cpu',
                       weights_only=False)['current_epoch']
    assert holds >= 3
    out = run(args + ['--c'], env, log)
    assert os.path.isfile(os.path.join(fold, 'checkpoint_final.pth'))
    resumed = sorted(glob.glob(os.path.join(fold, 'training_log_*.txt')))[-1]
    epochs = [int(e) for e in re.findall(r': Epoch (\d+)\s*$', open(resumed).read(), re.M)]
    assert epochs == list(range(holds, 6)), (holds, epochs)
    assert 'Using trainer' in out and _dice(os.path.join(fold, 'validation', 'summary.json'))['1'] > 0.3
    assert _digest(earlier) == before

