"""Model-only throughput of the CPU network paths, measured side by side in one process, interleaved rounds.

    .venv/bin/python scripts/bench_cpu_backends.py --onnx demo.onnx --rounds 5 --tiles 32 --size 512

Each round times every case once on the same uint8 tiles (normalisation, network, activation and reduction: what
``SegmentationModule`` runs per batch): eager PyTorch FP32 (channels_last) at batch 1, 2 and 16, onnxruntime FP32 and
OpenVINO FP32 at batch 2 and 16, and with ``--int8`` OpenVINO on the INT8 export at batch 2 and 16. Prints
patches/s per case (median over rounds, min-max) and each case's largest |Δp| against eager FP32. Figures depend
on the machine: say its kind (``lscpu`` flags avx2 / avx512_bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from wsiseg.config import asset_path
from wsiseg.model import Unet
from wsiseg.module import SegmentationModule
from wsiseg.runtimes.onnxruntime import OnnxRuntimeNet


def cases(onnx: Path, int8: Path | None = None) -> dict[str, tuple[SegmentationModule, int]]:
    def torch_module() -> SegmentationModule:
        return SegmentationModule(Unet(3, 1, base_width=8), checkpoint=asset_path("demo_unet.pt"), compile=False)

    out: dict[str, tuple[SegmentationModule, int]] = {}
    for batch in (1, 2, 16):
        module = torch_module()
        module.prepare("cpu")
        out[f"torch fp32 b{batch}"] = (module, batch)
    for batch in (2, 16):
        out[f"onnxruntime fp32 b{batch}"] = (SegmentationModule(OnnxRuntimeNet(onnx)), batch)
    try:
        from wsiseg.runtimes.openvino import OpenVinoNet

        for batch in (2, 16):
            out[f"openvino fp32 b{batch}"] = (SegmentationModule(OpenVinoNet(onnx)), batch)
        if int8 is not None:  # a wsiseg-export export.quantize=int8 file of the same network
            for batch in (2, 16):
                out[f"openvino int8 b{batch}"] = (SegmentationModule(OpenVinoNet(int8)), batch)
    except Exception as exc:  # OpenVINO not installed
        print(f"openvino skipped: {exc}")
    return out


def timed(module: SegmentationModule, tiles: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            outputs.append(module(tiles[i : i + batch]).float())
    return len(tiles) / (time.perf_counter() - start), torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True, help="the demo network exported by wsiseg-export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--int8", type=Path, default=None, help="its export.quantize=int8 export, also timed")
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.tiles, 3, args.size, args.size), generator=generator, dtype=torch.uint8)
    all_cases = cases(args.onnx, args.int8)
    rates: dict[str, list[float]] = {name: [] for name in all_cases}
    diffs: dict[str, float] = {}
    reference = None
    for module, batch in all_cases.values():  # warm-up (first calls compile / allocate)
        timed(module, tiles[: max(batch, 2)], batch)
    for _ in range(args.rounds):
        for name, (module, batch) in all_cases.items():
            rate, out = timed(module, tiles, batch)
            rates[name].append(rate)
            if reference is None:
                reference = out
            diffs[name] = float((out - reference).abs().max())
    threads = torch.get_num_threads()
    print(f"{args.tiles} tiles of {args.size}², {args.rounds} interleaved rounds, torch threads {threads}")
    print(f"{'case':<22} {'patches/s':>10} {'min-max':>15} {'max |dp| vs torch b1':>22}")
    best_torch = max(statistics.median(v) for k, v in rates.items() if k.startswith("torch"))
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"{name:<22} {median:>10.2f} {min(values):>7.2f}-{max(values):<7.2f} {diffs[name]:>22.2e}"
            f"   {median / best_torch:.2f}x best torch"
        )


if __name__ == "__main__":
    main()
