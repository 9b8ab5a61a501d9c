"""The trainers' contracts with nnU-Net, in process: deep supervision, patch sizes, 3D refusal, optimisers."""
import os
import re

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

import nnunet_emcad._startup as startup
from nnunet_emcad.model.blocks import InstanceNorm2dCPU, InstanceNorm3dCPU
from nnunet_emcad.nnunet import trainers as T
from nnunet_emcad.nnunet.trainers.base import unwrap
from tiny_plans import DATASET_JSON, PATCH_FOR_STAGES, build, make_plans

pytestmark = pytest.mark.usefixtures('nnunet_folders')

EMCAD_TRAINERS = [getattr(T, name) for name in T.__all__ if getattr(T, name).dimensions == 2]
EMCAD_3D_TRAINERS = [getattr(T, name) for name in T.__all__ if getattr(T, name).dimensions == 3]
# The trainers that build a network of their own: a short schedule's trainer (short_training.short_schedule) builds
# its base's (test_short_schedules_change_only_the_schedule)
NETWORK_TRAINERS = [cls for cls in EMCAD_TRAINERS if 'schedule' not in vars(cls)]


def make_3d_plans(anisotropic: bool, residual: bool = False) -> dict:
    """3d_fullres plans: isotropic (strides 2, kernels 3) or like nnU-Net's for thick-slice MRI (ACDC's shape)."""
    if not anisotropic:
        return make_plans(5, [32, 64, 64], residual)
    plans = make_plans(5, [8, 64, 64], residual)
    config = plans['configurations']['3d_fullres']
    config['architecture']['arch_kwargs'].update(
        kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    return plans


def test_short_schedules_change_only_the_schedule():
    short = [getattr(T, name) for name in T.__all__ if 'schedule' in vars(getattr(T, name))]
    assert len(short) >= 6
    for cls in short:
        assert set(vars(cls)) <= {'__init__', '__qualname__', 'schedule', '__module__', '__doc__'}, cls
        assert cls.__bases__[0] in NETWORK_TRAINERS + EMCAD_3D_TRAINERS, cls


# What sets a 2D network's outputs (how many, at which scales): a trainer that shares these with one listed before
# it differs only inside blocks (widths, kernels, attention, recomputing, the loss weights), so its outputs are
# checked on the 5-stage plans only; the first trainer of each kind on every plan from 5 to 8 stages
TOPOLOGY = ('encoder_kind', 'decoder_stride', 'light_stages', 'refine_channels', 'upsample_outputs')


def topology(cls) -> tuple:
    return tuple(getattr(cls, name, None) for name in TOPOLOGY)


def deep_supervision_cases() -> list:
    """(trainer, n_stages) for the deep-supervision test."""
    cases, seen = [], set()
    for cls in NETWORK_TRAINERS:
        cases += [(cls, n) for n in ([5] if topology(cls) in seen else [5, 6, 7, 8])]
        seen.add(topology(cls))
    return cases


def test_every_network_trainer_has_deep_supervision_cases_and_each_topology_every_stage_count():
    cases = deep_supervision_cases()
    assert {cls for cls, _ in cases} == set(NETWORK_TRAINERS)
    for kind in {topology(cls) for cls in NETWORK_TRAINERS}:
        assert {n for cls, n in cases if topology(cls) == kind} == {5, 6, 7, 8}


@pytest.mark.parametrize('cls, n_stages', deep_supervision_cases(), ids=lambda c: getattr(c, '__name__', str(c)))
def test_deep_supervision_outputs_match_the_loss_scales(cls, n_stages):
    trainer = build(cls, make_plans(n_stages, PATCH_FOR_STAGES[n_stages]))
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    loss = trainer._build_loss()
    trainer.network.eval()
    with torch.no_grad():
        outputs = trainer.network(torch.randn(1, 1, *patch))
    assert len(outputs) == len(scales)
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(int(round(p * s)) for p, s in zip(patch, sc))
                                                     for sc in scales]
    assert scales[0] == [1.0, 1.0]
    if not isinstance(trainer, T.nnUNetTrainerEMCAD_PVTb2):
        # one supervised head per decoded stage (stride s is stage log2(s) of these plans), and one for the
        # full-resolution refinement
        left_out = 0 if cls.light_stages else cls.decoder_stride.bit_length() - 1 - bool(cls.refine_channels)
        assert len(outputs) == n_stages - left_out
    target = torch.randint(0, 3, (1, 1, *patch)).float()
    targets = [F.interpolate(target, size=o.shape[2:], mode='nearest') for o in outputs]
    assert torch.isfinite(loss(outputs, targets))
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():
        single = trainer.network(torch.randn(1, 1, *patch))
    assert single.shape == (1, 3, *patch)


def test_residual_trainer_follows_resenc_plans_and_fills_in_plain_ones():
    plain = build(T.nnUNetTrainerEMCAD_ResEnc, make_plans(6, [256, 224]))
    assert [len(s.blocks) for s in plain.network.encoder.stages] == [1, 3, 4, 6, 6, 6]
    resenc = build(T.nnUNetTrainerEMCAD, make_plans(6, [256, 224], residual=True))
    assert type(resenc.network.encoder).__name__ == 'ResidualEncoder'
    assert type(build(T.nnUNetTrainerEMCAD, make_plans(6, [256, 224])).network.encoder).__name__ == 'PlainConvEncoder'


def test_pvt_trainers_round_the_patch_up_to_a_multiple_of_32():
    trainer = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [56, 72]))
    assert list(trainer.configuration_manager.patch_size) == [64, 96]
    assert trainer.plans_manager.plans['configurations']['2d']['patch_size'] == [64, 96]  # saved for the predictor
    with torch.no_grad():
        assert trainer.network.eval()(torch.randn(1, 1, 64, 96))[0].shape == (1, 3, 64, 96)


def test_pvt_trainers_train_on_a_plan_for_small_images_at_a_64_patch():
    trainer = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(3, [32, 40]))
    assert list(trainer.configuration_manager.patch_size) == [64, 64]
    outputs = trainer.network.train()(torch.randn(2, 1, 64, 64))  # at 32x32 instance norm met 1x1 and raised
    assert outputs[0].shape == (2, 3, 64, 64)


@pytest.mark.parametrize('cls', EMCAD_TRAINERS, ids=lambda c: c.__name__)
def test_a_3d_configuration_stops_at_once(cls):
    with pytest.raises(RuntimeError, match='is a 2D trainer, but this configuration is 3D.*nnUNetv2_train DATASET 2d'
                                           '.*use nnUNetTrainerEMCAD3D'):
        cls(make_plans(5, [64, 64], extra_3d=True), '3d_fullres', 0, DATASET_JSON, device=torch.device('cpu'))


@pytest.mark.parametrize('cls', EMCAD_3D_TRAINERS, ids=lambda c: c.__name__)
def test_a_2d_configuration_stops_a_3d_trainer(cls):
    with pytest.raises(RuntimeError, match='is a 3D trainer, but this configuration is 2D.*nnUNetTrainerEMCAD for 2d'):
        cls(make_plans(5, [64, 64], extra_3d=True), '2d', 0, DATASET_JSON, device=torch.device('cpu'))


@pytest.mark.parametrize('anisotropic', [False, True], ids=['isotropic', 'anisotropic'])
@pytest.mark.parametrize('cls', EMCAD_3D_TRAINERS, ids=lambda c: c.__name__)
def test_3d_deep_supervision_outputs_match_the_loss_scales(cls, anisotropic):
    trainer = build(cls, make_3d_plans(anisotropic), '3d_fullres')
    patch = trainer.configuration_manager.patch_size
    strides = trainer.configuration_manager.network_arch_init_kwargs['strides']
    scales = trainer._get_deep_supervision_scales()
    expected = [[1.0] * 3]
    for stride in strides[1:]:
        expected.append([e / s for e, s in zip(expected[-1], stride)])
    # decoding from stride 2 (stage 1 of both plans) leaves stage 0's head out; the first output is full size
    left_out = 0 if cls.decoder_stride == 1 else 1
    assert scales == expected[:1] + expected[1 + left_out:]
    with torch.no_grad():
        outputs = trainer.network.eval()(torch.randn(1, 1, *patch))
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(int(round(p * s)) for p, s in zip(patch, sc))
                                                     for sc in scales]
    targets = [F.interpolate(torch.randint(0, 3, (1, 1, *patch)).float(), size=o.shape[2:], mode='nearest')
               for o in outputs]
    assert torch.isfinite(trainer._build_loss()(outputs, targets))
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():
        assert trainer.network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_3d_decoder_kernels_follow_the_plans_anisotropy():
    decoder = build(T.nnUNetTrainerEMCAD3D, make_3d_plans(True), '3d_fullres').network.decoder
    assert decoder.sab.conv.kernel_size == (1, 7, 7)
    assert [c[0].kernel_size for c in decoder.mscb[0].msdc.dwconvs] == [(1, 1, 1), (1, 3, 3), (1, 5, 5)]
    assert [c[0].kernel_size for c in decoder.mscb[2].msdc.dwconvs] == [(1, 1, 1), (3, 3, 3), (5, 5, 5)]
    assert decoder.eucb[0].up_dwc[1].kernel_size == (1, 3, 3) and decoder.eucb[0].up_dwc[0].scale_factor == (
        1.0, 2.0, 2.0)
    assert decoder.lgag[1].W_g[0].kernel_size == (1, 3, 3) and decoder.lgag[2].W_g[0].kernel_size == (3, 3, 3)
    isotropic = build(T.nnUNetTrainerEMCAD3D, make_3d_plans(False), '3d_fullres').network.decoder
    assert isotropic.sab.conv.kernel_size == (7, 7, 7)
    norms = {type(m) for m in decoder.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    assert norms == {InstanceNorm3dCPU}


def test_3d_residual_trainer_builds_the_residual_encoder():
    trainer = build(T.nnUNetTrainerEMCAD3D_ResEnc, make_3d_plans(True), '3d_fullres')
    assert isinstance(trainer.network.encoder, ResidualEncoder)  # a subclass whose first stages run again in backward
    assert [len(s.blocks) for s in trainer.network.encoder.stages] == [1, 3, 4, 6, 6]


def test_optimisers():
    default = build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))
    optimizer, _ = default.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults['lr'] == 1e-2
    pvt = build(T.nnUNetTrainerEMCAD_PVTb2, make_plans(5, [64, 64]))
    optimizer, scheduler = pvt.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults['lr'] == 1e-4 and optimizer.defaults['weight_decay'] == 1e-4
    assert type(scheduler).__name__ == 'PolyLRScheduler'


def test_deep_supervision_switch_reaches_through_torch_compile():
    trainer = build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))
    trainer.network = torch.compile(trainer.network)
    trainer.set_deep_supervision_enabled(False)
    assert unwrap(trainer.network).decoder.deep_supervision is False
    trainer.set_deep_supervision_enabled(True)
    assert unwrap(trainer.network).decoder.deep_supervision is True


def test_mutation_loss_trainer_upsamples_every_head():
    trainer = build(T.nnUNetTrainerEMCAD_PVTb2_MUTATION, make_plans(5, [64, 64]))
    assert trainer._get_deep_supervision_scales() == [[1.0, 1.0]] * 4
    assert type(trainer._build_loss().loss).__name__ == 'MutationLoss'


def test_startup_hook_appends_and_keeps_the_users_folders(monkeypatch):
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join(['/my/trainers', '/more']))
    startup.register_trainer_dir()
    startup.register_trainer_dir()
    assert os.environ['nnUNet_extTrainer'].split(os.pathsep) == ['/my/trainers', '/more', startup.TRAINER_DIR]
    monkeypatch.delenv('nnUNet_extTrainer')
    startup.register_trainer_dir()
    assert os.environ['nnUNet_extTrainer'] == startup.TRAINER_DIR
    assert os.path.isfile(os.path.join(startup.TRAINER_DIR, 'nnunet_emcad_trainers.py'))


@pytest.mark.parametrize('cls', EMCAD_TRAINERS, ids=lambda c: c.__name__)
def test_decoders_use_the_plans_instance_norm_through_the_faster_cpu_kernel_and_encoders_keep_the_plans(cls):
    network = build(cls, make_plans(5, [64, 64])).network
    norms = [type(m) for m in network.decoder.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and set(norms) == {InstanceNorm2dCPU}
    assert all(m.affine for m in network.decoder.modules() if isinstance(m, torch.nn.InstanceNorm2d))
    encoder_norms = {type(m) for m in network.encoder.modules() if isinstance(m, torch.nn.InstanceNorm2d)}
    assert encoder_norms == (set() if 'PVT' in cls.__name__ else {torch.nn.InstanceNorm2d})  # as nnU-Net builds them


@pytest.mark.parametrize('cls', [c for c in NETWORK_TRAINERS + EMCAD_3D_TRAINERS if 'schedule' not in vars(c)],
                         ids=lambda c: c.__name__)
def test_a_training_step_with_deep_supervision_reaches_every_parameter_but_the_head_nnunet_weights_zero(cls):
    plans, configuration = ((make_3d_plans(anisotropic=True), '3d_fullres') if cls.dimensions == 3 else
                            (make_plans(5, [64, 64]), '2d'))
    trainer = build(cls, plans, configuration)
    trainer.loss = trainer._build_loss()
    network = trainer.network.train()
    patch = trainer.configuration_manager.patch_size
    outputs = network(torch.randn(2, 1, *patch))
    target = torch.randint(0, 3, (2, 1, *patch)).float()
    loss = trainer.loss(outputs, [F.interpolate(target, size=o.shape[2:], mode='nearest') for o in outputs])
    loss.backward()
    unreached = {name for name, p in network.named_parameters() if p.grad is None}
    # nnU-Net's deep-supervision weights give the deepest output 0 (all heads count in the MUTATION loss, and
    # with train_deepest_head)
    deepest = len(network.decoder.seg_layers) - 1
    trained = cls.train_deepest_head or not hasattr(trainer.loss, 'weight_factors')
    assert unreached == (set() if trained else {f'decoder.seg_layers.{deepest}.weight',
                                                 f'decoder.seg_layers.{deepest}.bias'})
    assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
    if cls.train_deepest_head:  # nnU-Net's halving weights, the deepest output's share kept
        weights = trainer.loss.weight_factors
        assert len(weights) == len(outputs) and sum(weights) == pytest.approx(1)
        assert all(w == pytest.approx(weights[0] / 2 ** i) for i, w in enumerate(weights))
    if network.decoder.refine is not None:
        assert network.decoder.refine.conv[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize('cls, recomputed, encoder_recomputed', [
    (T.nnUNetTrainerEMCAD, 0, 0), (T.nnUNetTrainerEMCAD_Stride1, 3, 0), (T.nnUNetTrainerEMCAD_NoRecompute, 0, 0),
    (T.nnUNetTrainerEMCAD_Stride4, 3, 0), (T.nnUNetTrainerEMCAD_Stride2, 3, 0),
    (T.nnUNetTrainerEMCAD_Stride2Narrow, 0, 0), (T.nnUNetTrainerEMCAD3D_Stride2Narrow, 0, 0),
    (T.nnUNetTrainerEMCAD_ResEnc, 3, 3), (T.nnUNetTrainerEMCAD3D, 3, 0), (T.nnUNetTrainerEMCAD3D_ResEnc, 3, 3),
    (T.nnUNetTrainerEMCAD_PVTb2, 1, 1), (T.nnUNetTrainerEMCAD_PVTb0, 0, 0)],
    ids=lambda v: getattr(v, '__name__', str(v)))
def test_trainers_run_the_stages_up_to_stride_4_again_in_backward_unless_told_not_to(cls, recomputed,
                                                                                    encoder_recomputed):
    plans = make_3d_plans(anisotropic=True) if cls.dimensions == 3 else make_plans(5, [64, 64])
    configuration = '3d_fullres' if cls.dimensions == 3 else '2d'
    network = build(cls, plans, configuration).network
    # the decoder's stages at strides 1, 2 and 4 (Stride4 decodes only the one at 4), the residual encoders'
    # too; EMCAD-B2: its first, at stride 4, in the encoder too; EMCAD-B0, the CPU trainer, and the narrow
    # decoders (the default; fewer activations than stock without), none
    assert network.decoder.recompute_stages == recomputed
    assert getattr(network.encoder, 'recompute_stages', 0) == encoder_recomputed
    if hasattr(network.encoder, 'body'):
        stages = [getattr(network.encoder.body, f'stages_{i}') for i in range(4)]  # timm's, in its feature wrapper
        assert [s.grad_checkpointing for s in stages] == [i < encoder_recomputed for i in range(4)]
    keeping = type(f'{cls.__name__}Keeping', (cls,), {'recompute_stride': 0})
    kept = build(keeping, plans, configuration).network
    assert kept.decoder.recompute_stages == getattr(kept.encoder, 'recompute_stages', 0) == 0
    # the same weights: checkpoints move between the two
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in kept.state_dict().items()}



def test_the_unnormalised_gate_variant_drops_only_the_norm_of_each_lgag_gate_map():
    assert set(vars(T.nnUNetTrainerEMCAD_GateNoNorm)) - {'__module__', '__qualname__', '__doc__'} == \
        {'lgag_gate_norm'}
    plans = make_plans(5, [64, 64])
    default, variant = (build(cls, plans).network for cls in (T.nnUNetTrainerEMCAD, T.nnUNetTrainerEMCAD_GateNoNorm))
    dropped = {k for k in default.state_dict() if re.fullmatch(r'decoder\.lgag\.\d+\.psi\.1\.\w+', k)}
    assert dropped and set(default.state_dict()) - set(variant.state_dict()) == dropped
    assert set(variant.state_dict()) < set(default.state_dict())
    assert all(isinstance(gate.psi[1], torch.nn.Identity) for gate in variant.decoder.lgag)


FINE_STAGE_VARIANTS = [T.nnUNetTrainerEMCAD_Expansion1, T.nnUNetTrainerEMCAD_Kernel3,
                       T.nnUNetTrainerEMCAD_NoFineAttention, T.nnUNetTrainerEMCAD_Lean]


@pytest.mark.parametrize('cls', FINE_STAGE_VARIANTS, ids=lambda c: c.__name__)
def test_fine_stage_variants_change_only_their_blocks_and_train_a_step_in_3d_too(cls):
    knobs = {k: v for k, v in vars(cls).items() if k.startswith('mscb_')}
    assert knobs and set(vars(cls)) - {'__module__', '__qualname__', '__doc__'} == set(knobs)
    default = build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64])).network.decoder
    decoder = build(cls, make_plans(5, [64, 64])).network.decoder
    for mscb in decoder.mscb:  # the default's width, 32, expanded by the variant's factor, per kernel
        assert mscb.pconv1[0].out_channels == 32 * cls.mscb_expansion_factor
        assert [c[0].kernel_size for c in mscb.msdc.dwconvs] == [(k, k) for k in cls.mscb_kernel_sizes]
    # the stride-2 stage (the finest decoded) without CAB: one CAB fewer, SAB still used by the coarser stages
    assert len(decoder.cab) == len(default.cab) - bool(cls.mscb_only_stride)
    assert [type(m) for m in (decoder.eucb, decoder.lgag, decoder.seg_layers)] == [torch.nn.ModuleList] * 3
    assert [len(getattr(decoder, p)) for p in ('mscb', 'eucb', 'lgag', 'seg_layers')] == [
        len(getattr(default, p)) for p in ('mscb', 'eucb', 'lgag', 'seg_layers')]
    # the same knobs on the default's 3D layout, on an anisotropic plan: a step reaches every parameter but the
    # head nnU-Net's deep-supervision weights give 0
    cls3d = type(f'{cls.__name__}3D', (T.nnUNetTrainerEMCAD3D_Stride2Narrow,), knobs)
    trainer = build(cls3d, make_3d_plans(anisotropic=True), '3d_fullres')
    network = trainer.network.train()
    patch = trainer.configuration_manager.patch_size
    outputs = network(torch.randn(2, 1, *patch))
    target = torch.randint(0, 3, (2, 1, *patch)).float()
    targets = [F.interpolate(target, size=o.shape[2:], mode='nearest') for o in outputs]
    trainer._build_loss()(outputs, targets).backward()
    deepest = len(network.decoder.seg_layers) - 1
    assert {n for n, p in network.named_parameters() if p.grad is None} == {f'decoder.seg_layers.{deepest}.weight',
                                                                           f'decoder.seg_layers.{deepest}.bias'}
    assert len(network.decoder.cab) == len(network.decoder.mscb) - bool(cls.mscb_only_stride)


@pytest.mark.parametrize('attribute, value', [('decoder_stride', 2), ('decoder_width', 32), ('refine_channels', 8),
                                              ('mscb_kernel_sizes', (3,)), ('encoder_kind', 'residual')])
def test_a_pvt_trainer_changing_the_decoder_layout_is_refused_naming_what_the_pvt_trainers_build(
        attribute, value, nnunet_folders):
    variant = type('nnUNetTrainerEMCAD_PVTb0_Variant', (T.nnUNetTrainerEMCAD_PVTb0,), {attribute: value})
    said = rf"nnUNetTrainerEMCAD_PVTb0_Variant sets {attribute} = {re.escape(repr(value))}, but the PVT trainers " \
        r"build only the paper's decoder .*decoder_stride = 4.*: derive from nnUNetTrainerEMCAD"
    with pytest.raises(RuntimeError, match=said):
        build(variant, make_plans(5, [64, 64]))
    assert not os.path.exists(os.environ['nnUNet_results'])  # refused before nnU-Net wrote anything
    trainer = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))  # what the predictor builds, refused too
    with pytest.raises(RuntimeError, match=said):
        variant.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
