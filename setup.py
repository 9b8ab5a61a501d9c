from setuptools import find_packages, setup

setup(
    name='nnunet-emcad',
    version='0.1.0',
    description='EMCAD (CVPR 2024) decoders for nnU-Net v2: PVTv2 and residual encoders, trainers, benchmarks',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['nnunet_emcad', 'nnunet_emcad.*']),
    install_requires=[
        'nnunetv2>=2.8.1,<2.9',
        'torch>=2.1',
        'torchvision',
        'timm>=1.0,<1.0.23',
        'dynamic-network-architectures',
        'batchgenerators',
        'SimpleITK',
        'acvl-utils',
    ],
    extras_require={'test': ['pytest', 'hypothesis']},
    entry_points={'console_scripts': ['nnunet-emcad = nnunet_emcad.cli:main']},
)
