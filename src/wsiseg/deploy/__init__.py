"""``wsiseg-export``: a checkpoint in, a verified ONNX, TorchScript or OpenVINO IR file (plus a JSON sidecar) out,
optionally quantised to INT8 on tissue tiles.

Modules, by role (import a name from the module that defines it; this package imports nothing, so that
``import wsiseg.deploy`` stays cheap):

- :mod:`~wsiseg.deploy.command`: the console entry point ``wsiseg-export`` (Hydra glue only);
- :mod:`~wsiseg.deploy.export`: :class:`~wsiseg.deploy.export.ExportOptions` (the ``export`` config section), the
  registry of exporters by ``export.format`` and :func:`~wsiseg.deploy.export.run_export` (write, verify, quantise,
  publish, sidecar);
- :mod:`~wsiseg.deploy.exporter`: the interface each format implements;
- :mod:`~wsiseg.deploy.onnx`, :mod:`~wsiseg.deploy.torchscript`, :mod:`~wsiseg.deploy.openvino`: one exporter per
  format, with its verification;
- :mod:`~wsiseg.deploy.verify`: what verification shares (random inputs, comparison, tolerances, the error);
- :mod:`~wsiseg.deploy.calibration`: what INT8 shares (tissue tiles, agreement with FP32, the Dice floor);
- :mod:`~wsiseg.deploy.int8_onnx`, :mod:`~wsiseg.deploy.int8_openvino`: the two quantisers (onnxruntime QDQ, NNCF).
"""
