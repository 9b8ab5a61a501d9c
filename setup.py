"""Packaging; also installs ``zz_nnunet_emcad.pth`` at site-packages' root (wheel and editable installs), which
registers the trainers with nnU-Net at interpreter start (see ``nnunet_emcad/_startup.py``)."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = 'zz_nnunet_emcad.pth'


class BuildPyWithPth(build_py):
    """Put the start-up ``.pth`` at the wheel's root."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)


class EditableWheelWithPth(editable_wheel):
    """Put the start-up ``.pth`` into the editable wheel's root as well (its extra-files hook)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copy(PTH, os.path.join(installation_dir, PTH))


setup(
    name='nnunet-emcad',
    version='0.2.0',
    description='EMCAD (CVPR 2024) decoders for nnU-Net v2: PVTv2 and residual encoders, trainers, benchmarks',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['nnunet_emcad', 'nnunet_emcad.*']),
    package_data={'nnunet_emcad.nnunet': ['nnunet_trainers/*.py']},
    install_requires=[
        'nnunetv2>=2.8.1,<2.9',
        # torch.amp.is_autocast_available (blocks.py) first shipped in torch 2.4, torch.compiler.is_compiling in 2.3;
        # under torch 2.4 compiling PVTv2-b2's training step (drop path in recomputed stages) fails in AOT
        # autograd's partitioner (KeyError 'bernoulli_1'): tests/check_minimum_versions.sh
        'torch>=2.5',
        'torchvision',
        # PVTv2's gradient checkpointing is non-reentrant (safe under compile and DDP) from timm 1.0.16 on (its
        # wheels' timm/models/pvt_v2.py); its pretrained route (nnUNet_EMCAD_PVT_WEIGHTS=timm) imports
        # huggingface_hub's current API from 1.0.21 on (earlier releases import names huggingface_hub 1.0 removed:
        # tests/check_minimum_versions.sh); dynamic-network-architectures caps timm below 1.0.23
        'timm>=1.0.21,<1.0.23',
        'dynamic-network-architectures',
        'batchgenerators',
        'SimpleITK',
        'acvl-utils',
    ],
    # pytest 9.2's node ids lose pytest-xdist's test groups (pytest-dev/pytest-xdist issue 1386)
    extras_require={'test': ['pytest<9.2', 'pytest-xdist', 'hypothesis', 'pydicom', 'onnx', 'onnxscript',
                             'onnxruntime'],
                    'demo': ['pydicom'], 'onnx': ['onnx', 'onnxscript', 'onnxruntime']},
    cmdclass={'build_py': BuildPyWithPth, 'editable_wheel': EditableWheelWithPth},
    entry_points={'console_scripts': ['nnunet-emcad = nnunet_emcad.command.cli:main']},
)
