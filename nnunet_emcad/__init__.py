"""nnunet-emcad: the EMCAD decoder (CVPR 2024) as an nnU-Net v2 plugin.

Importing the package is light (no torch): the start-up hook imports it in every interpreter. The public
names below load on first use.
"""
from importlib import import_module

__version__ = '0.2.0'

_EXPORTS = {
    'EMCADNet': 'nnunet_emcad.model.emcad',
    'EMCADDecoder': 'nnunet_emcad.model.emcad',
    'PVTv2Encoder': 'nnunet_emcad.model.emcad',
    'create_emcad_pvt': 'nnunet_emcad.model.emcad',
    'create_emcad_unet': 'nnunet_emcad.nnunet.plans',
    'emcad_pvt_v2_b0': 'nnunet_emcad.model.emcad',
    'emcad_pvt_v2_b2': 'nnunet_emcad.model.emcad',
    'load_official_checkpoint': 'nnunet_emcad.model.official',
    'load_pvt_v2_weights': 'nnunet_emcad.model.checkpoints',
    'CheckpointError': 'nnunet_emcad.model.checkpoints',
    'MutationLoss': 'nnunet_emcad.nnunet.losses',
    'PaperDiceCELoss': 'nnunet_emcad.nnunet.losses',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nnunet_emcad' has no attribute {name!r}")
