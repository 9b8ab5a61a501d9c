"""The model: EMCAD's blocks, its decoder over PVTv2 (timm) or nnU-Net's encoders, the network and its
constructors, official checkpoints and safe weight reading, cost counting. Knows nothing of nnU-Net's trainers or
the command line."""
