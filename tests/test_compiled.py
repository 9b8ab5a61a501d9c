"""The compiled training path, as nnUNetv2_train takes it on CUDA (the network under torch.compile, autocast, a
GradScaler), run on the CPU: nnU-Net itself turns compile off there, so these tests call torch.compile directly.

Inductor compiles every kernel with gcc on the CPU, which takes minutes for a whole network on 2 cores; so every
EMCAD trainer's step is compiled whole through dynamo and AOTAutograd (graph breaks and tracing errors show
there), and the default trainer's step also through inductor, where the non-finite gradients of issue 14 came
from (they reproduce on the CPU under float16 autocast). The GPU check (benchmarks/gpu_check.py) compiles every
trainer with inductor on CUDA."""
import sys

import pytest
import torch
import torch._inductor.config

from test_benchmarks import BENCHMARKS
from test_trainers import DATASET_JSON, make_plans

sys.path.insert(0, BENCHMARKS)
from gpu_check import build_rig, train, verdict  # noqa: E402

pytestmark = pytest.mark.usefixtures('nnunet_folders')

STEPS = 6
TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_ResEnc', 'nnUNetTrainerEMCAD_PVTb0',
            'nnUNetTrainerEMCAD_PVTb2', 'nnUNetTrainerEMCAD_PVTb2_MUTATION', 'nnUNetTrainerEMCAD3D',
            'nnUNetTrainerEMCAD3D_ResEnc']


def tiny_rig(trainer: str):
    """The trainer's rig at a three-stage plan (2D 32x32, 64x64 for PVTv2's stride 32, or 3D 8x32x32), batch 2."""
    three_d = 'EMCAD3D' in trainer
    plans = make_plans(3, [8, 32, 32] if three_d else [64, 64] if 'PVT' in trainer else [32, 32])
    return build_rig(trainer, plans, DATASET_JSON, '3d_fullres' if three_d else '2d', 'cpu', batch_size=2)


def eager_and_compiled(trainer: str, **compile_kwargs) -> dict:
    """The gpu_check verdict on the trainer's tiny rig: float16 steps eager, then with the network compiled."""
    eager = train(tiny_rig(trainer), STEPS, torch.float16)
    rig = tiny_rig(trainer)
    rig.network = torch.compile(rig.trainer.network, **compile_kwargs)
    compiled = train(rig, STEPS, torch.float16)
    return dict(verdict(eager, compiled), eager=eager, compiled=compiled)


@pytest.mark.parametrize('trainer', TRAINERS)
def test_every_emcad_training_step_compiles_as_one_graph_and_learns_under_autocast(trainer):
    result = eager_and_compiled(trainer, backend='aot_eager', fullgraph=True)
    assert result['trains'] and result['follows_eager'], result


def test_inductor_training_step_of_the_default_trainer_keeps_gradients_finite_under_float16():
    with torch._inductor.config.patch(cpp_wrapper=True):  # one gcc call per graph instead of one per kernel
        result = eager_and_compiled('nnUNetTrainerEMCAD')
    assert result['compiled']['grads_finite'] == result['eager']['grads_finite'], result
    assert result['trains'] and result['follows_eager'], result
