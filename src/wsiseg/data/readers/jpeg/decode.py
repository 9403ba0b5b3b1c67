"""The device's side of ``data.reader=jpeg``: a batch's JPEG tiles decoded and its patches assembled on the device.

:func:`decode_batch` (called from the data module's ``transfer_batch_to_device``) replaces a batch's
:class:`~wsiseg.data.readers.jpeg.dataset.CompressedTiles` by its patches: :func:`decode_streams` decodes each unique
tile once with ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA, checked once per colour kind
against libjpeg; libjpeg-turbo over the cores on the CPU) and :func:`assemble_patches` assembles the ``(N, 3, P, P)``
uint8 patches there with one gather (tiles straddled, overlap, white past the level's edge), so ``predict_step`` gets
device-resident images without a host round trip.

On CUDA nothing here makes the host wait for the device: every host-to-device copy (the batch's index arrays, tiles
decoded on the host, pixels OpenSlide read) is a non-blocking copy out of pinned memory (:func:`host_to_device`), and
the decoded tiles are stacked with one call, so the host queues the batch and goes on to the next one.

Frames: tile and patch geometry is in **read-level px** (pixels of the TIFF page = the OpenSlide level read), tile
columns and rows in tiles of the level's grid; decoded tiles are (3, h, w) and patches (N, 3, P, P) uint8 RGB.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.data.readers.jpeg.dataset import CompressedTiles
from wsiseg.data.readers.jpeg.markers import COLOUR_RGB
from wsiseg.errors import first_line
from wsiseg.hardware import usable_cores

__all__ = [
    "DecodedStreams",
    "arrays_to_device",
    "assemble_patches",
    "decode_batch",
    "decode_streams",
    "host_to_device",
    "stack_tiles",
]

log = logging.getLogger(__name__)

# Mean |Δ| (grey levels) above which a device decode is taken to disagree with libjpeg on the colour conversion
# (nvJPEG vs libjpeg-turbo differ by ~1 level from IDCT/upsampling; a wrong conversion differs by tens).
_COLOUR_CHECK_TOLERANCE = 4.0


def _decode(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    if device.type == "cuda":
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    # libjpeg-turbo decodes one stream per call and releases the GIL: split the batch over the cores; the main process
    # decodes between network calls, when the cores are otherwise idle
    parts = min(len(streams), usable_cores())
    if parts <= 1:
        return decode_jpeg(streams, mode=ImageReadMode.RGB)
    bounds = [len(streams) * k // parts for k in range(parts + 1)]
    pool = _cpu_decode_pool()
    futures = [pool.submit(decode_jpeg, streams[a:b], mode=ImageReadMode.RGB) for a, b in zip(bounds[1:], bounds[2:])]
    decoded = decode_jpeg(streams[: bounds[1]], mode=ImageReadMode.RGB)
    return [*decoded, *(image for future in futures for image in future.result())]


@functools.cache
def _cpu_decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(usable_cores() - 1 or 1, thread_name_prefix="wsiseg-jpeg")


def colour_mismatch(reference: torch.Tensor, candidate: torch.Tensor) -> float | None:
    """Mean |Δ| (grey levels) between two decodes of one tile when it exceeds the colour-check tolerance (a decoder
    applying another colour conversion), else None."""
    if reference.shape != candidate.shape:
        return float("inf")
    diff = (reference.float() - candidate.float().to(reference.device)).abs().mean().item()
    return diff if diff > _COLOUR_CHECK_TOLERANCE else None


def decoder_reason(exc: BaseException) -> str:
    """The decoder's own reason, without the source location torchvision appends (``Exception raised from
    decode_jpeg at /path/of/its/build/...``), which says nothing about the slide."""
    text = first_line(exc)
    text = re.sub(r"\s*Exception raised from .*$", "", text)
    return re.sub(r"\s*\(?(?:at|in) /\S+\)?", "", text).strip() or type(exc).__name__


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: to CUDA, a ``non_blocking`` copy out of pinned memory
    (pinned here unless the DataLoader's pin thread did it already); a tensor already on a device, or a CPU target,
    is a plain ``.to``.

    The pinned source need not outlive the call: ``pin_memory()`` allocates from PyTorch's caching host allocator,
    which records an event on the copy's stream for every non-blocking copy out of one of its blocks and does not hand
    that block out again before the event has completed, so freeing the tensor early cannot recycle memory the copy
    still reads (a reference kept on the batch would do the same, for longer).
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, non_blocking=True)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def arrays_to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Integer ``arrays`` as int64 tensors of the same shapes on ``device``, through one host-to-device copy (one
    pinned buffer, split into views on the device): a batch's small index arrays cost one copy, not one each."""
    flat = [np.ascontiguousarray(array, dtype=np.int64).reshape(-1) for array in arrays]
    moved = host_to_device(torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64)), device)
    views, start = [], 0
    for array, part in zip(arrays, flat):
        views.append(moved[start : start + part.size].view(np.shape(array)))
        start += part.size
    return views


class DecodedStreams(NamedTuple):
    """The unique streams of a batch, decoded (:func:`decode_streams`); one entry per stream in each list.

    Attributes:
        images: (3, h, w) uint8 RGB; None where no decoder took the stream (its patches get white and an error).
        on_host: decoded on the CPU for a CUDA batch (libjpeg fallback): still to be copied to the device.
        errors: why the stream could not be decoded; empty when it was.
    """

    images: list[torch.Tensor | None]
    on_host: list[bool]
    errors: list[str]


def decode_streams(
    tiles: CompressedTiles, device: torch.device, colour_checked: dict[int, bool] | None = None
) -> DecodedStreams:
    """Decode the batch's unique streams to (3, h, w) uint8 RGB tensors, on ``device`` where its decoder can.

    CUDA: one batched nvJPEG call. The first time each colour kind (RGB-in-JPEG, YCbCr) is met (``colour_checked``,
    per colour kind: True once nvJPEG was found to agree with libjpeg, False when it did not; the reader keeps it for
    its run, None checks afresh), one tile is also decoded on the CPU and compared (the only point where decoding
    waits for the device, once per colour kind and run); if nvJPEG disagrees on the colour conversion the kind is
    decoded on the CPU from then on (one warning). A batch that fails to decode is retried stream by stream (on the
    CPU when the device refuses a stream): a stream no decoder takes is left None with an error message for the
    patches using it (the writer then fails that slide only). Tiles decoded on the CPU for a CUDA batch stay on the
    host (``on_host``): :func:`assemble_patches` moves them in one copy.
    """
    streams = tiles.streams
    errors = [""] * len(streams)
    colour_checked = {} if colour_checked is None else colour_checked
    cpu = torch.device("cpu")
    on_cpu = [device.type != "cuda" or colour_checked.get(int(c)) is False for c in tiles.colours]
    decoded: list[torch.Tensor | None] = [None] * len(streams)
    for host in (False, True):
        indices = [i for i in range(len(streams)) if on_cpu[i] == host]
        target = cpu if host else device
        try:
            for i, image in zip(indices, _decode([streams[i] for i in indices], target)):
                decoded[i] = image
        except RuntimeError:  # find the culprit(s); a stream nvJPEG refuses may still decode on the CPU
            for i in indices:
                for attempt in dict.fromkeys((target, cpu)):
                    try:
                        decoded[i] = _decode([streams[i]], attempt)[0]
                        errors[i], on_cpu[i] = "", attempt.type == "cpu"
                        break
                    except RuntimeError as exc:
                        errors[i] = f"{tiles.labels[i]}: JPEG tile cannot be decoded: {decoder_reason(exc)}"
    if device.type == "cuda":
        _check_device_colours(tiles, streams, decoded, on_cpu, colour_checked)
    on_host = [device.type == "cuda" and host for host in on_cpu]
    return DecodedStreams(decoded, on_host, errors)


def _check_device_colours(
    tiles: CompressedTiles,
    streams: list[torch.Tensor],
    decoded: list[torch.Tensor | None],
    on_cpu: list[bool],
    colour_checked: dict[int, bool],
) -> None:
    """Compare the device decode of the largest stream of each not-yet-checked colour kind with libjpeg; switch the
    kind to CPU decoding (for later batches, and this one: ``decoded`` and ``on_cpu`` are updated) when they
    disagree."""
    for colour in sorted({int(c) for c in tiles.colours}):
        if colour in colour_checked:
            continue
        members = [
            i for i, c in enumerate(tiles.colours) if int(c) == colour and not on_cpu[i] and decoded[i] is not None
        ]
        if not members:
            continue
        probe = max(members, key=lambda i: int(tiles.offsets[i + 1] - tiles.offsets[i]))
        try:
            reference = _decode([streams[probe]], torch.device("cpu"))[0]
        except RuntimeError:
            continue  # check on a later batch
        mismatch = colour_mismatch(reference, decoded[probe])  # type: ignore[arg-type]
        colour_checked[colour] = mismatch is None
        if mismatch is not None:
            kind = "RGB-in-JPEG" if colour == COLOUR_RGB else "YCbCr"
            log.warning(
                "nvJPEG decodes %s tiles unlike libjpeg/OpenSlide (mean |diff| %.1f grey levels on %s); "
                "decoding those on the CPU",
                kind,
                mismatch,
                tiles.labels[probe],
            )
            for i in members:
                decoded[i] = _decode([streams[i]], torch.device("cpu"))[0]
                on_cpu[i] = True


def _fit_tile(image: torch.Tensor, tile_h: int, tile_w: int) -> torch.Tensor:
    """``image`` (3, h, w) as (3, tile_h, tile_w): a tile stored smaller than the grid's tiles gets white beyond it."""
    h, w = image.shape[-2:]
    if (h, w) == (tile_h, tile_w):
        return image
    return F.pad(image[:, :tile_h, :tile_w], (0, max(0, tile_w - w), 0, max(0, tile_h - h)), value=255)


def stack_tiles(decoded: DecodedStreams, tile_h: int, tile_w: int, device: torch.device) -> torch.Tensor:
    """The batch's decoded tiles as one (U + 1, tile_h, tile_w, 3) uint8 HWC tensor on ``device``: tile u in row u,
    white where a stream was not decoded and in the last row (where missing tiles and pixels outside the level point).

    One ``torch.stack`` of the (contiguous, CHW) tiles and one layout copy, whatever the number of tiles (CUDA copies
    many stacked inputs per kernel; a tile per kernel would cost ~one launch per tile). Tiles decoded on the host
    (``on_host``) are stacked there first and cross to the device in one non-blocking copy out of pinned memory.
    """
    white = torch.full((3, tile_h, tile_w), 255, dtype=torch.uint8, device=device)
    fitted = [None if image is None else _fit_tile(image, tile_h, tile_w) for image in decoded.images]
    host = [i for i, image in enumerate(fitted) if image is not None and decoded.on_host[i]]
    if host:
        block = host_to_device(torch.stack([fitted[i] for i in host]), device)  # type: ignore[misc]
        for i, image in zip(host, block.unbind(0)):
            fitted[i] = image
    chw = torch.stack([white if image is None else image for image in fitted] + [white])
    return chw.permute(0, 2, 3, 1).contiguous()


def assemble_patches(decoded: DecodedStreams, tiles: CompressedTiles, device: torch.device) -> torch.Tensor:
    """Cut the batch's patches out of its decoded tiles on ``device``.

    Every output pixel (read-level px ``origin + (px, py)``) is gathered from the tile covering it; pixels past the
    level's right/bottom edge (and of missing or undecodable tiles) are white, as OpenSlide reads them. One gather for
    the whole batch, whatever the overlap or how many tiles a patch straddles; the patch geometry and tile lookup
    reach the device in one non-blocking copy (:func:`arrays_to_device`).

    Returns:
        (N, 3, P, P) uint8 RGB in channels_last memory format (what the module converts to anyway).
    """
    size = tiles.patch_size
    count = len(tiles)
    if count == 0:
        return torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)
    tile_h = int(tiles.geometry[:, 5].max())
    tile_w = int(tiles.geometry[:, 4].max())
    stack = stack_tiles(decoded, tile_h, tile_w, device)  # (U + 1, tile_h, tile_w, 3); the last tile is white
    blank = len(decoded.images)
    rows, cols = tiles.lookup.shape[1:]
    # One extra row and column of white tiles: where pixels past the level's edge point.
    lookup = np.full((count, rows + 1, cols + 1), blank, dtype=np.int64)
    lookup[:, :rows, :cols] = np.where(tiles.lookup < 0, blank, tiles.lookup)
    geometry, base = arrays_to_device([tiles.geometry, lookup * (tile_h * tile_w)], device)
    steps = torch.arange(size, device=device)
    ox, oy, c0, r0, tw, th, width, height = (geometry[:, k : k + 1] for k in range(8))
    ax, ay = ox + steps, oy + steps  # (N, P) absolute read-level px
    col = torch.where((ax >= 0) & (ax < width), ax // tw - c0, cols)
    row = torch.where((ay >= 0) & (ay < height), ay // th - r0, rows)
    per_row = torch.gather(base, 1, row[:, :, None].expand(count, size, cols + 1))  # (N, P, cols + 1)
    index = torch.gather(per_row, 2, col[:, None, :].expand(count, size, size))  # (N, P, P): first px of the tile
    index += ((ay % th) * tile_w)[:, :, None]
    index += (ax % tw)[:, None, :]
    pixels = stack.view(-1, 3).index_select(0, index.view(-1))
    return pixels.view(count, size, size, 3).permute(0, 3, 1, 2)


def decode_batch(
    batch: dict[str, Any], device: torch.device | str, colour_checked: dict[int, bool] | None = None
) -> dict[str, Any]:
    """Replace ``batch["jpeg_tiles"]`` (a :class:`CompressedTiles`) by ``batch["image"]``: (N, 3, P, P) uint8 RGB
    decoded and assembled on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU otherwise). Patches using a tile
    that cannot be decoded come back white with ``batch["error"]`` set, as the OpenSlide reader reports them. In a
    batch that mixes in patches OpenSlide read (``image``, ``image_rows``, ``jpeg_rows`` from
    :func:`~wsiseg.data.readers.jpeg.dataset.collate_jpeg_tiles`) every patch takes its row of the batch.
    ``colour_checked``: see :func:`decode_streams`. On CUDA every host-to-device copy is non-blocking, out of pinned
    memory."""
    device = torch.device(device)
    tiles: CompressedTiles = batch["jpeg_tiles"]
    decoded = decode_streams(tiles, device, colour_checked)
    out = {k: v for k, v in batch.items() if k not in ("jpeg_tiles", "image_rows", "jpeg_rows")}
    patches = assemble_patches(decoded, tiles, device)
    rows = list(range(len(tiles)))
    if "image_rows" in batch:  # a batch mixing slides read by OpenSlide: their patches take their own rows
        rows, image_rows = list(batch["jpeg_rows"]), list(batch["image_rows"])
        # Both kinds side by side, then one gather puts every patch in its row. The row order goes to the device as
        # a tensor: indexing a CUDA tensor with a Python list copies the list there synchronously.
        order = np.empty(len(rows) + len(image_rows), dtype=np.int64)
        order[rows] = np.arange(len(rows))
        order[image_rows] = len(rows) + np.arange(len(image_rows))
        (order_on_device,) = arrays_to_device([order], device)
        both = torch.cat([patches, host_to_device(batch["image"], device)])
        patches = both.index_select(0, order_on_device).contiguous(memory_format=torch.channels_last)
    out["image"] = patches
    if any(decoded.errors):
        errors = list(out.get("error") or [""] * len(patches))
        for message, owners in zip(decoded.errors, tiles.owners):
            for n in owners if message else ():
                errors[rows[n]] = errors[rows[n]] or message
        out["error"] = errors
    return out
