"""The time breakdown finds every block and stage at its stride, leaves the network as it was, counts an
operator's bytes and FLOPs as they are, and times a compiled part with its compile seconds."""
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from torch import nn

from benchmarks.profiling import STAGE, Call, breakdown, record_calls, time_call, traffic
from nnunet_emcad.model.emcad import EMCADNet
from tiny_plans import build, make_plans


def _network(trainer: str) -> nn.Module:
    trainer = build(recursive_find_trainer_class_by_name(trainer), make_plans(5, [64, 64]))
    return trainer.network


def test_every_emcad_block_and_stage_is_recorded_once_per_call_at_its_stride_and_the_decoder_is_left_as_it_was(
        nnunet_folders):
    torch.manual_seed(0)
    net = _network('nnUNetTrainerEMCAD_Stride1')
    assert isinstance(net, EMCADNet)
    x = torch.randn(2, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        before = net(x)
    calls = record_calls(net, x)
    found = {}
    for c in calls:
        found.setdefault(c.kind, []).append(c.stride)
    assert found['encoder'] == [1]
    assert sorted(found[STAGE]) == sorted(found['SAB']) == sorted(found['CAB']) == [1, 2, 4, 8, 16]
    assert sorted(found['EUCB']) == sorted(found['LGAG']) == [1, 2, 4, 8]  # the deepest stage has no upsampling
    assert sorted(found['head']) == [1, 2, 4, 8, 16]
    # nnUNetTrainerEMCAD_Stride1 runs the decoder stages up to stride 4 again in backward
    assert {c.stride for c in calls if c.recomputed} == {1, 2, 4}
    assert not any(c.recomputed for c in calls if c.kind in ('encoder', 'head'))
    assert '_decode_stage' not in vars(net.decoder) and '_attend' not in vars(net.decoder)
    net.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), before, strict=True))
    assert [(c.kind, c.stride) for c in record_calls(net, x, only=-1)] == [(c.kind, c.stride) for c in calls]
    alone = record_calls(net, x, only=3)
    assert [bool(c.args or c.kwargs) for c in alone] == [i == 3 for i in range(len(calls))]
    stage = next(c for c in calls if c.kind == STAGE and c.stride == 1)
    with torch.no_grad():  # a recorded stage called on its recorded inputs gives that stage's output
        assert stage.fn(*stage.args).shape == (2, 32, 64, 64)


def test_a_narrow_refined_decoders_projections_and_refinement_are_recorded_outside_its_stages(nnunet_folders):
    x = torch.randn(2, 1, 64, 64)
    found = {}
    for c in record_calls(_network('nnUNetTrainerEMCAD_Stride2NarrowRefine'), x):
        found.setdefault(c.kind, []).append(c.stride)
    assert sorted(found['projection']) == sorted(found[STAGE]) == [2, 4, 8, 16]  # decoded from stride 2
    assert found['refinement'] == [1] and sorted(found['head']) == [2, 4, 8, 16]
    # the refinement runs after the stages, so never again in backward, even where stride-1 stages would
    calls = record_calls(_network('nnUNetTrainerEMCAD_Stride2Refine'), x)
    assert {c.stride for c in calls if c.recomputed} == {2, 4}
    assert not any(c.recomputed for c in calls if c.kind == 'refinement')


def test_stock_nnunet_blocks_are_its_transposed_convolutions_convolution_stages_and_heads(nnunet_folders):
    rows = breakdown(_network('nnUNetTrainer'), torch.randn(2, 1, 64, 64), repeats=1)
    kinds = {(r['kind'], r['stride']) for r in rows}
    assert kinds == {('encoder', 1)} | {(k, s) for k in ('transposed conv', 'conv stage', 'head') for s in (1, 2, 4, 8)}
    for r in rows:
        # backward is forward + backward less forward, each timed once: on a busy machine it can come out as 0
        assert r['forward_ms'] > 0 and r['backward_ms'] >= 0 and r['ops_forward'] >= 1 and r['bytes_forward'] > 0
        # prediction runs without deep supervision: the finest head alone
        assert (r['predict_ms'] > 0) == (r['kind'] != 'head' or r['stride'] == 1)


def test_a_recomputed_stage_adds_its_forward_again_in_backward(nnunet_folders):
    rows = {(r['kind'], r['stride']): r for r in breakdown(_network('nnUNetTrainerEMCAD_Stride1'),
                                                            torch.randn(1, 1, 64, 64), repeats=1)}
    assert {s for k, s in rows if k == 'recompute'} == {1, 2, 4}
    for stride in (1, 2, 4):
        again, stage = rows[('recompute', stride)], rows[(STAGE, stride)]
        assert again['backward_ms'] == stage['forward_ms'] and again['bytes_backward'] == stage['bytes_forward']
        assert 'forward_ms' not in again
    # finer stages move more bytes: the traffic follows the resolution
    assert rows[('MSCB', 1)]['bytes_forward'] > rows[('MSCB', 2)]['bytes_forward'] > rows[('MSCB', 4)]['bytes_forward']


def test_traffic_counts_each_operators_inputs_and_outputs_and_the_forward_flops():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    call = Call('conv', 1, conv, conv, (x,), {}, False)
    counted = traffic(call)
    out_bytes = 2 * 8 * 16 * 16 * 4
    assert counted['ops_forward'] == 1
    assert counted['bytes_forward'] == x.nbytes + conv.weight.nbytes + conv.bias.nbytes + out_bytes
    assert counted['flops_forward'] == 2 * (2 * 8 * 16 * 16) * (4 * 3 * 3)
    assert counted['ops_backward'] >= 1 and counted['bytes_backward'] >= out_bytes + x.nbytes + conv.weight.nbytes
    assert conv.weight.grad is None  # the gradients it made are gone


def test_a_compiled_part_is_timed_after_its_first_call_which_pays_the_compile():
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    call = Call('conv', 1, conv, conv, (torch.randn(2, 4, 16, 16),), {}, False)
    timed = time_call(call, repeats=2, compiled=True)
    assert timed['compile_s'] > 10 * max(timed['forward_ms'], timed['predict_ms']) / 1000 > 0
    assert timed['backward_ms'] > 0 and conv.training
