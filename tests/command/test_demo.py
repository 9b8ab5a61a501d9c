"""The demo's fast path end to end (the real nnU-Net commands), its data preparation and the CLI."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks.source_tree import SOURCE_ROOT
from nnunet_emcad.command import cli, paths
from nnunet_emcad.command.demo import prepare_data

BIN = os.path.dirname(sys.executable)


@pytest.mark.slow
def test_demo_fast_path_trains_predicts_evaluates_and_draws(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}  # the demo sets its own folders
    env.update(nnUNet_def_n_proc='2', nnUNet_n_proc_DA='2', OMP_NUM_THREADS='2')
    workdir = tmp_path / 'demo'
    proc = subprocess.run([os.path.join(BIN, 'nnunet-emcad'), 'demo', '--data', 'synthetic', '--fast',
                           '--workdir', str(workdir)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    lines = out.strip().splitlines()
    assert len(lines) <= 20, out
    for n in range(1, 6):
        assert f'[{n}/5' in out
    assert 'epoch 1/2: train loss' in out and 'epoch 2/2: train loss' in out
    for epoch, done in ((1, 2), (2, 7)):  # half-way through each epoch: iterations done and time left
        assert re.search(rf'epoch {epoch}/2: iteration 2/5 \({done}/10 of the training\), about \d+ s to go', out), out
    curves = workdir / 'nnUNet_results' / 'Dataset993_Synthetic' / 'nnUNetTrainerEMCAD_PVTb0_demo__nnUNetPlans__2d' \
        / 'fold_0' / 'progress.png'
    assert f"training curves (nnU-Net's own): {curves}" in out and curves.is_file()
    assert 'Pseudo dice' not in out and '#######' not in out, "nnU-Net's own output belongs in the logs"
    with open(workdir / 'predictions' / 'summary.json') as f:
        summary = json.load(f)
    dice_line = next(line for line in lines if line.startswith('test Dice:'))
    assert f"disk {summary['mean']['1']['Dice']:.3f}" in dice_line
    assert f"mean {summary['foreground_mean']['Dice']:.3f}" in dice_line
    with Image.open(workdir / 'overlays.png') as png:
        assert png.width > 300 and png.height > 4 * 150
    with open(workdir / 'logs' / 'train.log') as f:
        train_log = f.read()
    assert 'nnUNetTrainerEMCAD_PVTb0_demo' in train_log and 'Epoch 1' in train_log
    assert sorted(os.listdir(workdir / 'predictions')) == sorted(
        [f'caseTs{i:03d}.png' for i in range(4)] + ['dataset.json', 'plans.json', 'predict_from_raw_data_args.json',
                                                    'summary.json'])


def test_acdc_subset_keeps_test_patients_out_of_training(tmp_path, shared_file):
    acdc = shared_file('data/Dataset027_ACDC')
    facts = prepare_data('acdc', str(tmp_path / 'raw'), str(tmp_path / 'pre'), str(tmp_path / 'cache'), print)
    folder = facts['folder']
    patients = {split: {f.split('_')[0] for f in os.listdir(os.path.join(folder, f'labels{split}'))}
                for split in ('Tr', 'Ts')}
    assert len(patients['Tr']) == 12 and len(patients['Ts']) == 4 and not patients['Tr'] & patients['Ts']
    with open(os.path.join(tmp_path, 'pre', os.path.basename(folder), 'splits_final.json')) as f:
        split = json.load(f)
    assert len(split) == 1 and len(split[0]['train']) == 20 and len(split[0]['val']) == 4
    assert {c.split('_')[0] for c in split[0]['train']}.isdisjoint({c.split('_')[0] for c in split[0]['val']})
    with open(os.path.join(folder, 'dataset.json')) as f:
        assert json.load(f)['numTraining'] == 24
    assert os.path.realpath(os.path.join(folder, 'imagesTr', f"{sorted(patients['Tr'])[0]}_frame01_0000.nii.gz"))\
        .startswith(os.path.realpath(acdc))


def test_without_acdc_the_demo_names_the_variable_that_points_it_there(tmp_path, monkeypatch):
    from nnunet_emcad.command import demo

    def no_pypi(cache: str) -> str:
        raise RuntimeError('PyPI unreachable')

    monkeypatch.setenv('NNUNET_EMCAD_SHARED_DATA', str(tmp_path / 'empty'))
    (tmp_path / 'empty').mkdir()
    monkeypatch.setattr(demo, 'fetch_pycerr_dicom', no_pypi)
    said = []
    facts = prepare_data('auto', str(tmp_path / 'raw'), str(tmp_path / 'pre'), str(tmp_path / 'cache'), said.append)
    assert facts['kind'] == 'synthetic'
    assert f"no Dataset027_ACDC in {tmp_path / 'empty'}: point NNUNET_EMCAD_SHARED_DATA at the folder" in said[0]
    with pytest.raises(SystemExit, match='point NNUNET_EMCAD_SHARED_DATA at the folder that holds Dataset027_ACDC'):
        prepare_data('acdc', str(tmp_path / 'raw'), str(tmp_path / 'pre'), str(tmp_path / 'cache'), said.append)
    proc = subprocess.run([os.path.join(BIN, 'nnunet-emcad'), 'demo', '--help'], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and 'NNUNET_EMCAD_SHARED_DATA' in proc.stdout


def test_every_subcommand_explains_itself(capsys):
    for command in ('demo', 'info', 'paper', 'convert-official', 'export-onnx', 'benchmark'):
        try:
            cli.main([command, '--help'])
        except SystemExit as e:
            assert e.code == 0
        assert 'usage: nnunet-emcad ' + command in capsys.readouterr().out


def test_the_benchmark_command_runs_the_checkouts_script_and_from_a_wheel_says_where_the_benchmarks_live(
        tmp_path, monkeypatch, capsys):
    proc = subprocess.run([os.path.join(BIN, 'nnunet-emcad'), 'benchmark', 'update_docs', '--help'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'usage: update_docs.py' in proc.stdout, proc.stderr
    monkeypatch.setattr(paths, 'CHECKOUT', str(tmp_path))  # installed from a wheel: site-packages holds no benchmarks
    assert cli.main(['benchmark', 'cost']) == 2
    assert 'the benchmarks live in the source checkout' in capsys.readouterr().err


def test_info_names_trainer_registration_and_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    monkeypatch.delenv('nnUNet_raw', raising=False)
    assert cli.main(['info']) == 0
    out = capsys.readouterr().out
    assert f'nnUNet_results: {tmp_path} (writable)' in out and 'nnUNet_raw:  (unset)' in out
    assert 'nnUNetTrainerEMCAD: found by nnU-Net' in out


def test_info_lists_the_trained_models_with_their_folds(tmp_path, monkeypatch, capsys):
    model = tmp_path / 'Dataset027_ACDC' / 'nnUNetTrainerEMCAD__nnUNetPlans__2d'
    for fold, trained in ((0, True), (1, False), (3, True)):
        (model / f'fold_{fold}').mkdir(parents=True)
        if trained:
            (model / f'fold_{fold}' / 'checkpoint_final.pth').write_bytes(b'')
    (tmp_path / 'Dataset027_ACDC' / 'nnUNetTrainer__nnUNetPlans__2d' / 'fold_0').mkdir(parents=True)  # stopped
    (tmp_path / 'Dataset027_ACDC' / 'notes.txt').write_text('')  # not a model
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    assert cli.main(['info']) == 0
    out = capsys.readouterr().out
    assert 'trained in nnUNet_results (-d, -tr, -p, -c for nnUNetv2_predict):\n' \
           '  Dataset027_ACDC/nnUNetTrainerEMCAD__nnUNetPlans__2d (folds 0, 3)\n' in out
    assert 'nnUNetTrainer__' not in out


def test_info_names_the_nearest_emcad_trainers_for_a_misspelt_name():
    proc = subprocess.run([os.path.join(BIN, 'nnunet-emcad'), 'info', '--trainer', 'nnUNetTrainerEMCAD_Stride2Narow'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'nnUNetTrainerEMCAD_Stride2Narow: no trainer of that name; nearest EMCAD trainers: ' \
           'nnUNetTrainerEMCAD_Stride2Narrow, ' in proc.stdout


def test_help_and_info_open_with_their_own_words_not_warnings(tmp_path):
    """The console script as a user runs it: without pytest's warning filters (pytest.ini hides torch's)."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONWARNINGS', 'nnUNet_results')}
    script = os.path.join(BIN, 'nnunet-emcad')
    help_text = subprocess.run([script, '--help'], env=env, capture_output=True, text=True, timeout=120).stdout
    description = help_text.split('\n\n')[1]
    assert description.startswith('EMCAD (CVPR 2024)')
    assert '-tr nnUNetTrainerEMCAD' in ' '.join(description.split()) and '``' not in help_text
    info = subprocess.run([script, 'info'], env=env, capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and info.stderr == '', info.stderr
    assert info.stdout.startswith('python ') and 'nnUNet_results:  (unset)' in info.stdout


def test_the_demos_default_folder_is_ignored_by_git():
    with open(os.path.join(SOURCE_ROOT, '.gitignore')) as f:
        assert 'nnunet_emcad_demo/' in f.read().split()
