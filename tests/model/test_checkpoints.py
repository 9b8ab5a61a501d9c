"""ImageNet PVTv2 weights from local files and the official checkpoint import."""
import pickle

import pytest
import timm
import torch

from helpers import official_state_dict, timm_to_original_pvt
from nnunet_emcad.model.checkpoints import CheckpointError, read_state_dict
from nnunet_emcad.model.emcad import PVTv2Encoder, create_emcad_pvt
from nnunet_emcad.model.official import load_official_checkpoint


@pytest.fixture(scope='module')
def imagenet_b0(tmp_path_factory):
    """A freshly built timm PVTv2-b0 saved in timm format (with its classifier) and in original PVT format."""
    torch.manual_seed(1)
    model = timm.create_model('pvt_v2_b0')
    state = model.state_dict()
    folder = tmp_path_factory.mktemp('weights')
    timm_file, original_file = folder / 'pvt_v2_b0_timm.pth', folder / 'pvt_v2_b0.pth'
    torch.save(state, timm_file)
    torch.save({timm_to_original_pvt(k): v for k, v in state.items()}, original_file)
    return state, timm_file, original_file


def _body_state(encoder: PVTv2Encoder) -> dict:
    return {k.replace('stages_', 'stages.'): v for k, v in encoder.body.state_dict().items()}


@pytest.mark.parametrize('fmt', ['timm', 'original'])
def test_pretrained_pvt_weights_load_from_either_format(imagenet_b0, fmt):
    state, timm_file, original_file = imagenet_b0
    encoder = PVTv2Encoder('pvt_v2_b0', in_channels=3, pretrained=timm_file if fmt == 'timm' else original_file)
    loaded = _body_state(encoder)
    assert set(loaded) == {k for k in state if not k.startswith('head.')}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_pretrained_weights_load_into_a_built_encoder(imagenet_b0):
    state, _, original_file = imagenet_b0
    encoder = PVTv2Encoder('pvt_v2_b0', in_channels=1)
    encoder.load_pretrained(original_file)
    for key, value in _body_state(encoder).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_pretrained_weights_with_grey_stem_and_with_timm_in_chans(imagenet_b0):
    state, timm_file, _ = imagenet_b0
    grey = PVTv2Encoder('pvt_v2_b0', in_channels=1, pretrained=timm_file)
    assert grey.stem is not None
    torch.testing.assert_close(grey.body.patch_embed.proj.weight, state['patch_embed.proj.weight'])
    two = PVTv2Encoder('pvt_v2_b0', in_channels=2, grey_stem=False, pretrained=timm_file)
    assert two.stem is None and two.body.patch_embed.proj.in_channels == 2
    assert [f.shape[1] for f in two(torch.randn(1, 2, 64, 64))] == [32, 64, 160, 256]


def test_weights_of_another_variant_fail_with_key_lists(imagenet_b0):
    _, timm_file, _ = imagenet_b0
    with pytest.raises(CheckpointError) as info:
        PVTv2Encoder('pvt_v2_b2', pretrained=timm_file)
    message = str(info.value)
    assert 'nothing was loaded' in message
    assert 'missing keys' in message and 'stages.0.blocks.2.norm1.weight' in message
    assert 'shape mismatches' in message and 'patch_embed.proj.weight' in message


def test_unreadable_files_are_named(tmp_path, imagenet_b0):
    with pytest.raises(CheckpointError, match='does not exist'):
        read_state_dict(tmp_path / 'nope.pth')
    _, timm_file, _ = imagenet_b0
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(timm_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='cannot read weight file'):
        read_state_dict(truncated)
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot read weight file'):
        read_state_dict(text)
    torch.save({'epoch': torch.tensor(3), 'lr': 0.1}, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match='not a state dict'):
        read_state_dict(tmp_path / 'odd.pth')


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'bad.pth'
    with open(bad, 'wb') as f:
        pickle.dump({'weight': _Planted(str(marker))}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(bad)
    assert not marker.exists()
    with open(bad, 'rb') as f:
        pickle.load(f)  # the plant is real: an unrestricted unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize('variant,in_channels', [('pvt_v2_b0', 1), ('pvt_v2_b2', 1), ('pvt_v2_b0', 3)])
def test_official_checkpoint_round_trip(tmp_path, variant, in_channels):
    torch.manual_seed(0)
    ours = create_emcad_pvt(variant, num_classes=5, in_channels=in_channels, upsample_outputs='all').eval()
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / 'best.pth'
    torch.save(official_state_dict(ours), path)
    imported = load_official_checkpoint(path)
    assert imported.encoder.body.feature_info.channels() == ours.encoder.output_channels
    assert (imported.encoder.stem is not None) == (in_channels == 1)
    x = torch.randn(2, in_channels, 64, 96)
    with torch.no_grad():
        ours.decoder.deep_supervision = False
        torch.testing.assert_close(imported(x), ours(x))
        imported.decoder.deep_supervision = True
        outs = imported(x)
    assert len(outs) == 4 and all(o.shape == (2, 5, 64, 96) for o in outs)


def test_official_import_reads_the_ablation_knobs():
    ours = create_emcad_pvt('pvt_v2_b0', num_classes=2, in_channels=1, kernel_sizes=(3, 5), expansion_factor=4,
                            add=False, lgag_ks=1)
    imported = load_official_checkpoint(official_state_dict(ours))
    mscb = imported.decoder.mscb[0]
    assert [b[0].kernel_size[0] for b in mscb.msdc.dwconvs] == [3, 5]
    assert mscb.pconv1[0].out_channels == 4 * 32 and not mscb.add
    assert imported.decoder.lgag[0].W_g[0].kernel_size == (1, 1)


def test_decoder_only_checkpoint_needs_the_variant():
    decoder_only = {k: v for k, v in official_state_dict(create_emcad_pvt('pvt_v2_b2', 9, 1)).items()
                    if not k.startswith('backbone.')}
    with pytest.raises(CheckpointError, match="pass variant='pvt_v2_b2'"):
        load_official_checkpoint(decoder_only)
    assert load_official_checkpoint(decoder_only, variant='pvt_v2_b2').decoder.seg_layers[0].out_channels == 9
    with pytest.raises(CheckpointError, match='not an official EMCAD checkpoint'):
        load_official_checkpoint({'weight': torch.zeros(1)})
