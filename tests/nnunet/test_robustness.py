"""Misuse gets a clear message before work starts; mixed precision stays finite; divergence stops the run."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from helpers import official_state_dict
from nnunet_emcad.command import cli
from nnunet_emcad.model.blocks import CAB, LGAG, MSCB, SAB
from nnunet_emcad.model.checkpoints import CheckpointError
from nnunet_emcad.model.emcad import create_emcad_pvt
from nnunet_emcad.nnunet import trainers as T
from nnunet_emcad.nnunet.plans import create_emcad_unet
from nnunet_emcad.nnunet.trainers import pvt
from nnunet_emcad.nnunet.trainers.base import PVT_WEIGHTS_ENV, check_nnunet_folders
from tiny_plans import ACDC_2D_ARCH, DATASET_JSON, build, make_plans

pytestmark = pytest.mark.usefixtures('nnunet_folders')


def test_pvt_weights_named_but_missing_stop_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv(PVT_WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(CheckpointError, match=r'pvt_v2_b0\.pth does not exist.*unset nnUNet_EMCAD_PVT_WEIGHTS'):
        build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))
    monkeypatch.setenv(PVT_WEIGHTS_ENV, str(tmp_path / 'b0.pth'))
    with pytest.raises(CheckpointError, match=r'b0\.pth does not exist'):
        build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))


def test_missing_pvt_weights_stop_neither_a_continued_training_nor_a_validation_of_a_finished_fold(tmp_path,
                                                                                                    monkeypatch):
    fold = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64])).output_folder
    monkeypatch.setenv(PVT_WEIGHTS_ENV, str(tmp_path / 'gone.pth'))
    continued = build(T.nnUNetTrainerEMCAD_PVTb0, dict(make_plans(5, [64, 64]), continue_training=True))  # --c
    assert continued.pvt_weights is None and continued.pvt_weights_error is None
    open(os.path.join(fold, 'checkpoint_final.pth'), 'w').close()
    finished = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))  # --val; a new training stops at its start
    assert finished.pvt_weights is None and 'gone.pth does not exist' in str(finished.pvt_weights_error)


def test_pvt_weights_of_another_model_fail_with_the_key_lists(tmp_path, monkeypatch):
    torch.save(create_emcad_unet(ACDC_2D_ARCH, 1, 2).state_dict(), tmp_path / 'pvt_v2_b0.pth')
    monkeypatch.setenv(PVT_WEIGHTS_ENV, str(tmp_path))
    trainer = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))
    with pytest.raises(CheckpointError, match='(?s)nothing was loaded.*missing keys.*unexpected keys'):
        trainer.network.encoder.load_pretrained(trainer.pvt_weights)


def test_unset_or_read_only_nnunet_folders_stop_the_trainer_before_nnunet_writes(tmp_path, monkeypatch):
    monkeypatch.delenv('nnUNet_results')
    with pytest.raises(RuntimeError, match='nnUNet_results is not set: export nnUNet_results='):
        build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'a_file' / 'results'))
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(RuntimeError, match=r'a_file/results is not writable \(.*a_file is read-only or not a folder'):
        build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))


def test_export_onnx_names_what_is_missing(tmp_path, monkeypatch, capsys):
    args = ['export-onnx', '-d', 'Dataset901_Tiny', '-f', '0', '-tr', 'nnUNetTrainerEMCAD',
            '-o', str(tmp_path / 'x.onnx')]
    monkeypatch.delenv('nnUNet_results', raising=False)
    assert cli.main(args) == 1 and 'nnUNet_results is not set' in capsys.readouterr().err
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    (tmp_path / 'Dataset901_Tiny').mkdir()
    assert cli.main(args) == 1
    assert 'nnUNetTrainerEMCAD__nnUNetPlans__2d' in capsys.readouterr().err and not (tmp_path / 'x.onnx').exists()


def test_read_only_check_follows_permissions(tmp_path, monkeypatch):
    monkeypatch.setattr(os, 'access', lambda path, mode: not str(path).startswith(str(tmp_path / 'ro')))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'ro' / 'results'))
    (tmp_path / 'ro').mkdir()
    with pytest.raises(RuntimeError, match=r'nnUNet_results=.*ro/results is not writable'):
        check_nnunet_folders()
    monkeypatch.setenv('nnUNet_preprocessed', str(tmp_path / 'ro' / 'preprocessed'))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'results'))
    check_nnunet_folders()  # training only reads the preprocessed data


def test_a_diverging_loss_stops_training(monkeypatch):
    trainer = build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))
    monkeypatch.setattr(nnUNetTrainer, 'train_step', lambda self, batch: {'loss': np.array(np.nan)})
    with pytest.raises(RuntimeError, match='training loss became nan in epoch 0: the network diverged'):
        trainer.train_step({})
    monkeypatch.setattr(nnUNetTrainer, 'train_step', lambda self, batch: {'loss': np.array(0.5)})
    assert trainer.train_step({})['loss'] == 0.5


class CountingScaler:
    """What the guard asks of a GradScaler: its scale, each read counted (a device sync on CUDA)."""

    def __init__(self):
        self.scale, self.reads = 1024.0, 0

    def get_scale(self) -> float:
        self.reads += 1
        return self.scale


def test_the_guard_reads_the_scale_once_a_step_and_stops_after_the_skipped_steps_in_a_row(monkeypatch):
    trainer = build(T.nnUNetTrainerEMCAD, make_plans(5, [64, 64]))
    trainer.grad_scaler, trainer.max_skipped_steps = CountingScaler(), 3
    factors = iter([1.0, 0.5, 2.0, 0.5, 0.5, 0.5])  # the GradScaler halves its scale at a step it skips

    def step(self, batch):
        self.grad_scaler.scale *= next(factors)
        return {'loss': np.array(0.5)}

    monkeypatch.setattr(nnUNetTrainer, 'train_step', step)
    for _ in range(5):
        trainer.train_step({})
    assert trainer.grad_scaler.reads == 6  # before the first step, then after each
    assert trainer.skipped_steps == 2  # the last two; the growth at step 3 ended the first skip's run
    with pytest.raises(RuntimeError, match='the last 3 optimiser steps .epoch 0. were all skipped'):
        trainer.train_step({})


EXTREMES = [1e4, -1e4, 1e-7, 0.0]


@pytest.mark.parametrize('scale', EXTREMES)
def test_attention_blocks_stay_finite_under_bfloat16_autocast(scale):
    torch.manual_seed(0)
    blocks = [CAB(32), SAB(), LGAG(32), MSCB(32, 32)]
    x = (torch.randn(2, 32, 16, 16) * scale).requires_grad_()
    g = (torch.randn(2, 32, 16, 16) * scale).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = [blocks[0](x) * x, blocks[1](x) * x, blocks[2](g=g, x=x), blocks[3](x)]
        loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outputs)
    assert torch.isfinite(x.grad).all() and torch.isfinite(g.grad).all()
    params = [p for b in blocks for p in b.parameters()]
    assert all(p.grad is not None for p in params), 'the loss reaches every parameter of the blocks'
    assert all(torch.isfinite(p.grad).all() for p in params)


NETWORK_CASES = [('nnunet', s) for s in EXTREMES] + [('pvt', 1e4), ('pvt', -1e4)]


@pytest.mark.parametrize('kind,scale', NETWORK_CASES)
def test_networks_stay_finite_under_bfloat16_autocast(kind, scale):
    """(A constant input is left out for PVTv2: the gradient through timm's LayerNorms of identical tokens
    overflows in bfloat16 on the CPU, an encoder matter that nnU-Net never meets: it trains without autocast on
    the CPU.)"""
    torch.manual_seed(0)
    arch = dict(ACDC_2D_ARCH, n_stages=4, features_per_stage=[8, 16, 32, 64], strides=[[1, 1]] + [[2, 2]] * 3,
                kernel_sizes=[[3, 3]] * 4, n_conv_per_stage=[1] * 4)
    net = create_emcad_unet(arch, 1, 3) if kind == 'nnunet' else create_emcad_pvt('pvt_v2_b0', 3, 1)
    x = torch.randn(2, 1, 64, 64) * scale
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = net(x)
        loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outputs)
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f'the loss reaches every parameter: {missing}'
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='float16 autocast needs a CUDA device')
def test_networks_stay_finite_under_float16_autocast_on_cuda():
    net = create_emcad_pvt('pvt_v2_b0', 3, 1).cuda()
    x = torch.randn(2, 1, 64, 64, device='cuda') * 1e4
    with torch.autocast('cuda', dtype=torch.float16):
        outputs = net(x)
        loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outputs)


def _preprocessed(root, channels: int, classes: int) -> str:
    """A planned data set as nnUNet_preprocessed holds it: plans and dataset.json."""
    folder = root / 'Dataset901_Tiny'
    folder.mkdir(parents=True)
    (folder / 'nnUNetPlans.json').write_text(json.dumps(make_plans(5, [64, 64])))
    labels = {'background': 0, **{f'c{i}': i for i in range(1, classes)}}
    (folder / 'dataset.json').write_text(json.dumps(dict(
        DATASET_JSON, channel_names={str(i): 'MRI' for i in range(channels)}, labels=labels)))
    return 'Dataset901_Tiny'


@pytest.fixture
def official_b0(tmp_path):
    """An official-format EMCAD-B0 checkpoint for 9 classes and grey-scale input (as trained on Synapse)."""
    torch.manual_seed(0)
    path = tmp_path / 'emcad_b0_synapse.pth'
    torch.save(official_state_dict(create_emcad_pvt('pvt_v2_b0', 9, 1)), path)
    return path


def _convert(monkeypatch, tmp_path, checkpoint, channels, classes, *extra):
    monkeypatch.setenv('nnUNet_preprocessed', str(tmp_path / 'pre'))
    dataset = _preprocessed(tmp_path / 'pre', channels, classes)
    output = tmp_path / 'pretrained.pth'
    return cli.main(['convert-official', str(checkpoint), '-d', dataset, '-o', str(output), *extra]), output


def test_official_checkpoint_fine_tunes_through_nnunets_pretrained_weights(tmp_path, monkeypatch, capsys,
                                                                         official_b0):
    """9 official classes, 3 in the data set: everything but the heads carries over, bit for bit."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    rc, output = _convert(monkeypatch, tmp_path, official_b0, 1, 3, '-tr', 'nnUNetTrainerEMCAD_PVTb0')
    assert rc == 0 and '-pretrained_weights' in capsys.readouterr().out
    written = torch.load(output, weights_only=True)['network_weights']
    assert written and not [k for k in written if 'seg_layers' in k]
    trainer = build(T.nnUNetTrainerEMCAD_PVTb0, make_plans(5, [64, 64]))
    load_pretrained_weights(trainer.network, str(output))
    official = torch.load(official_b0, weights_only=True)
    loaded = trainer.network.state_dict()
    for ours, theirs in (('decoder.mscb.0.pconv1.0.weight', 'decoder.mscb1.0.pconv1.0.weight'),
                         ('encoder.stem.0.weight', 'conv.0.weight'),
                         ('encoder.body.stages_3.blocks.1.mlp.fc2.weight', 'backbone.block4.1.mlp.fc2.weight')):
        torch.testing.assert_close(loaded[ours], official[theirs], rtol=0, atol=0)
    assert loaded['decoder.seg_layers.0.weight'].shape[0] == 3


def test_official_checkpoint_with_another_channel_count_stops(tmp_path, monkeypatch, capsys, official_b0):
    rc, _ = _convert(monkeypatch, tmp_path, official_b0, 2, 9, '-tr', 'nnUNetTrainerEMCAD_PVTb0')
    assert rc == 1
    assert re.search(r'trained on 1-channel images, the dataset has 2 channel\(s\).*nnUNet_EMCAD_PVT_WEIGHTS',
                     capsys.readouterr().err)


@pytest.mark.parametrize('trainer,message', [
    ('nnUNetTrainerEMCAD_PVTb2', r'encoder is pvt_v2_b0, the network\'s is pvt_v2_b2: .*nnUNetTrainerEMCAD_PVTb0'),
    ('nnUNetTrainerEMCAD', r'hold a PVTv2 encoder, this network\'s encoder is PlainConvEncoder'),
])
def test_official_checkpoint_for_another_encoder_stops(tmp_path, monkeypatch, capsys, official_b0, trainer, message):
    rc, _ = _convert(monkeypatch, tmp_path, official_b0, 1, 9, '-tr', trainer)
    assert rc == 1 and re.search(message, capsys.readouterr().err)


def test_prediction_with_another_trainers_checkpoint_names_both_networks(tmp_path):
    """A stock nnU-Net checkpoint labelled as an EMCAD trainer's (copied into the wrong results folder)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = make_plans(5, [64, 64])
    stock = build(nnUNetTrainer, plans)
    (tmp_path / 'fold_0').mkdir()
    (tmp_path / 'plans.json').write_text(json.dumps(plans))
    (tmp_path / 'dataset.json').write_text(json.dumps(DATASET_JSON))
    torch.save({'trainer_name': 'nnUNetTrainerEMCAD', 'init_args': {'configuration': '2d'},
                'network_weights': stock.network.state_dict()}, tmp_path / 'fold_0' / 'checkpoint_final.pth')
    predictor = nnUNetPredictor(device=torch.device('cpu'))
    with pytest.raises(CheckpointError) as info:
        predictor.initialize_from_trained_model_folder(str(tmp_path), (0,))
    message = str(info.value)
    assert re.search(r'weights of a stock nnU-Net U-Net .* do not fit the model; nothing was loaded', message)
    assert 'This network is EMCAD over an nnU-Net encoder' in message and 'Use the trainer (-tr)' in message


def _timm_cache_entry(home, weights: dict) -> None:
    """``weights`` as the Hugging Face hub cache under ``home`` holds timm's ImageNet pvt_v2_b0 after a download."""
    from safetensors.torch import save_file

    repo, revision = home / 'hub' / 'models--timm--pvt_v2_b0.in1k', '0' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    (repo / 'snapshots' / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, repo / 'snapshots' / revision / 'model.safetensors')


def test_pvt_weights_set_to_timm_come_through_timms_pretrained_cache_offline(tmp_path):
    import timm

    imagenet = timm.create_model('pvt_v2_b0', pretrained=False).state_dict()  # stands in for the download
    _timm_cache_entry(tmp_path / 'hf', imagenet)
    torch.save(imagenet, tmp_path / 'expected.pth')
    # a fresh interpreter: the hub reads HF_HOME and HF_HUB_OFFLINE when it is imported
    code = ("import torch; from nnunet_emcad.model.checkpoints import timm_pretrained_weights as w; "
            "from nnunet_emcad.model.emcad import create_emcad_pvt; "
            f"got, want = w('pvt_v2_b0'), torch.load({str(tmp_path / 'expected.pth')!r}); "
            "create_emcad_pvt('pvt_v2_b0', 3, 1).encoder.load_pretrained(got); "
            "print(sorted(got) == sorted(k for k in want if not k.startswith('head.')) "
            "and all(torch.equal(got[k], want[k]) for k in got))")
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == 'True', proc.stderr[-3000:]
    # nothing in the cache, and no hub to reach: the error names both ways out
    env['HF_HOME'] = str(tmp_path / 'empty')
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r'CheckpointError: timm could not fetch the ImageNet pvt_v2_b0 weights .*reach the Hugging '
                     r'Face hub once .* or put the checkpoint in a folder', proc.stderr), proc.stderr[-3000:]


def test_a_pvt_trainer_told_timm_loads_what_timms_pretrained_mechanism_gives(monkeypatch):
    import timm

    imagenet = timm.create_model('pvt_v2_b0', pretrained=False, num_classes=0).state_dict()
    asked = []
    monkeypatch.setattr(pvt, 'timm_pretrained_weights', lambda variant: asked.append(variant) or imagenet)
    monkeypatch.setenv(PVT_WEIGHTS_ENV, 'timm')
    trainer = T.nnUNetTrainerEMCAD_PVTb0(make_plans(5, [64, 64]), '2d', 0, DATASET_JSON, device=torch.device('cpu'))
    assert asked == ['pvt_v2_b0']  # fetched at construction, before nnU-Net writes anything
    # nnU-Net's initialize infers the data set's format from the file endings of its preprocessed folder
    os.makedirs(trainer.preprocessed_dataset_folder, exist_ok=True)
    open(os.path.join(trainer.preprocessed_dataset_folder, 'case_0.b2nd'), 'w').close()
    trainer.initialize()
    loaded = trainer.network.encoder.body.state_dict()
    assert torch.equal(loaded['stages_0.blocks.0.attn.q.weight'], imagenet['stages.0.blocks.0.attn.q.weight'])
    with open(trainer.log_file) as f:
        assert "loaded ImageNet pvt_v2_b0 weights through timm's pretrained cache" in f.read()
