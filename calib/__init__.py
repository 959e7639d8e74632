"""Calibration: what a deployer asks before building engines.

* ``calib arank``: gamma-MoD's ARank, the rank of each layer's attention maps, and which layers
  can be MoD layers;
* ``calib capacity``: the static capacity each MoD layer needs so the deployed graph keeps what the
  trained model keeps (``gammamod export --capacity`` reads its file);
* ``calib quantize``: INT8 / INT4 / FP8 artifacts with explicit Q/DQ that ONNX Runtime and
  TensorRT both take.
"""
