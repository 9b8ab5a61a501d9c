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
# the default (nothing recomputed), the full-resolution decoder (its stages at strides 1-4 run again in
# backward), the default under nnU-Net's torch.compile (through aot_eager), and EMCAD-B0, whose stem's BatchNorm
# nnU-Net syncs over the ranks with SyncBatchNorm, which needs CUDA: on the CPU each rank normalises its own half,
# so it is checked for ranks in step, not against one process
TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD+compile',
            'nnUNetTrainerEMCAD_PVTb0']


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
    assert run['compiled'] == [trainer.endswith('+compile')] * 3
    # nnU-Net gathers the ranks' losses at the end of the epoch: every rank logs the same mean
    assert run['ddp_losses'][0] == run['ddp_losses'][1]
    assert run['max_weight_change'] > 1e-4  # the steps trained (AdamW at 1e-4 moves EMCAD-B0's by about 1e-4 a step)
    assert run['max_rank_difference'] == 0  # DDP keeps the ranks' parameters equal
    # every parameter has a gradient on every rank: nnU-Net weights the deepest output 1e-6 under DDP without
    # compile, so that DDP finds no unused parameter (0 with compile, whose backward gives the deepest head zeros;
    # 0 in one eager process, where that head alone gets no gradient)
    assert run['ddp_no_gradient'] == [[], []]
    deepest = run['deepest_head']
    assert set(run['single_no_gradient']) == (set() if run['compiled'][-1] else {f'{deepest}.weight',
                                                                                 f'{deepest}.bias'})
    if 'PVT' not in trainer:  # one process's loss, and its weights after the steps
        assert run['ddp_losses'][0] == pytest.approx(run['single_loss'], rel=1e-4)
        assert run['max_weight_difference'] < 1e-5


def test_a_loss_that_diverges_on_one_rank_stops_every_rank_at_that_step_with_one_message_in_the_log(tiny_planned,
                                                                                                    tmp_path):
    run = ddp_steps(tiny_planned, tmp_path, '--trainers', 'nnUNetTrainerEMCAD', '--steps', '3', '--nan-rank', '1')
    stopped = run['nnUNetTrainerEMCAD']['stopped']
    assert stopped[0] == stopped[1], 'every rank stops with the same message'
    assert stopped[0].startswith('training loss became nan on rank 1 in epoch 0: the network diverged')
    assert stopped[0] in run['nnUNetTrainerEMCAD']['log']  # rank 0 writes nnU-Net's training log
