"""EMCAD trainers under nnU-Net's DDP (``nnUNetv2_train ... -num_gpus 2``), as two processes over gloo on the CPU:
the gathered losses, the weights after a few steps and the gradients of two ranks on halves of a batch match one
process on the whole batch (``ddp_steps.py`` runs them)."""
import json
import os
import subprocess
import sys

import pytest

from nnunet_emcad.scripts import nnunet_env
from tiny_data import copy_planned

TESTS = os.path.dirname(os.path.abspath(__file__))
# the default (nothing recomputed) and the full-resolution decoder (its stages at strides 1-4 run again in backward)
TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1']


def ddp_steps(tiny_planned: str, root, *args: str) -> dict:
    """``ddp_steps.py`` on a copy of the tiny planned data set under ``root``; its summary. A rank left waiting
    for another would hang: the timeout ends it."""
    env = nnunet_env(str(root), package_settings=False)
    copy_planned(tiny_planned, env)
    out = root / 'out'
    out.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(TESTS, 'ddp_steps.py'),
                           os.path.join(env['nnUNet_preprocessed'], 'Dataset901_Tiny'), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / 'summary.json').read_text())


@pytest.fixture(scope='module')
def ddp_runs(tiny_planned, tmp_path_factory) -> dict:
    return ddp_steps(tiny_planned, tmp_path_factory.mktemp('ddp'), '--trainers', *TRAINERS)


@pytest.mark.parametrize('trainer', TRAINERS)
def test_two_ddp_processes_train_as_one_process_on_the_whole_batch(ddp_runs, trainer):
    run = ddp_runs[trainer]
    # nnU-Net gathers the ranks' losses at the end of the epoch: every rank logs the same mean, one process's
    assert run['ddp_losses'][0] == run['ddp_losses'][1]
    assert run['ddp_losses'][0] == pytest.approx(run['single_loss'], rel=1e-4)
    assert run['max_weight_change'] > 1e-3  # the steps trained
    # DDP's averaged gradients are one process's: the same weights after the steps, on every rank
    assert run['max_weight_difference'] < 1e-5 and run['max_rank_difference'] == 0
    # every parameter has a gradient on every rank: nnU-Net weights the deepest output 1e-6 under DDP (0 in one
    # process, where that head alone gets none), so that DDP finds no unused parameter
    assert run['ddp_no_gradient'] == [[], []]
    deepest = run['deepest_head']
    assert set(run['single_no_gradient']) == {f'{deepest}.weight', f'{deepest}.bias'}


def test_a_loss_that_diverges_on_one_rank_stops_every_rank_at_that_step_with_one_message_in_the_log(tiny_planned,
                                                                                                    tmp_path):
    run = ddp_steps(tiny_planned, tmp_path, '--trainers', 'nnUNetTrainerEMCAD', '--steps', '3', '--nan-rank', '1')
    stopped = run['nnUNetTrainerEMCAD']['stopped']
    assert stopped[0] == stopped[1], 'every rank stops with the same message'
    assert stopped[0].startswith('training loss became nan on rank 1 in epoch 0: the network diverged')
    assert stopped[0] in run['nnUNetTrainerEMCAD']['log']  # rank 0 writes nnU-Net's training log
