"""EMCAD trainers under nnU-Net's DDP (``nnUNetv2_train ... -num_gpus 2``), as two processes over gloo on the CPU,
on 2D and 3D plans: the gathered losses, the weights after a few steps and the gradients of two ranks on halves of a
batch match one process on the whole batch (``ddp_steps.py`` runs them)."""
import json
import os
import subprocess
import sys

import pytest

from helpers import TESTS
from nnunet_emcad.command.scripts import nnunet_env
from tiny_data import copy_planned

# One trainer per path DDP takes. 2D: the default (nothing recomputed), the full-resolution decoder (its stages at
# strides 1-4 run again in backward; _Stride4's decoder from stride 4 recomputes the same way), the default under
# nnU-Net's torch.compile (through aot_eager), and EMCAD-B0, whose stem's BatchNorm nnU-Net syncs over the ranks
# with SyncBatchNorm, which needs CUDA: on the CPU each rank normalises its own half, so it is checked for ranks in
# step, not against one process. 3D: the full-resolution decoder (recomputed); the 3D default's layout recomputes
# nothing, as the 2D default does
TRAINERS = {'2d': ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride1', 'nnUNetTrainerEMCAD+compile',
                   'nnUNetTrainerEMCAD_PVTb0'],
            '3d_fullres': ['nnUNetTrainerEMCAD3D']}
# The default with a NaN batch on rank 1, without and with a GradScaler (ddp_steps.py's +nan and +scaler)
DIVERGING = {False: 'nnUNetTrainerEMCAD+nan', True: 'nnUNetTrainerEMCAD+nan+scaler'}


def ddp_steps(root, planned: dict, *trainers: str) -> dict:
    """``ddp_steps.py`` on copies of the planned tiny data sets ``planned`` (configuration -> (planned folder,
    data set)) under ``root``, for trainer specs (``NAME@CONFIGURATION`` for all but the first configuration); its
    summary. A rank left waiting for another would hang: the timeout ends it."""
    env = nnunet_env(str(root), package_settings=False)
    datasets = []
    for configuration, (folder, dataset) in planned.items():
        copy_planned(folder, env)
        datasets.append(f"{configuration}={os.path.join(env['nnUNet_preprocessed'], dataset)}")
    out = root / 'out'
    out.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(TESTS, 'ddp_steps.py'), str(out), '--datasets', *datasets,
                           '--trainers', *trainers], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / 'summary.json').read_text())


@pytest.fixture(scope='module')
def ddp_runs(tiny_planned, tiny_planned_3d, tmp_path_factory) -> dict:
    """Every trainer's steps, in one run of two ranks (2D and 3D): its tests share one xdist worker (their group
    ``ddp_runs``). Keyed by trainer name and flags. The 3D steps run under the 2D malloc settings too: only their
    speed differs."""
    runs = ddp_steps(tmp_path_factory.mktemp('ddp'), {'2d': (tiny_planned, 'Dataset901_Tiny'),
                                                      '3d_fullres': (tiny_planned_3d, 'Dataset902_Tiny3D')},
                     *TRAINERS['2d'], *DIVERGING.values(), *[f'{t}@3d_fullres' for t in TRAINERS['3d_fullres']])
    return {spec.split('@')[0]: result for spec, result in runs.items()}


@pytest.mark.xdist_group('ddp_runs')
@pytest.mark.parametrize('trainer', [t for trainers in TRAINERS.values() for t in trainers])
def test_two_ddp_processes_train_as_one_process_on_the_whole_batch(ddp_runs, trainer):
    result = ddp_runs[trainer]
    assert result['compiled'] == [trainer.endswith('+compile')] * 3
    # nnU-Net gathers the ranks' losses at the end of the epoch: every rank logs the same mean
    assert result['ddp_losses'][0] == result['ddp_losses'][1]
    # the steps trained (AdamW at 1e-4 moves EMCAD-B0's by about 1e-4 a step)
    assert result['max_weight_change'] > 1e-4
    assert result['max_rank_difference'] == 0  # DDP keeps the ranks' parameters equal
    # every parameter has a gradient on every rank: nnU-Net weights the deepest output 1e-6 under DDP without
    # compile, so that DDP finds no unused parameter (0 with compile, whose backward gives the deepest head zeros;
    # 0 in one eager process, where that head alone gets no gradient)
    assert result['ddp_no_gradient'] == [[], []]
    deepest = result['deepest_head']
    no_gradient = set() if result['compiled'][-1] else {f'{deepest}.weight', f'{deepest}.bias'}
    assert set(result['single_no_gradient']) == no_gradient
    if 'PVT' not in trainer:  # one process's loss, and its weights after the steps
        assert result['ddp_losses'][0] == pytest.approx(result['single_loss'], rel=1e-4)
        # within float error: two halves and DDP's average sum in another order than one batch, which shows most
        # where a gradient is a small sum of large terms (a depth-wise kernel's: up to 0.5% of the largest step)
        assert result['max_weight_difference'] < 0.01 * result['max_weight_change']


@pytest.mark.xdist_group('ddp_runs')
@pytest.mark.parametrize('grad_scaler', [False, True], ids=['without a GradScaler', 'with a GradScaler'])
def test_a_loss_that_diverges_on_one_rank_stops_every_rank_at_that_step_with_one_message_in_the_log(ddp_runs,
                                                                                                    grad_scaler):
    result = ddp_runs[DIVERGING[grad_scaler]]
    stopped = result['stopped']
    assert stopped[0] == stopped[1], 'every rank stops with the same message'
    assert stopped[0].startswith('training loss became nan on rank 1 in epoch 0: the network diverged')
    assert stopped[0] in result['log']  # rank 0 writes nnU-Net's training log (this trainer's part of it)
    # the ranks gather their losses at every step without a GradScaler (steps 1 and 2, the NaN's), with one only
    # at the step it skipped (the NaN's: a float32 step on the CPU overflows nothing at the starting scale)
    assert result['gathers'] == ([1, 1] if grad_scaler else [2, 2])



FIRST_RANK_FIRST = '''
import json, os, sys, time
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunet_emcad.model.checkpoints import first_rank_first


def worker(rank, out):
    dist.init_process_group('gloo', init_method=f"file://{os.path.join(out, 'group')}", rank=rank, world_size=2)

    def fetch():
        start = time.time()
        time.sleep(1.0 if rank == 0 else 0.0)
        return {'start': start, 'end': time.time()}

    def fail():
        raise RuntimeError(f'no hub on rank {rank}')

    said = {'fetched': first_rank_first(fetch)}
    try:
        first_rank_first(fail)
    except RuntimeError as e:
        said['failed'] = str(e)
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump(said, f)


if __name__ == '__main__':
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=2, start_method='fork')
'''


def test_under_ddp_the_first_rank_fetches_the_weights_while_the_others_wait_and_none_waits_for_a_failed_fetch(
        tmp_path):
    script = tmp_path / 'first_rank_first.py'
    script.write_text(FIRST_RANK_FIRST)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)  # a rank left waiting would hang
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert second['fetched']['start'] >= first['fetched']['end']  # rank 1 fetched after rank 0 had (its cache)
    assert (first['failed'], second['failed']) == ('no hub on rank 0', 'no hub on rank 1')
