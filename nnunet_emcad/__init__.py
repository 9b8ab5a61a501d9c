"""nnunet-emcad: the EMCAD decoder (CVPR 2024) as an nnU-Net v2 plugin.

Importing the package is light (no torch): the start-up hook imports it in every interpreter. The public
names below load on first use.
"""
from importlib import import_module

__version__ = '0.2.0'

_EXPORTS = {
    'EMCADNet': 'nnunet_emcad.emcad',
    'EMCADDecoder': 'nnunet_emcad.emcad',
    'PVTv2Encoder': 'nnunet_emcad.emcad',
    'create_emcad_pvt': 'nnunet_emcad.emcad',
    'create_emcad_unet': 'nnunet_emcad.plans',
    'emcad_pvt_v2_b0': 'nnunet_emcad.emcad',
    'emcad_pvt_v2_b2': 'nnunet_emcad.emcad',
    'load_official_checkpoint': 'nnunet_emcad.official',
    'load_pvt_v2_weights': 'nnunet_emcad.checkpoints',
    'CheckpointError': 'nnunet_emcad.checkpoints',
    'MutationLoss': 'nnunet_emcad.losses',
    'PaperDiceCELoss': 'nnunet_emcad.losses',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nnunet_emcad' has no attribute {name!r}")
