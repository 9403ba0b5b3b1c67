"""``SlideTileDataModule``: slides → tissue tiles → multi-worker DataLoader for ``trainer.predict``."""

from __future__ import annotations

import copy
import glob
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from wsiseg.data.datasets import SlideTileDataset, SlideTiles
from wsiseg.data.grid import TileGrid
from wsiseg.data.plan import RunPlan, output_names, slide_identity
from wsiseg.data.readers import READERS, TileReader, choose_reader
from wsiseg.data.resolution import declared_mpps
from wsiseg.data.sharding import SHARD_MODES
from wsiseg.data.slide import choose_level, open_slide, slide_mpp
from wsiseg.data.stain import StainPlan, StainTable
from wsiseg.data.tissue import read_thumbnail, tile_tissue_fractions, tissue_mask
from wsiseg.data.validation import check_data_options
from wsiseg.errors import NoProcessableSlideError, UserInputError
from wsiseg.hardware import default_workers, usable_cores

__all__ = ["SlideTileDataModule", "TissueOptions", "expand_slide_paths", "slides_in_folder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueOptions:
    """Tissue detection settings (``data.tissue.*``).

    Attributes:
        enabled: skip background tiles; off processes every tile of the grid.
        thumbnail_max_side: longer side of the thumbnail the mask is computed on, px.
        min_saturation: floor of the saturation threshold, 0-255.
        min_fraction: a tile is processed when its tissue fraction is above this (0 → any tissue at all).
    """

    enabled: bool = True
    thumbnail_max_side: int = 2048
    min_saturation: int = 20
    min_fraction: float = 0.0

    def __post_init__(self) -> None:
        """Raises UserInputError naming the ``data.tissue.*`` key outside its range."""
        if self.thumbnail_max_side < 16:
            raise UserInputError(
                f"data.tissue.thumbnail_max_side must be at least 16 px, got {self.thumbnail_max_side} (default 2048)"
            )
        if not 0 <= self.min_saturation <= 255:
            raise UserInputError(f"data.tissue.min_saturation must be in 0-255, got {self.min_saturation}")
        if not 0.0 <= self.min_fraction < 1.0:
            raise UserInputError(
                f"data.tissue.min_fraction must be in [0, 1) (a tile's tissue fraction above it is processed), "
                f"got {self.min_fraction}"
            )


def expand_slide_paths(slides: str | Sequence[str]) -> list[Path]:
    """Turn ``data.slides`` (one path, a folder, a glob, or a list of them) into a sorted-per-pattern list of paths.

    A folder stands for every regular file under it (sub-folders included, hidden ones not) that OpenSlide can open,
    sorted; a folder without any is kept as given, so validation says so. The files of one DICOM WSI series are one
    slide (:func:`one_file_per_dicom_series`). An existing file is taken literally even when
    its name holds glob characters (``slide[1].tif``); a glob that matches nothing is kept as given so validation
    reports it by name.
    """
    patterns = [slides] if isinstance(slides, (str, Path)) else list(slides)
    paths: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(str(pattern)).expanduser())
        if Path(pattern).is_dir():
            paths.extend(slides_in_folder(Path(pattern)) or [Path(pattern)])
            continue
        literal = Path(pattern).exists()
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) and not literal else [pattern]
        paths.extend(Path(m) for m in (matches or [pattern]))
    return one_file_per_dicom_series(paths)


def dicom_series(path: Path) -> str | None:
    """The DICOM series (``SeriesInstanceUID``) a file OpenSlide opens as a DICOM slide belongs to; None for any other
    file (or one OpenSlide cannot open: validation reports it)."""
    import openslide

    try:
        if not path.is_file() or openslide.OpenSlide.detect_format(str(path)) != "dicom":
            return None
        with openslide.OpenSlide(str(path)) as slide:
            return slide.properties.get("dicom.SeriesInstanceUID")
    except (openslide.OpenSlideError, OSError):
        return None


def one_file_per_dicom_series(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each DICOM WSI series kept once: OpenSlide reads a series (its levels and associated images, one
    file each, in one folder) from any of its files, so the first file of a series stands for the slide and the
    others are dropped (logged)."""
    seen: dict[str, Path] = {}
    kept = []
    for path in paths:
        series = dicom_series(path) if path.suffix.lower() == ".dcm" else None
        if series is not None and series in seen:
            log.info("'%s' is part of the DICOM series of '%s': one slide", path, seen[series])
            continue
        if series is not None:
            seen[series] = path
        kept.append(path)
    return kept


def slides_in_folder(folder: Path) -> list[Path]:
    """The regular files under ``folder`` (recursively, skipping hidden files and folders) whose format OpenSlide
    recognises (``OpenSlide.detect_format``: headers only), sorted by path."""
    import openslide

    found = []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.is_file() and openslide.OpenSlide.detect_format(str(path)) is not None:
            found.append(path)
    return found


class SlideTileDataModule(pl.LightningDataModule):
    """Tiles one or more slides for prediction.

    Args:
        slides: slide paths, folders of slides or globs (``data.slides``; :func:`expand_slide_paths`).
        level: pyramid level to read (0 = full resolution), never resampled; None with ``mpp`` set plans the read
            level from ``mpp`` (see :func:`wsiseg.data.slide.choose_level`).
        mpp: target microns per read-level px, used when ``level`` is None: the coarsest level at least that fine is
            read, as is when its mpp is within ``mpp_tolerance`` of the target, else area-resampled to exactly ``mpp``.
        mpp_tolerance: relative difference (0.05 = 5 %) between a level's mpp and ``mpp`` within which the level is
            used without resampling; ``0 <= mpp_tolerance < 1``.
        patch_size: tile side, read-level px; a multiple of the network's stride.
        overlap: overlap between neighbouring tiles, read-level px, ``0 <= overlap < patch_size``.
        output_downsample: read-level px per mask px (``writer.output_downsample``).
        tissue: tissue detection settings.
        batch_size: tiles per batch; None (the default): the device's default, 2 on CPUs (small batches keep the
            activations in cache) and 32 on GPUs (at most one network chunk); ``auto``: the largest that fits in GPU
            memory, in whole network chunks (2 on CPUs). Resolved by the entry point
            (:func:`wsiseg.pipeline.batch_size.resolve_batch_size`).
        num_workers: DataLoader worker processes (each holds its own OpenSlide handles); None: the config default
            (:func:`wsiseg.hardware.default_workers`: every core but one on GPU machines).
        pin_memory: pin host batches in the DataLoader's pin thread (only takes effect with CUDA); when off, the
            device hook pins each batch's pixels itself just before the copy: copies to CUDA are always non-blocking
            copies out of pinned memory, so the host never waits for them.
        prefetch_factor: batches prefetched per worker.
        on_error: ``skip`` — a slide that cannot be opened is reported and skipped; ``raise`` — stop the run.
        reader: ``openslide`` — workers read RGB tiles with OpenSlide; ``jpeg`` (alias ``gpu_jpeg``) — workers read
            only the compressed JPEG tiles and the module decodes them on its device, nvJPEG on CUDA, libjpeg-turbo on
            the CPU (falls back to OpenSlide, with one warning, unless every slide is JPEG-tiled at its read level; see
            ``wsiseg.data.readers.jpeg``); ``auto`` — ``jpeg`` when a CUDA device is visible, or on CPU-only runs whose
            main process reads (``num_workers=0``), else ``openslide`` (:func:`wsiseg.data.readers.resolve_reader`;
            fallback logged, not warned).
        read_threads: threads reading the tiles of one batch concurrently (OpenSlide decodes without holding the
            GIL). None: every core when ``num_workers`` is 0 (the main process reads between network calls, so the
            cores are otherwise idle then), 1 with workers (they already read in parallel).
        keep_complete: ``(output name, path) → bool``: True for a slide whose outputs are already complete for this run
            (``resume=true``); it is set aside as resumed, not opened.
        shard: how DDP ranks share the slides: ``slides`` (whole slides per rank, each written by its rank as soon as
            it is done), ``tiles`` (every slide's tiles over all ranks, merged by rank 0 at the end) or ``auto``
            (:mod:`wsiseg.data.sharding`).
        model_mpp: the model's µm/px (``model.mpp``): the read target when ``mpp`` is None.
        slide_mpp: level-0 µm/px of the slides, for those without (or with wrong) metadata: a number, or a CSV of
            slide name -> mpp (:func:`wsiseg.data.resolution.declared_mpps`).
        stain: stain normalisation, ``none``, ``macenko`` or ``reinhard`` (:mod:`wsiseg.data.stain`): estimated once
            per slide from its thumbnail's tissue, applied to every tile on the model's device as the batch arrives.
        stain_reference: the reference in the model config (``model.stain_reference``), None: ``macenko``'s default.
        stain_reference_image: an image of stained tissue to take the reference from instead.
        stain_on_failure: a slide whose stain cannot be estimated (too little tissue) runs ``unnormalised`` (with a
            warning, recorded in its report) or is ``skip``-ped.

    Example::

        dm = SlideTileDataModule(["a.svs"], patch_size=512, overlap=64)
        trainer.predict(module, datamodule=dm)
    """

    def __init__(
        self,
        slides: str | Sequence[str],
        level: int | None = None,
        mpp: float | None = None,
        mpp_tolerance: float = 0.05,
        patch_size: int = 512,
        overlap: int = 0,
        output_downsample: int = 1,
        tissue: TissueOptions | dict[str, Any] | None = None,
        batch_size: int | Literal["auto"] | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
        prefetch_factor: int = 4,
        on_error: str = "skip",
        reader: str = "auto",
        read_threads: int | None = None,
        keep_complete: Callable[[str, Path], bool] | None = None,
        shard: str = "auto",
        model_mpp: float | None = None,
        slide_mpp: float | str | None = None,
        stain: str = "none",
        stain_reference: dict[str, Any] | None = None,
        stain_reference_image: str | None = None,
        stain_on_failure: str = "unnormalised",
    ) -> None:
        super().__init__()
        if shard not in SHARD_MODES:
            raise UserInputError(f"data.shard must be one of {', '.join(SHARD_MODES)}; got '{shard}'")
        self.shard = shard
        if on_error not in ("skip", "raise"):
            raise UserInputError(f"data.on_error must be 'skip' or 'raise', got '{on_error}'")
        check_data_options(patch_size, overlap, num_workers, prefetch_factor)
        if output_downsample < 1 or patch_size % output_downsample or overlap % output_downsample:
            raise UserInputError(
                f"writer.output_downsample ({output_downsample}) must be >= 1 and divide data.patch_size "
                f"({patch_size}) and data.overlap ({overlap})"
            )
        if batch_size not in ("auto", None) and (isinstance(batch_size, str) or batch_size < 1):
            raise UserInputError(f"data.batch_size must be a positive integer, 'auto' or null, got {batch_size}")
        if slides in ("", None) or (not isinstance(slides, str) and not any(str(s) for s in slides)):
            raise UserInputError("data.slides is empty: pass data.slides=/path/to/slide.svs or a glob")
        self.slide_paths = expand_slide_paths(slides)  # one path per pattern at least: unmatched globs stay as given
        if not 0 <= mpp_tolerance < 1:
            raise UserInputError(f"data.mpp_tolerance must be in [0, 1) (0.05 = 5 %), got {mpp_tolerance}")
        self.level, self.mpp, self.mpp_tolerance = level, mpp, mpp_tolerance
        if model_mpp is not None and (isinstance(model_mpp, (bool, str)) or not model_mpp > 0):
            raise UserInputError(
                f"model.mpp (data.model_mpp) must be a positive number of microns per pixel or null, got {model_mpp}"
            )
        self.model_mpp, self.declared_mpp = model_mpp, declared_mpps(slide_mpp)
        self.patch_size, self.overlap, self.output_downsample = patch_size, overlap, output_downsample
        self.tissue = tissue if isinstance(tissue, TissueOptions) else TissueOptions(**dict(tissue or {}))
        self.batch_size = batch_size
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.on_error = on_error
        if read_threads is not None and read_threads < 1:
            raise UserInputError(f"data.read_threads must be >= 1 or null (automatic), got {read_threads}")
        self.read_threads = read_threads
        self.stain = StainPlan.from_options(stain, stain_reference, stain_reference_image, stain_on_failure)
        if reader not in READERS:
            raise UserInputError(f"data.reader must be one of {', '.join(READERS)}; got '{reader}'")
        self.reader = reader
        self.keep_complete = keep_complete or (lambda name, path: False)
        self._plan: RunPlan | None = None
        self._reader: TileReader | None = None  # chosen once per plan
        self._dataset: SlideTileDataset | None = None
        self._stain_table: StainTable | None = None  # data.stain's per-slide transforms, by slide index

    def plan_slide(self, path: Path, name: str) -> SlideTiles:
        """Open one slide and plan its tiles (level, grid, tissue). Raises UserInputError for unusable slides."""
        slide = open_slide(path)
        try:
            declared = self.declared_mpp(path, name)
            recorded = slide_mpp(slide)
            target, option = (self.mpp, "data.mpp") if self.mpp is not None else (self.model_mpp, "model.mpp")
            if option == "model.mpp" and target is not None and declared is None and recorded is None:
                log.warning(
                    "slide '%s' records no microns-per-pixel, so model.mpp=%g cannot be honoured: level 0 is read "
                    "(declare it with data.slide_mpp)",
                    path,
                    target,
                )
                target = None
            level = choose_level(
                slide, self.level, target, str(path), self.mpp_tolerance, base_mpp=declared, mpp_option=option
            )
            if level.resampled:
                log.info(
                    "slide '%s': %s=%g reads level %d (%.4g um/px) area-resampled by %.6g to %dx%d px",
                    path,
                    option,
                    target,
                    level.level,
                    level.mpp / level.scale,
                    level.scale,
                    *level.size,
                )
            grid = TileGrid(level.size, self.patch_size, self.overlap, self.output_downsample)
            origins = grid.origins()
            try:
                thumbnail = read_thumbnail(slide, self.tissue.thumbnail_max_side)
            except Exception as exc:  # OpenSlide raises its own error for corrupt tiles
                raise UserInputError(f"slide '{path}' cannot be read (thumbnail failed): {exc}") from None
            tissue_fraction, mask = 1.0, None
            if self.tissue.enabled or self.stain.enabled:
                mask = tissue_mask(thumbnail.rgb, self.tissue.min_saturation)
            if self.tissue.enabled:
                tissue_fraction = float(mask.mean())
                fractions = tile_tissue_fractions(
                    mask, thumbnail.downsample, origins, self.patch_size, level.downsample
                )
                origins = origins[fractions > self.tissue.min_fraction]
            return SlideTiles(
                path=path,
                name=name,
                level=level,
                mpp_source="override" if declared is not None else ("slide" if recorded is not None else None),
                mpp_target=option if self.level is None and target is not None else None,
                level0_size=tuple(slide.dimensions),  # type: ignore[arg-type]
                grid=grid,
                origins=origins,
                tiles_total=len(grid.origins()),
                tissue_fraction=tissue_fraction,
                thumbnail=thumbnail,
                properties={k: v for k, v in slide.properties.items() if k.startswith("openslide.")},
                identity=slide_identity(path),
                stain=self.stain.for_slide(path, thumbnail.rgb, mask) if self.stain.enabled else None,
            )
        finally:
            slide.close()

    def setup(self, stage: str | None = None) -> None:
        self.plan_run()

    def plan_run(self) -> RunPlan:
        """Open and tile every slide once (level, grid, tissue; resumed and unusable slides set aside) and return the
        run's plan; later calls return the same plan."""
        if self._plan is not None:
            return self._plan
        slides: list[SlideTiles] = []
        failed: list[tuple[Path, str]] = []
        failed_names: list[str] = []
        resumed: list[tuple[Path, str]] = []
        for path, name in zip(self.slide_paths, output_names(self.slide_paths)):
            if self.keep_complete(name, path):
                log.info("slide '%s': outputs complete for this config; skipped (resume)", path)
                resumed.append((path, name))
                continue
            try:
                slides.append(self.plan_slide(path, name))
            except UserInputError as exc:
                if self.on_error == "raise":
                    raise
                log.error("%s; skipped", exc)
                failed.append((path, str(exc)))
                failed_names.append(name)
        if not slides and resumed:
            log.info(
                "nothing left to process: %d slide(s) already complete (resume), %d skipped", len(resumed), len(failed)
            )
        elif not slides:
            first = failed[0][1]
            if len(failed) == 1:
                raise NoProcessableSlideError(first, failed)
            raise NoProcessableSlideError(
                f"none of the {len(failed)} slides in data.slides can be processed; the first: {first}", failed
            )
        self._use(RunPlan(tuple(slides), tuple(failed), tuple(resumed), tuple(failed_names), self.shard))
        log.info(
            "%d slide(s), %d tiles in grid, %d with tissue to process",
            len(slides),
            sum(s.tiles_total for s in slides),
            self.plan.tiles,
        )
        return self.plan

    def _use(self, plan: RunPlan) -> None:
        self._plan = plan
        self._reader = None
        self._dataset = SlideTileDataset(list(plan.slides), self._read_threads())
        self._stain_table = self.stain.table(plan.slides) if self.stain.enabled else None

    @property
    def plan(self) -> RunPlan:
        """The run's plan (after :meth:`plan_run` or ``setup``)."""
        if self._plan is None:
            raise RuntimeError("SlideTileDataModule.plan_run() has not run")
        return self._plan

    @property
    def slides(self) -> list[SlideTiles]:
        """The planned slides to process (after setup)."""
        return list(self.plan.slides)

    @property
    def failed(self) -> list[tuple[Path, str]]:
        """``(path, reason)`` of the slides that cannot be processed (after setup)."""
        return list(self.plan.failed)

    @property
    def resumed(self) -> list[tuple[Path, str]]:
        """``(path, output name)`` of the slides kept from an earlier run (after setup)."""
        return list(self.plan.resumed)

    def keep_first_tiles(self, count: int) -> int:
        """Keep only the first ``count`` tissue tiles over the slides (slide order, then raster order), e.g. for a
        benchmark; returns how many are kept."""
        self._use(self.plan_run().first_tiles(count))
        return self.plan.tiles

    def _read_threads(self) -> int:
        if self.read_threads is not None:
            return self.read_threads
        return usable_cores() if self.num_workers == 0 else 1

    @property
    def dataset(self) -> SlideTileDataset:
        if self._dataset is None:
            raise RuntimeError("SlideTileDataModule.setup() has not run")
        return self._dataset

    @property
    def tile_reader(self) -> TileReader:
        """The reader of this plan's tiles (chosen once per plan from ``data.reader``; :mod:`wsiseg.data.readers`)."""
        if self._reader is None:
            self._reader = choose_reader(self.reader, self.plan.slides, self.num_workers)
        return self._reader

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Only the pixels go to the device (the reader decodes compressed tiles there, then ``data.stain`` normalises
        them there); tile indices and errors stay
        on the host, so the writer reads them without waiting for the device (a ``.tolist()`` of a CUDA tensor would
        synchronise with the running batch). To CUDA the pixels leave from pinned memory, without blocking: pinned by
        the DataLoader's pin thread (``data.pin_memory``), else here."""
        if isinstance(batch, dict) and ("image" in batch or "jpeg_tiles" in batch):
            if device.type == "cuda":
                batch = _pinned_pixels(batch)
            batch = self.tile_reader.to_device(batch, device)
            if self._stain_table is not None:  # each tile through its slide's transform, on the device
                batch = {**batch, "image": self._stain_table.apply(batch["image"], batch["slide_index"])}
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _loader_batch_size(self) -> int:
        from wsiseg.hardware import default_batch_size  # not resolved by an entry point: the device's default

        return self.batch_size if isinstance(self.batch_size, int) else default_batch_size()

    def with_batch_size(self, batch_size: int) -> SlideTileDataModule:
        """A copy of this data module (same options and plan) that batches ``batch_size`` tiles: how the entry point
        applies a resolved ``batch_size=auto`` without changing a built object."""
        clone = copy.copy(self)
        clone.batch_size = int(batch_size)
        return clone

    def predict_dataloader(self) -> DataLoader:
        """The tiles this process predicts: under DDP its share (``data.shard``: :meth:`RunPlan.tiles_of_rank`, the
        entry point turns Lightning's own sampler off), else every tile in order."""
        trainer = self.trainer
        indices = None
        if trainer is not None and trainer.world_size > 1:
            indices = self.plan.tiles_of_rank(trainer.global_rank, trainer.world_size)
        return self.tile_reader.dataloader(
            self.dataset, self._loader_batch_size(), self.num_workers, self.pin_memory, self.prefetch_factor, indices
        )


def _pinned_pixels(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its host pixels (``image``) in pinned memory, so their copy to CUDA is a non-blocking one (a
    copy out of pageable memory makes the host wait for it); the loader's batch itself is left as it was."""
    image = batch.get("image")
    if isinstance(image, torch.Tensor) and image.device.type == "cpu" and not image.is_pinned():
        return {**batch, "image": image.pin_memory()}
    return batch
