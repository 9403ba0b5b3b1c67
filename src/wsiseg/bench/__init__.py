"""``wsiseg-bench``: naive per-patch inference vs the optimised pipeline, with the read, model and host bounds.

All cases run on the same tiles in one process, one after the other, so their ratios are measured side by side:

1. **naive** — the replaced script's loop: read one region with OpenSlide, preprocess on the CPU, FP32 batch 1,
   result back to the host, one tile at a time;
2. **optimised** — the real ``wsiseg-predict`` pipeline (DataLoader workers, the trainer's precision, channels_last,
   optional compile, the writer included);
3. **read bound** — the data pipeline alone (workers reading and decoding tiles, nothing else);
4. **model bound** — the module on device-resident batches;
5. **host bound** — the pipeline with a zero-cost network (:mod:`wsiseg.bench.host`): the ceiling any device reaches
   on this host, with the host's CPU time per tile by thread.

    wsiseg-bench                                   # generated slide, demo-sized defaults
    wsiseg-bench bench.slide=/data/test_040.tif model=unet_camelyon trainer=gpu model.compile=true
    wsiseg-bench data=patches data.input_dir=patches/ writer=patches   # per-image loop vs batched, images/s

Modules, by role (import a name from the module that defines it; this package imports nothing, so that
``import wsiseg.bench`` stays cheap):

- :mod:`~wsiseg.bench.command`: the console entry point ``wsiseg-bench`` (Hydra glue only);
- :mod:`~wsiseg.bench.options`: :class:`~wsiseg.bench.options.BenchOptions`, the ``bench`` config section;
- :mod:`~wsiseg.bench.run`: runs every case on one slide (:func:`~wsiseg.bench.run.run_bench`) or a patch folder;
- :mod:`~wsiseg.bench.cases`: the timed cases themselves (naive loop, model bound, precision agreement) and the timer;
- :mod:`~wsiseg.bench.host`: the host-bound case (zero-cost network);
- :mod:`~wsiseg.bench.peers`: the peers timed beside the pipeline (MONAI);
- :mod:`~wsiseg.bench.ddp`: the whole-run CPU DDP timings;
- :mod:`~wsiseg.bench.hardware`: FLOP per tile and measured matrix-multiply peaks;
- :mod:`~wsiseg.bench.report`: the summary's warnings and figures, and the printed table.
"""
