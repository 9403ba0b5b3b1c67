"""Distribution strategies without a Trainer: real gloo process groups in two processes; the trainer is only the two
things a strategy asks of it (its predict DataLoader with a distributed sampler, and a barrier)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from tests.writers.conftest import dense, planned_slide
from wsiseg.writers.distribution import SingleProcess, SlideSharded, TileSharded
from wsiseg.writers.stitcher import Stitcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stand_in_trainer(dataset_size: int, rank: int, world: int) -> SimpleNamespace:
    # DistributedSampler pads 15 indices to 16 over 2 ranks: index 0 is handed to both
    sampler = DistributedSampler(range(dataset_size), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(range(dataset_size), sampler=sampler, batch_size=4)
    return SimpleNamespace(
        predict_dataloaders=loader, strategy=SimpleNamespace(barrier=lambda name=None: dist.barrier())
    )


def _rank(rank: int, world: int, port: int, out: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        slide = planned_slide("ddp", size=(192, 128), patch=64, overlap=32)
        n = slide.tiles_tissue
        trainer = _stand_in_trainer(n, rank, world)
        strategy = TileSharded(rank, world, 1)
        owned = strategy.claim(trainer)
        probs = np.random.default_rng(5).random((n, 1, 64, 64)).astype(np.float32)
        stitcher = Stitcher([slide], Path(out), rank=rank)
        handed = [int(i) for i in trainer.predict_dataloaders.sampler]
        mine = [i in owned for i in handed]
        stitcher.add_batch(probs[handed], [0] * len(handed), handed, [""] * len(handed), mine, 0.0)
        to_write = strategy.slides_to_write(stitcher, trainer)
        state = stitcher.state(0)
        results[rank] = {
            "owned": sorted(owned),
            "to_write": to_write,
            "seen": sorted(state.tiles_seen),
            "per_rank": state.tiles_per_rank,
            "mean": dense(state.store).tolist() if rank == 0 else None,
        }
        strategy.written(trainer)
        results[f"gathered{rank}"] = strategy.gather({"rank": rank}, trainer)
    finally:
        dist.destroy_process_group()


def _slide_rank(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = SimpleNamespace(strategy=SimpleNamespace(barrier=lambda name=None: dist.barrier()))
        strategy = SlideSharded(rank, world, [rank, rank + 2])
        results[rank] = {
            "claim": strategy.claim(trainer),  # type: ignore[arg-type]
            "to_write": strategy.slides_to_write(None, trainer),  # type: ignore[arg-type]
            "gathered": strategy.gather([f"row of rank {rank}"], trainer),  # type: ignore[arg-type]
        }
    finally:
        dist.destroy_process_group()


def test_slide_sharded_writes_its_own_slides_and_gathers_every_ranks_rows() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_slide_rank, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["claim"] is None  # every tile it is handed is its own
        assert results[rank]["to_write"] == [rank, rank + 2]
        assert results[rank]["gathered"] == [["row of rank 0"], ["row of rank 1"]]


def test_tile_sharded_claims_each_tile_once_and_rank0_merges_to_the_single_process_store(tmp_path: Path) -> None:
    slide = planned_slide("ddp", size=(192, 128), patch=64, overlap=32)
    n = slide.tiles_tissue
    assert n % 2, "an odd tile count makes the padding sampler repeat a tile"
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "ddp"), results), nprocs=2, join=True)
    owned = [set(results[r]["owned"]) for r in (0, 1)]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(n))
    assert results[0]["to_write"] == [0] and results[1]["to_write"] == []
    assert results["gathered0"] == results["gathered1"] == [{"rank": 0}, {"rank": 1}]
    assert results[0]["seen"] == list(range(n)) and results[0]["per_rank"] == [len(owned[0]), len(owned[1])]

    probs = np.random.default_rng(5).random((n, 1, 64, 64)).astype(np.float32)
    single = Stitcher([slide], tmp_path / "single")
    single.add_batch(probs, [0] * n, list(range(n)), [""] * n, [True] * n, 0.0)
    np.testing.assert_allclose(np.asarray(results[0]["mean"]), dense(single.state(0).store), rtol=1e-6, atol=1e-6)


def test_single_process_writes_every_slide_in_order() -> None:
    strategy = SingleProcess(2)
    stitcher = Stitcher([planned_slide("a"), planned_slide("b")], Path("/nonexistent"))
    assert strategy.in_slide_order and strategy.claim(None) is None  # type: ignore[arg-type]
    assert strategy.slides_to_write(stitcher, None) == [0, 1]  # type: ignore[arg-type]
