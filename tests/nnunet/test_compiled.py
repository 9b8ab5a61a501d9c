"""The compiled training path, as nnUNetv2_train takes it on CUDA (the network under torch.compile, autocast, a
GradScaler), run on the CPU: nnU-Net itself turns compile off there, so these tests call torch.compile directly.

Inductor compiles each of a training step's few hundred kernels with gcc on the CPU, which takes many minutes
for one whole trainer on 2 cores. So every EMCAD trainer's step is compiled whole through dynamo and
AOTAutograd (graph breaks and tracing errors show there), and the blocks where issue 14's non-finite gradients
came from (CAB and SAB on a fused float16 input, which reproduces it on the CPU) through inductor. The GPU check
(benchmarks/gpu_check.py) compiles every trainer with inductor on CUDA."""
import pytest
import torch
import torch._inductor.config
from torch import nn

from benchmarks.gpu_check import build_rig, train
from benchmarks.inductor_layout import inductor_lays_out_channels_last
from nnunet_emcad.model.blocks import CAB, SAB
from nnunet_emcad.nnunet import trainers as T
from tiny_plans import DATASET_JSON, make_plans

pytestmark = pytest.mark.usefixtures('nnunet_folders')

# One trainer per code path a compiled step takes: the plain and the residual encoder (with its recomputed stages),
# the decoder from stride 1 and from stride 4, PVTv2-b0 (nnU-Net's deep supervision) and MUTATION's heads (every
# head upsampled; its recomputed first encoder stages, as nnUNetTrainerEMCAD_PVTb2's), 3D. MUTATION's step is
# compiled over PVTv2-b0's encoder (MUTATION_ENCODER): b2's stages are b0's, deeper and wider, the same code path
# at several times the compile time. Left out as the same paths: nnUNetTrainerEMCAD_PVTb2 (MUTATION's network but
# for the upsampled heads, which b0 leaves out too) and nnUNetTrainerEMCAD3D_ResEnc (the 3D decoder and the
# residual encoder's recomputed stages, each compiled above).
TRAINERS = ['nnUNetTrainerEMCAD', 'nnUNetTrainerEMCAD_Stride4', 'nnUNetTrainerEMCAD_ResEnc',
            'nnUNetTrainerEMCAD_PVTb0', 'nnUNetTrainerEMCAD_PVTb2_MUTATION', 'nnUNetTrainerEMCAD3D']
MUTATION_ENCODER = 'pvt_v2_b0'
SETTLING_STEPS = 5  # the first steps, which the GradScaler may skip while it lowers its scale to what float16 holds


def tiny_rig(trainer: str):
    """The trainer's rig at a three-stage plan (2D 32x32, 64x64 for PVTv2's stride 32, or 3D 4x32x32), batch 1."""
    three_d = 'EMCAD3D' in trainer
    plans = make_plans(3, [4, 32, 32] if three_d else [64, 64] if 'PVT' in trainer else [32, 32])
    return build_rig(trainer, plans, DATASET_JSON, '3d_fullres' if three_d else '2d', 'cpu', batch_size=1)


@pytest.mark.parametrize('trainer', TRAINERS)
def test_every_emcad_training_step_compiles_as_one_graph_and_learns_under_autocast(trainer, monkeypatch):
    torch._dynamo.reset()  # a fresh compile, as in a user's process (earlier tests' graphs slow dynamo's guards)
    monkeypatch.setattr(T.nnUNetTrainerEMCAD_PVTb2_MUTATION, 'pvt_variant', MUTATION_ENCODER)
    rig = tiny_rig(trainer)
    rig.network = torch.compile(rig.trainer.network, backend='aot_eager', fullgraph=True)
    # steps whose float16 gradients overflow are skipped by the GradScaler, which halves its scale at each: it
    # settles within SETTLING_STEPS (MUTATION's loss, summed over combinations of heads, skipped 4 of its first
    # 5), and every step after has finite gradients
    result = train(rig, SETTLING_STEPS + 3, torch.float16)
    assert all(result['grads_finite'][SETTLING_STEPS:]) and result['params_changed'], result
    assert all(torch.isfinite(torch.tensor(result['losses'])))


@pytest.mark.parametrize('trainer, channels_last', [('nnUNetTrainerEMCAD', True), ('nnUNetTrainerEMCAD_PVTb0', True),
                                                    ('nnUNetTrainerEMCAD3D', True), ('nnUNetTrainer', False)])
def test_inductor_lays_emcad_out_channels_last_on_cuda_and_leaves_stock_nnunet_as_it_is(trainer, channels_last):
    # four stages up to 256 channels: enough width that inductor's heuristic looks past "all channels small"
    three_d = 'EMCAD3D' in trainer
    plans = make_plans(4, [8, 32, 32] if three_d else [64, 64])
    rig = build_rig(trainer, plans, DATASET_JSON, '3d_fullres' if three_d else '2d', 'cpu', batch_size=2)
    assert inductor_lays_out_channels_last(rig.trainer.network, rig.data.shape) is channels_last


class Attention(nn.Module):
    """A conv whose float16 output inductor fuses into CAB's and SAB's max reductions, as in the decoder."""

    def __init__(self, conv_op):
        super().__init__()
        self.conv = conv_op(4, 16, 3, padding=1)
        self.cab = CAB(16, conv_op=conv_op)
        self.sab = SAB(conv_op=conv_op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.conv(x) * 1.7 + 0.1
        d = self.cab(d) * d
        return self.sab(d) * d


@pytest.mark.parametrize('conv_op,shape', [(nn.Conv2d, (2, 4, 16, 16)), (nn.Conv3d, (2, 4, 4, 8, 8))])
def test_attention_gradients_stay_finite_under_inductor_and_float16(conv_op, shape):
    torch.manual_seed(0)
    module = Attention(conv_op)
    x = torch.randn(*shape)
    grads = []
    for network in (module, torch.compile(module)):
        module.zero_grad()
        with torch._inductor.config.patch(cpp_wrapper=True), torch.autocast('cpu', dtype=torch.float16):
            loss = network(x).float().square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert torch.isfinite(grads[1]).all()  # NaN everywhere when CAB and SAB took amax
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=1e-4)
