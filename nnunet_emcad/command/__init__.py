"""The ``nnunet-emcad`` command: the CLI, the demo and its data, nnU-Net's console scripts run from Python, and
where the package looks outside itself. Builds on the adapter (``nnunet_emcad.nnunet``) and the model."""
