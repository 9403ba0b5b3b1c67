"""Patch-folder mode: a directory of PNG/JPEG/TIFF images → batches of equal-shape pieces for ``trainer.predict``.

Every image is cut into *pieces* the network can take (frames: **image px**, origin at the top-left of the image):

* an image no larger than ``patch_size`` on either side is one piece, padded at the bottom/right to a multiple of the
  network's stride (a ``patch_size`` × ``patch_size`` image is therefore one unpadded piece);
* a larger image is tiled like a slide level (:class:`wsiseg.data.grid.TileGrid`: ``patch_size`` tiles with
  ``overlap``, the last row/column padded past the edge) and the writer blends the tiles back
  (:func:`wsiseg.data.grid.blend_window`).

Images are never resized; the writer crops every prediction back to the input's size. Pieces of one shape share
batches, so the network always sees rectangular batches; the batch plan is fixed in input order, deterministic.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from wsiseg.data.grid import TileGrid, check_patch_size
from wsiseg.data.slide import rgba_to_rgb
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
PAD_MODES = ("white", "replicate")
# PIL modes with 8 bits per channel that convert to RGB without guessing a value range.
_RGB_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


@dataclass(frozen=True)
class PatchImage:
    """One input image and the pieces it is cut into.

    Attributes:
        path: the file.
        rel: its path relative to ``input_dir`` (POSIX separators).
        key: output name relative to ``output_dir``, without the ``_heatmap.png`` / ``_mask.png`` ending: ``rel``
            without its extension (with it, when two inputs of one folder share a stem).
        size: (W, H) image px.
        origins: (K, 2) int64 piece origins (x, y), image px, raster order.
        piece: (h, w) shape of every piece, px (bottom/right padded past the image).
        mtime: the file's modification time, s since the epoch.
        stamp: ``<size in bytes>:<mtime in ns>`` of the file when planned: a resumed run redoes an image whose file
            changed, even with its modification time set back.
    """

    path: Path
    rel: str
    key: str
    size: tuple[int, int]
    origins: np.ndarray
    piece: tuple[int, int]
    mtime: float
    stamp: str = ""

    @property
    def tiled(self) -> bool:
        """True when the image is larger than one patch and its pieces are blended back."""
        return len(self.origins) > 1


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def plan_pieces(
    size: tuple[int, int], patch_size: int, overlap: int, multiple: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pieces of an image of ``size`` (W, H) image px: ``(origins (K, 2) int64 (x, y), (h, w) piece shape)``.

    An image with both sides ``<= patch_size`` is one piece at (0, 0) padded up to multiples of ``multiple`` px; a
    larger one is tiled by ``TileGrid(size, patch_size, overlap)`` with ``patch_size`` × ``patch_size`` pieces.

    Example::

        >>> plan_pieces((100, 70), 256, 0, 16)[1]
        (80, 112)
        >>> plan_pieces((300, 200), 256, 0, 16)[0].tolist()
        [[0, 0], [256, 0]]
    """
    width, height = size
    if width <= patch_size and height <= patch_size:
        return np.zeros((1, 2), np.int64), (_round_up(height, multiple), _round_up(width, multiple))
    return TileGrid((width, height), patch_size, overlap).origins(), (patch_size, patch_size)


def plan_batches(images: Sequence[PatchImage], indices: Iterable[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Group the pieces of ``images[i]`` for ``i`` in ``indices`` into batches of one piece shape.

    Pieces are visited in image order; each shape fills its own open batch, which is emitted as soon as it holds
    ``batch_size`` pieces. Unfilled batches follow at the end, in order of their first piece. Every piece appears
    exactly once and the plan depends only on the inputs (deterministic).

    Returns:
        batches of ``(image index, piece index)`` pairs.
    """
    open_batches: dict[tuple[int, int], list[tuple[int, int]]] = {}
    batches: list[list[tuple[int, int]]] = []
    for index in indices:
        image = images[index]
        for piece_index in range(len(image.origins)):
            batch = open_batches.setdefault(image.piece, [])
            batch.append((index, piece_index))
            if len(batch) == batch_size:
                batches.append(batch)
                del open_batches[image.piece]
    batches.extend(open_batches.values())
    return batches


def list_images(input_dir: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``input_dir`` (recursively) whose extension is in ``extensions`` (case-insensitive).

    Hidden files and folders (name starting with ``.``: partial writes, ``.hydra``, macOS ``._*`` files) are left out.
    Sorted by relative POSIX path, so the order does not depend on the file system.
    """
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found = []
    for path in input_dir.rglob("*"):
        rel = path.relative_to(input_dir)
        if path.suffix.lower() in wanted and not any(part.startswith(".") for part in rel.parts) and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(input_dir).as_posix())


def output_keys(input_dir: Path, paths: Sequence[Path]) -> list[str]:
    """One output key per image, unique within the run: its path relative to ``input_dir`` without the extension, or
    with it when two images of one folder share a stem (``x.png`` and ``x.jpg`` become ``x.png`` and ``x.jpg``)."""
    stems: dict[str, int] = {}
    for path in paths:
        stem = path.relative_to(input_dir).with_suffix("").as_posix()
        stems[stem] = stems.get(stem, 0) + 1
    keys: list[str] = []
    taken: set[str] = set()
    for path in paths:
        rel = path.relative_to(input_dir).as_posix()
        stem = path.relative_to(input_dir).with_suffix("").as_posix()
        key = stem if stems[stem] == 1 and stem not in taken else rel
        n = 1
        while key in taken:  # only for names such as x.png next to x.png.jpg
            n += 1
            key = f"{rel}-{n}"
        taken.add(key)
        keys.append(key)
    return keys


def _check_mode(path: Path, mode: str) -> None:
    if mode not in _RGB_MODES:
        raise UserInputError(
            f"image '{path}' has pixel mode '{mode}' (16-bit, float or multi-channel), which patch mode does not "
            "read: convert it to 8-bit RGB"
        )


def read_header(path: Path) -> tuple[int, int]:
    """(W, H) of an image from its header (no pixel decoding).

    Raises:
        UserInputError: the file cannot be identified as an image, or its pixel mode is not 8-bit.
    """
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except Image.DecompressionBombError as exc:
        raise UserInputError(
            f"image '{path}' is too large for patch mode ({exc}): run it as a slide (data=slides)"
        ) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, OSError... for broken files
        raise UserInputError(f"image '{path}' cannot be read: {type(exc).__name__}: {exc}") from None
    _check_mode(path, mode)
    return size


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image as (H, W, 3) uint8 RGB; transparent pixels are composited over white (as slides are).

    Multi-page files give their first page. EXIF orientation is not applied: the pixels are used as stored.

    Raises:
        UserInputError: the file cannot be decoded (truncated, corrupt) or its mode is not 8-bit.
    """
    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode)
            im.load()
            if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                return rgba_to_rgb(np.asarray(im.convert("RGBA")))
            return np.asarray(im.convert("RGB"))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"image '{path}' cannot be decoded: {type(exc).__name__}: {exc}") from None


def cut_piece(rgb: np.ndarray, x: int, y: int, shape: tuple[int, int], pad: str) -> np.ndarray:
    """The ``shape`` (h, w) piece of ``rgb`` (H, W, 3) at image px (x, y), padded past the bottom/right edge with white
    (``pad='white'``) or the edge pixels (``pad='replicate'``)."""
    h, w = shape
    crop = rgb[y : y + h, x : x + w]
    ch, cw = crop.shape[:2]
    if (ch, cw) == (h, w):
        return crop
    if pad == "replicate":
        return np.pad(crop, ((0, h - ch), (0, w - cw), (0, 0)), mode="edge")
    out = np.full((h, w, 3), 255, np.uint8)
    out[:ch, :cw] = crop
    return out


def _only_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for :class:`PatchBatchDataset` with ``batch_size=1``: the item already is a batch."""
    return items[0]


class PatchBatchDataset(Dataset):
    """Item ``b`` is whole batch ``b`` of a batch plan (load it with ``batch_size=1, collate_fn=_only_item``).

    Each item is a dict: ``image`` (N, 3, h, w) uint8 RGB pieces, ``image_index`` / ``piece_index`` (N,) int64 (into
    the datamodule's ``images`` and that image's ``origins``), ``x`` / ``y`` (N,) int64 piece origins, image px, and
    ``error`` (N strings: empty, or why the image could not be decoded — its pieces are then white).
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
            "image_index": meta[:, 0],
            "piece_index": meta[:, 1],
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
        check_patch_size(patch_size)
        if not 0 <= overlap < patch_size:
            raise UserInputError(f"data.overlap must satisfy 0 <= overlap < patch_size ({patch_size}), got {overlap}")
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
        if num_workers < 0:
            raise UserInputError(f"data.num_workers must be >= 0 (0 reads in the main process), got {num_workers}")
        if prefetch_factor < 1:
            raise UserInputError(
                f"data.prefetch_factor must be >= 1 (batches read ahead per worker), got {prefetch_factor}"
            )
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
        if self.patch_size % stride:
            raise UserInputError(
                f"data.patch_size={self.patch_size} is not a multiple of the network's stride {stride}: "
                f"use e.g. {max(stride, self.patch_size // stride * stride)}"
            )
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
        from wsiseg.batch_size import default_batch_size  # not resolved by an entry point: the device's default

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
