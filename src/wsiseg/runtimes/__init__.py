"""What runs the network: one class per runtime behind one small interface (:mod:`wsiseg.runtimes.base`).

- :mod:`~wsiseg.runtimes.base`: the :class:`~wsiseg.runtimes.base.Runtime` interface, the torch runtime and the one
  host round trip of every non-torch runtime;
- :mod:`~wsiseg.runtimes.choice`: ``model.runtime`` — the ``auto`` rule, in one place
  (:func:`~wsiseg.runtimes.choice.runtime_for`);
- :mod:`~wsiseg.runtimes.compiled`: the tile function compiled by ``torch.compile`` (one graph a run, eager
  fall-back);
- :mod:`~wsiseg.runtimes.files`: networks held in an exported file and their sidecar;
- :mod:`~wsiseg.runtimes.onnxruntime`, :mod:`~wsiseg.runtimes.openvino`: the file runtimes, and OpenVINO for a torch
  network;
- :mod:`~wsiseg.runtimes.onnx_graph`: writing a torch network as ONNX (for OpenVINO, INT8 and ``wsiseg-export``).

Nothing here imports Lightning, the data or the writers (the layering contract in ``pyproject.toml``).
"""
