"""Every row of the README's troubleshooting table, provoked through the command the row names (a process of its
own, started warm: ``warm_commands``; a row met in Python, in this process), and the row's message found in what
that command prints. Failed starts leave nothing behind."""
import json
import os
import re
import sys
import traceback

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from helpers import TESTS, official_state_dict
from benchmarks.source_tree import readme_text
import nnunet_emcad
from nnunet_emcad.command.scripts import nnunet_env
from nnunet_emcad.model.emcad import create_emcad_pvt
from nnunet_emcad.nnunet import trainers as T
from nnunet_emcad.nnunet.plans import create_emcad_unet
import warm_commands
from tiny_data import copy_planned
from tiny_plans import ACDC_2D_ARCH, DATASET_JSON, make_plans

BIN = os.path.dirname(sys.executable)
PLANNED = 'Dataset999_Plans'  # the data set name make_plans writes
DAMAGED = bytes([0xff]) * 4096  # bytes that are no checkpoint (a disk error, a wrong file)
RAN = []  # the console scripts the current test ran


def readme_rows() -> list:
    """(message, command) of each row of the README's troubleshooting table."""
    table = readme_text().split('## Troubleshooting', 1)[1].split('\n\n| you see', 1)[1].split('\n\n', 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip('|').split(' | ')]
        rows.append((re.match(r'`([^`]+)`', cells[0]).group(1), cells[1]))
    return rows


def as_pattern(message: str) -> str:
    """The README's message as a regular expression: ``...`` stands for anything, a space for any white space."""
    return '.*?'.join(re.escape(part).replace('\\ ', r'\s+') for part in re.split(r'\s*\.\.\.\s*', message))


def command(args, env, cwd=None) -> str:
    """Run a console script (or Python) as a user would; returns stdout and stderr together (it must fail)."""
    RAN.append(os.path.basename(args[0]))
    proc = warm_commands.run(args, env, cwd=cwd)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout


@pytest.fixture(scope='session')
def folders(tmp_path_factory, tiny_planned):
    """nnU-Net's folders with Dataset999_Plans planned by hand (2d and 3d_fullres) and Dataset901_Tiny planned
    and preprocessed by nnU-Net; the environment a user's shell would have for them."""
    root = tmp_path_factory.mktemp('troubleshooting')
    env = nnunet_env(str(root), package_settings=False)
    planned = os.path.join(env['nnUNet_preprocessed'], PLANNED)
    os.makedirs(planned)
    with open(os.path.join(planned, 'nnUNetPlans.json'), 'w') as f:
        json.dump(make_plans(5, [64, 64], extra_3d=True), f)
    with open(os.path.join(planned, 'dataset.json'), 'w') as f:
        json.dump(DATASET_JSON, f)
    copy_planned(tiny_planned, env)
    return root, env


def _train(env, trainer, configuration='2d', *extra, dataset=PLANNED) -> str:
    return command(['nnUNetv2_train', dataset, configuration, '0', '-tr', trainer, '-device', 'cpu', *extra], env)


def _nothing_written(env) -> None:
    assert not os.path.exists(os.path.join(env['nnUNet_results'], PLANNED)), 'a failed start left files behind'


def _model_folder(env, trainer: str, checkpoint: bytes = None) -> str:
    """A results folder as nnUNetv2_train leaves it (plans, dataset.json, fold_0), with ``checkpoint``."""
    folder = os.path.join(env['nnUNet_results'], PLANNED, f'{trainer}__nnUNetPlans__2d')
    os.makedirs(os.path.join(folder, 'fold_0'), exist_ok=True)
    with open(os.path.join(folder, 'plans.json'), 'w') as f:
        json.dump(make_plans(5, [64, 64]), f)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dict(DATASET_JSON, file_ending='.png'), f)
    if checkpoint is not None:
        with open(os.path.join(folder, 'fold_0', 'checkpoint_final.pth'), 'wb') as f:
            f.write(checkpoint)
    return folder


def _predict(env, trainer: str) -> str:
    images = os.path.join(env['nnUNet_raw'], 'Dataset901_Tiny', 'imagesTs')
    return command(['nnUNetv2_predict', '-i', images, '-o', os.path.join(env['nnUNet_results'], 'out'), '-d',
                    PLANNED, '-c', '2d', '-f', '0', '-tr', trainer, '-device', 'cpu', '-npp', '1', '-nps', '1'],
                   env)


def _python(call) -> str:
    """A row met in Python (no command): ``call()`` in this process; what it raised, as Python prints it."""
    RAN.append('Python')
    with pytest.raises(Exception) as raised:
        call()
    return ''.join(traceback.format_exception(raised.value))


def two_d_trainer_on_3d(root, env, tmp):
    out = _train(env, 'nnUNetTrainerEMCAD', '3d_fullres')
    _nothing_written(env)
    return out


def three_d_trainer_on_2d(root, env, tmp):
    out = _train(env, 'nnUNetTrainerEMCAD3D', '2d')
    _nothing_written(env)
    return out


def results_unset(root, env, tmp):
    return _train({k: v for k, v in env.items() if k != 'nnUNet_results'}, 'nnUNetTrainerEMCAD')


def results_not_writable(root, env, tmp):
    (tmp / 'a_file').write_text('')  # no folder can be made under a file, not even by root
    return _train(dict(env, nnUNet_results=str(tmp / 'a_file' / 'results')), 'nnUNetTrainerEMCAD')


def preprocessed_unset(root, env, tmp):
    return _train({k: v for k, v in env.items() if k != 'nnUNet_preprocessed'}, 'nnUNetTrainerEMCAD')


def not_planned(root, env, tmp):
    return _train(dict(env, nnUNet_preprocessed=str(tmp)), 'nnUNetTrainerEMCAD')


def pvt_weights_missing(root, env, tmp):
    out = _train(dict(env, nnUNet_EMCAD_PVT_WEIGHTS=str(tmp)), 'nnUNetTrainerEMCAD_PVTb0')
    _nothing_written(env)
    return out


def pvt_weights_truncated(root, env, tmp):
    (tmp / 'pvt_v2_b0.pth').write_bytes(b'PK\x03\x04 cut short')
    return _train(dict(env, nnUNet_EMCAD_PVT_WEIGHTS=str(tmp)), 'nnUNetTrainerEMCAD_PVTb0', dataset='901')


def pvt_weights_of_another_model(root, env, tmp):
    torch.save(create_emcad_unet(ACDC_2D_ARCH, 1, 2).state_dict(), tmp / 'pvt_v2_b0.pth')
    return _train(dict(env, nnUNet_EMCAD_PVT_WEIGHTS=str(tmp)), 'nnUNetTrainerEMCAD_PVTb0', dataset='901')


def diverging(root, env, tmp):
    return _train(dict(env, nnUNet_extTrainer=os.path.join(TESTS, 'ext_trainers')), 'nnUNetTrainerEMCAD_diverging',
                  dataset='901')


def all_steps_skipped(root, env, tmp):
    return _train(dict(env, nnUNet_extTrainer=os.path.join(TESTS, 'ext_trainers')), 'nnUNetTrainerEMCAD_nonfinite',
                  dataset='901')


def damaged_checkpoint(root, env, tmp):
    _model_folder(env, 'nnUNetTrainerEMCAD', DAMAGED)
    trained = _train(env, 'nnUNetTrainerEMCAD', '2d', '--val')
    exported = command([os.path.join(BIN, 'nnunet-emcad'), 'export-onnx', '-d', PLANNED, '-tr', 'nnUNetTrainerEMCAD',
                        '-o', str(tmp / 'x.onnx')], env)
    for out in (trained, exported):
        assert 'is not a readable PyTorch checkpoint' in out and 'UnpicklingError' not in out, out
    return trained + exported


def export_untrained(root, env, tmp):
    return command([os.path.join(BIN, 'nnunet-emcad'), 'export-onnx', '-d', PLANNED,
                    '-tr', 'nnUNetTrainerEMCAD_5epochs', '-o', str(tmp / 'x.onnx')], env)


def _convert(env, tmp, channels: int, trainer: str) -> str:
    pre = tmp / 'pre' / 'Dataset998_Channels'
    pre.mkdir(parents=True)
    (pre / 'nnUNetPlans.json').write_text(json.dumps(make_plans(5, [64, 64])))
    (pre / 'dataset.json').write_text(json.dumps(dict(DATASET_JSON, channel_names={str(i): 'MRI'
                                                                                    for i in range(channels)})))
    torch.manual_seed(0)
    torch.save(official_state_dict(create_emcad_pvt('pvt_v2_b0', 9, 1)), tmp / 'emcad_b0_synapse.pth')
    return command([os.path.join(BIN, 'nnunet-emcad'), 'convert-official', str(tmp / 'emcad_b0_synapse.pth'),
                    '-d', 'Dataset998_Channels', '-tr', trainer, '-o', str(tmp / 'init.pth')],
                   dict(env, nnUNet_preprocessed=str(tmp / 'pre')))


def official_other_channels(root, env, tmp):
    return _convert(env, tmp, 2, 'nnUNetTrainerEMCAD_PVTb0')


def official_other_encoder(root, env, tmp):
    return _convert(env, tmp, 1, 'nnUNetTrainerEMCAD_PVTb2')


def _trained_as(trainer: str, trainer_class, tmp) -> bytes:
    """A checkpoint of ``trainer_class``'s network saved under ``trainer``'s name (from which nnU-Net's predictor
    builds the network)."""
    plans = PlansManager(make_plans(5, [64, 64]))
    weights = trainer_class.build_network_architecture(plans, plans.get_configuration('2d'), 1, 3).state_dict()
    checkpoint = tmp / 'checkpoint.pth'
    torch.save({'trainer_name': trainer, 'init_args': {'configuration': '2d'}, 'network_weights': weights},
               checkpoint)
    return checkpoint.read_bytes()


def stock_weights_in_emcad_folder(root, env, tmp):
    _model_folder(env, 'nnUNetTrainerEMCAD_smoke', _trained_as('nnUNetTrainerEMCAD_smoke', nnUNetTrainer, tmp))
    return _predict(env, 'nnUNetTrainerEMCAD_smoke')


def model_of_the_former_default(root, env, tmp):
    _model_folder(env, 'nnUNetTrainerEMCAD', _trained_as('nnUNetTrainerEMCAD', T.nnUNetTrainerEMCAD_Stride1, tmp))
    return _predict(env, 'nnUNetTrainerEMCAD')


def predict_untrained(root, env, tmp):
    return _predict(env, 'nnUNetTrainerEMCAD_PVTb2')


def predict_damaged(root, env, tmp):
    _model_folder(env, 'nnUNetTrainerEMCAD_PVTb0_smoke', DAMAGED)
    return _predict(env, 'nnUNetTrainerEMCAD_PVTb0_smoke')


def predict_truncated(root, env, tmp):
    # checkpoint-sized (a file under 64 KiB truncated fails earlier, with an OSError, as the reader seeks back
    # for the zip directory)
    torch.save({'network_weights': {'weight': torch.randn(1_000_000)}}, tmp / 'whole.pth')
    whole = (tmp / 'whole.pth').read_bytes()
    _model_folder(env, 'nnUNetTrainerEMCAD_PVTb0_smoke', whole[:len(whole) // 2])
    return _predict(env, 'nnUNetTrainerEMCAD_PVTb0_smoke')


def misspelt_trainer(root, env, tmp):
    return _train(env, 'nnUNetTrainerEMCAD_Stride2Narow')


def pvt_odd_size(root, env, tmp):
    return _python(lambda: nnunet_emcad.create_emcad_pvt('pvt_v2_b0', 3, 1)(torch.zeros(1, 1, 50, 50)))


def pvt_unknown_variant(root, env, tmp):
    return _python(lambda: nnunet_emcad.create_emcad_pvt('pvt_v2_b9', 3, 1))


def official_without_backbone(root, env, tmp):
    state = {k: v for k, v in official_state_dict(create_emcad_pvt('pvt_v2_b2', 9, 1)).items()
             if not k.startswith('backbone.')}
    torch.save(state, tmp / 'decoder_only.pth')
    return _python(lambda: nnunet_emcad.load_official_checkpoint(str(tmp / 'decoder_only.pth')))


# a distinctive part of each README row's message -> how a user meets it
SCENARIOS = {
    'nnUNetTrainerEMCAD is a 2D trainer': two_d_trainer_on_3d,
    'nnUNetTrainerEMCAD3D is a 3D trainer': three_d_trainer_on_2d,
    'nnUNet_results is not set': results_unset,
    'is not writable': results_not_writable,
    'nnUNet_preprocessed is not defined': preprocessed_unset,
    'Could not find requested nnunet trainer': misspelt_trainer,
    "nnUNetPlans.json'": not_planned,
    'nnUNet_EMCAD_PVT_WEIGHTS=': pvt_weights_missing,
    'cannot read weight file': pvt_weights_truncated,
    'the PVTv2 weights in': pvt_weights_of_another_model,
    'training loss became nan': diverging,
    'optimiser steps (epoch 1) were all skipped': all_steps_skipped,
    'is not a readable PyTorch checkpoint': damaged_checkpoint,
    'checkpoint_final.pth does not exist': export_untrained,
    'the checkpoint was trained on 1-channel': official_other_channels,
    "the checkpoint's encoder is pvt_v2_b0": official_other_encoder,
    'weights of a stock nnU-Net U-Net': stock_weights_in_emcad_folder,
    'with nnunet-emcad 0.1': model_of_the_former_default,
    "dataset.json'": predict_untrained,
    'UnpicklingError': predict_damaged,
    'PytorchStreamReader failed reading zip archive': predict_truncated,
    'PVTv2 encoders need spatial sizes': pvt_odd_size,
    'unknown PVTv2 encoder': pvt_unknown_variant,
    'the checkpoint has no backbone keys': official_without_backbone,
}


def _scenario_of(message: str) -> str:
    keys = [k for k in SCENARIOS if k in message]
    assert len(keys) <= 1, f"{message!r} fits the scenarios {keys}"
    return keys[0] if keys else message


def test_every_row_of_the_table_has_a_scenario():
    assert sorted(_scenario_of(message) for message, _ in readme_rows()) == sorted(SCENARIOS)


@pytest.mark.slow
@pytest.mark.parametrize('message,where', readme_rows(), ids=lambda v: v[:40])
def test_the_readme_message_comes_out_of_the_command_it_names(folders, tmp_path, message, where):
    root, env = folders
    env = dict(env, nnUNet_results=str(tmp_path / 'results'))
    RAN.clear()
    out = SCENARIOS[_scenario_of(message)](root, env, tmp_path)
    assert re.search(as_pattern(message), out, re.S), f"README promises {message!r}; {where} printed:\n{out[-3000:]}"
    named = {name.split()[0] for name in re.findall(r'`([^`]+)`', where)
             if name.startswith(('nnUNetv2_', 'nnunet-emcad'))} | ({'Python'} if where.startswith('Python') else set())
    assert named and named <= set(RAN), f"the row names {named}, the test ran {RAN}"
