"""Patch-folder mode: a directory of PNG/JPEG/TIFF images → batches of equal-shape pieces for ``trainer.predict``.

Every image is cut into *pieces* the network can take (:mod:`wsiseg.data.patch_images`: one padded piece for an image
no larger than ``patch_size``, a :class:`~wsiseg.data.grid.TileGrid` of ``patch_size`` tiles for a larger one, blended
back by the writer). Images are never resized; the writer crops every prediction back to the input's size. Pieces of
one shape share batches, so the network always sees rectangular batches; the batch plan is fixed in input order,
deterministic. Batches carry the slide path's keys: ``slide_index`` (the image) and ``tile_index`` (its piece).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsiseg.data.patch_images import (
    IMAGE_EXTENSIONS,
    PatchImage,
    cut_piece,
    list_images,
    load_rgb,
    output_keys,
    plan_batches,
    plan_pieces,
    read_header,
)
from wsiseg.data.validation import check_data_options, check_stride
from wsiseg.errors import UserInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "PAD_MODES",
    "PatchImage",
    "PatchPlan",
    "PatchBatchDataset",
    "PatchFolderDataModule",
    "list_images",
    "output_keys",
    "load_rgb",
    "plan_batches",
    "plan_pieces",
]

log = logging.getLogger(__name__)

PAD_MODES = ("white", "replicate")


def _only_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`PatchBatchDataset` with ``batch_size=1``: the item already is a batch."""
    return items[0]


class PatchBatchDataset(Dataset):
    """Item ``b`` is whole batch ``b`` of a batch plan (load it with ``batch_size=1, collate_fn=_only_item``).

    Each item is a dict with the slide path's keys (:class:`wsiseg.data.datasets.SlideTileDataset`): ``image``
    (N, 3, h, w) uint8 RGB pieces, ``slide_index`` / ``tile_index`` (N,) int64 (into the plan's ``images`` and that
    image's ``origins``), ``x`` / ``y`` (N,) int64 piece origins, image px, and ``error`` (N strings: empty, or why the
    image could not be decoded — its pieces are then white).
    """

    def __init__(self, images: Sequence[PatchImage], batches: list[list[tuple[int, int]]], pad: str = "white") -> None:
        self.images, self.batches, self.pad = images, batches, pad
        # images that failed to decode in this process: not decoded again for their other pieces' batches (a corrupt
        # 12000x9000 image has hundreds of pieces)
        self._failed: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pieces, errors, origins = [], [], []
        decoded: dict[int, np.ndarray | str] = {}  # the pieces of a tiled image share one decode per batch
        for image_index, piece_index in self.batches[index]:
            image = self.images[image_index]
            if image_index in self._failed:
                decoded[image_index] = self._failed[image_index]
            if image_index not in decoded:
                try:
                    rgb = load_rgb(image.path)
                    if (rgb.shape[1], rgb.shape[0]) != image.size:
                        raise UserInputError(
                            f"image '{image.path}' decodes to {rgb.shape[1]}x{rgb.shape[0]} px but its header says "
                            f"{image.size[0]}x{image.size[1]}"
                        )
                    decoded[image_index] = rgb
                except UserInputError as exc:
                    decoded[image_index] = self._failed[image_index] = str(exc)
            rgb_or_error = decoded[image_index]
            x, y = (int(v) for v in image.origins[piece_index])
            origins.append((image_index, piece_index, x, y))
            if isinstance(rgb_or_error, str):
                errors.append(rgb_or_error)
                pieces.append(np.full((*image.piece, 3), 255, np.uint8))
            else:
                errors.append("")
                pieces.append(cut_piece(rgb_or_error, x, y, image.piece, self.pad))
        meta = torch.as_tensor(origins, dtype=torch.int64).view(-1, 4)
        return {
            "image": torch.from_numpy(np.stack(pieces)).permute(0, 3, 1, 2).contiguous(),
            "slide_index": meta[:, 0],
            "tile_index": meta[:, 1],
            "x": meta[:, 2],
            "y": meta[:, 3],
            "error": errors,
        }


@dataclass(frozen=True)
class PatchPlan:
    """What one patch-mode run does with the images of ``data.input_dir``.

    Attributes:
        input_dir: the folder the images were found in.
        patch_size: the network's patch side, px (``data.patch_size``).
        images: every readable image, in input order (dataset indices refer to this tuple).
        failed: ``(path, one-line reason)`` of images whose header cannot be read.
        kept: indices into ``images`` whose outputs are complete for this config (``resume=true``): not predicted.
        ignored: indices into ``images`` that are outputs of this run (``writer.output_dir`` inside ``input_dir``).
    """

    input_dir: Path
    patch_size: int = 512
    images: tuple[PatchImage, ...] = ()
    failed: tuple[tuple[Path, str], ...] = ()
    kept: tuple[int, ...] = ()
    ignored: tuple[int, ...] = ()

    @property
    def todo(self) -> list[int]:
        """Indices into ``images`` to predict, in input order."""
        leave = set(self.kept) | set(self.ignored)
        return [i for i in range(len(self.images)) if i not in leave]

    @property
    def tiles(self) -> int:
        """Network inputs (pieces) this run predicts."""
        return sum(len(self.images[i].origins) for i in self.todo)


class PatchFolderDataModule(pl.LightningDataModule):
    """Every PNG/JPEG/TIFF image under a folder, for prediction with ``writer=patches``.

    :meth:`plan_run` (called by the entry point with the network's stride) lists the images (recursively, sorted),
    reads their headers, plans their pieces and sets aside the images ``keep_complete`` accepts (``resume=true``) and
    those that are this run's own outputs (``outputs_of``); an image whose header cannot be read is logged by name and
    listed in the plan's ``failed`` (the writer reports it). ``predict_dataloader`` batches the remaining pieces by
    shape, and workers decode the images (a corrupt one yields white pieces with an ``error`` the writer reports).

    Args:
        input_dir: folder of images (``data.input_dir``).
        patch_size: the model's patch side, px: images of this size batch together; larger ones are tiled into it.
        overlap: overlap of the tiles of larger images, px, ``0 <= overlap < patch_size``.
        pad_multiple: pad small images to a multiple of this many px; None takes the network's stride (given to
            :meth:`plan_run`).
        pad: ``white`` (as past a slide's edge) or ``replicate`` (edge pixels) for the padding.
        extensions: file endings read (case-insensitive).
        batch_size: pieces per batch; None: the device's default (2 on CPUs, 16 on GPUs), resolved by the entry point.
        num_workers: DataLoader worker processes decoding images.
        pin_memory: pin host batches (only takes effect with CUDA).
        prefetch_factor: batches prefetched per worker.
        keep_complete: ``image → bool``: True for an image whose outputs are already complete for this run
            (``resume=true``); it is not predicted.
        outputs_of: ``images → resolved paths`` of the files this run writes for them (never read as inputs).

    Example::

        dm = PatchFolderDataModule("patches/", patch_size=256)
        plan = dm.plan_run(module.stride)
        trainer = Trainer(callbacks=[PatchWriter("out/", plan=plan)])
        trainer.predict(module, datamodule=dm, return_predictions=False)
    """

    def __init__(
        self,
        input_dir: str | Path,
        patch_size: int = 512,
        overlap: int = 0,
        pad_multiple: int | None = None,
        pad: str = "white",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        prefetch_factor: int = 4,
        keep_complete: Callable[[PatchImage], bool] | None = None,
        outputs_of: Callable[[Sequence[PatchImage]], set[Path]] | None = None,
    ) -> None:
        super().__init__()
        check_data_options(patch_size, overlap, num_workers, prefetch_factor)
        if pad_multiple is not None and (isinstance(pad_multiple, str) or pad_multiple < 1):
            raise UserInputError(
                f"data.pad_multiple must be a positive integer or null (the network's stride), got {pad_multiple}"
            )
        if pad not in PAD_MODES:
            raise UserInputError(f"data.pad must be one of {', '.join(PAD_MODES)}; got '{pad}'")
        if batch_size is not None and (isinstance(batch_size, str) or batch_size < 1):
            raise UserInputError(f"data.batch_size must be a positive integer or null (the device's), got {batch_size}")
        if not input_dir:
            raise UserInputError("data.input_dir is empty: pass data.input_dir=/path/to/patches")
        self.input_dir = Path(str(input_dir)).expanduser()
        self.patch_size, self.overlap, self.pad_multiple, self.pad = patch_size, overlap, pad_multiple, pad
        self.extensions = tuple(extensions)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.keep_complete = keep_complete or (lambda image: False)
        self.outputs_of = outputs_of or (lambda images: set())
        self._plan: PatchPlan | None = None

    def plan_run(self, stride: int = 16) -> PatchPlan:
        """List, read the headers of and plan every image once (pieces padded to ``pad_multiple`` or else
        ``stride``, the network's); later calls return the same plan.

        Raises:
            UserInputError: ``data.patch_size`` is not a multiple of ``stride``, or ``data.input_dir`` is missing,
                a file, or holds no images.
        """
        if self._plan is not None:
            return self._plan
        check_stride(self.patch_size, stride)
        multiple = int(self.pad_multiple or stride)
        if not self.input_dir.exists():
            raise UserInputError(f"data.input_dir '{self.input_dir}' does not exist: pass a folder of images")
        if not self.input_dir.is_dir():
            raise UserInputError(
                f"data.input_dir '{self.input_dir}' is a file, not a folder: pass the folder holding the images"
            )
        paths = list_images(self.input_dir, self.extensions)
        if not paths:
            raise UserInputError(
                f"data.input_dir '{self.input_dir}' holds no images ending in {', '.join(self.extensions)}: "
                "check the path or set data.extensions"
            )
        images: list[PatchImage] = []
        failed: list[tuple[Path, str]] = []
        for path, key in zip(paths, output_keys(self.input_dir, paths)):
            try:
                size = read_header(path)
                origins, piece = plan_pieces(size, self.patch_size, self.overlap, multiple)
            except UserInputError as exc:
                log.error("%s; skipped", exc)
                failed.append((path, str(exc)))
                continue
            rel = path.relative_to(self.input_dir).as_posix()
            stat = path.stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
            images.append(PatchImage(path, rel, key, size, origins, piece, stat.st_mtime, stamp))
        outputs = self.outputs_of(images)
        ignored = tuple(i for i, image in enumerate(images) if image.path.resolve() in outputs)
        kept = tuple(i for i, image in enumerate(images) if i not in ignored and self.keep_complete(image))
        self._plan = PatchPlan(self.input_dir, self.patch_size, tuple(images), tuple(failed), kept, ignored)
        log.info(
            "%s: %d image(s), %d unreadable; %d piece(s) in %d shape(s)",
            self.input_dir,
            len(images),
            len(failed),
            sum(len(image.origins) for image in images),
            len({image.piece for image in images}),
        )
        if ignored:
            log.info("%d file(s) in data.input_dir are outputs of this run; not read as inputs", len(ignored))
        return self._plan

    @property
    def plan(self) -> PatchPlan:
        """The run's plan (after :meth:`plan_run`)."""
        if self._plan is None:
            raise RuntimeError("PatchFolderDataModule.plan_run() has not run")
        return self._plan

    def batch_plan(self) -> list[list[tuple[int, int]]]:
        """The batches ``predict_dataloader`` yields: ``(image index, piece index)`` pairs, one piece shape each."""
        from wsiseg.hardware import default_batch_size  # not resolved by an entry point: the device's default

        batch_size = self.batch_size if self.batch_size is not None else default_batch_size()
        return plan_batches(self.plan.images, self.plan.todo, batch_size)

    def with_batch_size(self, batch_size: int) -> PatchFolderDataModule:
        """A copy of this data module (same options and plan) that batches ``batch_size`` tiles: how the entry point
        applies a resolved ``batch_size=auto`` without changing a built object."""
        clone = copy.copy(self)
        clone.batch_size = int(batch_size)
        return clone

    def predict_dataloader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            PatchBatchDataset(self.plan.images, self.batch_plan(), self.pad),
            batch_size=1,  # one item is one whole batch; a real batch sampler lets Lightning track batch indices
            collate_fn=_only_item,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )
