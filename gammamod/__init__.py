"""gammamod: a deployment pipeline for Mixture-of-Depths multimodal LLMs.

The stages live in sibling packages: ``gammamod.export`` (checkpoint -> PyTorch model -> ONNX),
``gammamod.engines`` (TensorRT), ``gammamod.runtime`` (torch-free generation),
``gammamod.calib`` and ``gammamod.validate``. This package holds the command line and the
manifest that ties the stages together. Importing it never imports torch.
"""

__version__ = "0.1.0"
