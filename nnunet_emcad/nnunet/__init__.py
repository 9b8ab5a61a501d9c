"""The nnU-Net adapter: plans -> networks, losses on nnU-Net's targets, the trainers nnU-Net finds by name, short
schedules, trained-model folders and ONNX export. Builds on the model (``nnunet_emcad.model``)."""
