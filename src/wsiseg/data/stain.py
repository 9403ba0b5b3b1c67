"""Stain normalisation (``data.stain``): one estimate per slide, applied to every tile the same way.

A slide's stain is estimated **once**, from the tissue pixels of its thumbnail, and turned into a pointwise colour
transform ``y = A·f(x) + b``, ``out = g(y)`` of the uint8 RGB tiles (``A`` 3×3 and ``b`` 3 per slide). Every tile of
the slide goes through the same transform, so a pixel shared by two tiles gets the same value in both (no seams) and
a tile's colours do not depend on what else it holds.

- ``macenko`` (Macenko et al. 2009, as MONAI's ``NormalizeHEStains``: ``Io`` 240, ``alpha`` 1, ``beta`` 0.15):
  the optical density ``od = -ln(min(x+1, Io)/Io)`` is mapped by ``HE_ref·diag(maxC_ref/maxC)·pinv(HE)`` (the
  slide's stain concentrations onto the reference's) and back to ``Io·exp(-od)``, computed as ``f = log2(min(x+1,
  Io)/Io)``, ``g(y) = Io·2^y``; clipped to 255 and truncated to uint8 as MONAI does (white glass becomes 240, as in
  MONAI-normalised training tiles; MONAI sets values over 255 to 254, here 255).
- ``reinhard`` (Reinhard et al. 2001): ``f = log2(lms)`` of ``(x+1)/256``; ``A``/``b`` match the slide's per-channel
  mean and standard deviation in lαβ (a linear map of ``log10(lms)``) to the reference's; ``g`` goes back to RGB,
  rounded to uint8.

References (:class:`StainReference`) come from the model config (``model.stain_reference``, the training set's), a
reference image (``data.stain_reference_image``), or for ``macenko`` the usual H&E reference (MONAI's defaults).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from wsiseg.errors import UserInputError

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ON_FAILURE",
    "MACENKO_DEFAULT",
    "StainEstimateError",
    "StainReference",
    "SlideStain",
    "StainPlan",
    "StainTable",
    "macenko_stains",
    "lab_statistics",
    "slide_stain",
    "reference_from_config",
    "reference_from_image",
    "apply_stain",
    "tissue_pixels",
]

METHODS = ("none", "macenko", "reinhard")
ON_FAILURE = ("unnormalised", "skip")

IO = 240.0  # transmitted light intensity (MONAI's default)
ALPHA = 1.0  # percentile of the angles taken as the extreme stain directions
BETA = 0.15  # optical density below which a pixel is transparent (not used to find the stain plane)
MIN_PIXELS = 500  # fewer stained pixels than this: no estimate
MAX_PIXELS = 1 << 20  # pixels an estimate uses at most (every k-th tissue pixel beyond)

# MONAI's NormalizeHEStains defaults (Macenko's reference): rows H and E, optical density of R, G, B
MACENKO_DEFAULT = {
    "stain_matrix": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]],
    "max_concentrations": [1.9705, 1.0308],
}

_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LOG_LMS_TO_LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)


class StainEstimateError(ValueError):
    """A slide (or reference image) whose stains cannot be estimated: too little stained tissue."""


@dataclass(frozen=True)
class StainReference:
    """What slides are normalised to.

    Attributes:
        method: ``macenko`` or ``reinhard``.
        values: ``macenko``: ``stain_matrix`` (2×3: rows H and E, optical density of R, G, B) and
            ``max_concentrations`` (2: H, E, 99th percentiles); ``reinhard``: ``mean`` and ``std`` (3 each, lαβ).
        source: where it came from (``model.stain_reference``, ``data.stain_reference_image``, ``default``).
    """

    method: str
    values: dict[str, list[Any]]
    source: str


@dataclass(frozen=True)
class SlideStain:
    """One slide's transform (see the module docstring) and how it was obtained.

    Attributes:
        method: ``macenko`` or ``reinhard``.
        matrix: (3, 3) float32 ``A`` (in the domain :func:`apply_stain` works in: see the module docstring).
        offset: (3,) float32 ``b``.
        applied: False for a slide whose estimate failed and which runs unnormalised (``data.stain_on_failure``).
        report: what ``report.json`` records under ``stain``.
    """

    method: str
    matrix: np.ndarray
    offset: np.ndarray
    applied: bool
    report: dict[str, Any] = field(default_factory=dict)


def _optical_density(pixels: np.ndarray) -> np.ndarray:
    return -np.log(np.minimum(pixels.astype(np.float64) + 1.0, IO) / IO)


def _lab(pixels: np.ndarray) -> np.ndarray:
    lms = ((pixels.astype(np.float64) + 1.0) / 256.0) @ _RGB_TO_LMS.T
    return np.log10(np.maximum(lms, 1e-6)) @ _LOG_LMS_TO_LAB.T


def _subsample(pixels: np.ndarray) -> np.ndarray:
    step = max(1, math.ceil(len(pixels) / MAX_PIXELS))
    return pixels[::step]


def macenko_stains(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stain matrix (2×3: rows H and E) and the 99th-percentile concentrations (2,) of (N, 3) uint8 RGB
    ``pixels``, as MONAI's ``ExtractHEStains``/``NormalizeHEStains`` compute them, but for which direction is H: the
    one with the higher red/blue optical density ratio, as in the reference matrix and Macenko's reference code
    (MONAI 1.5 takes the lower, which swaps the stains against its own default reference).

    Raises:
        StainEstimateError: fewer than :data:`MIN_PIXELS` pixels above the optical density ``BETA``.
    """
    od = _optical_density(_subsample(pixels))
    stained = od[np.all(od > BETA, axis=1)]
    if len(stained) < MIN_PIXELS:
        raise StainEstimateError(f"only {len(stained)} stained pixels (at least {MIN_PIXELS} needed)")
    _, eigvecs = np.linalg.eigh(np.cov(stained.T))
    plane = eigvecs[:, 1:3]
    projected = stained @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, ALPHA), np.percentile(angles, 100 - ALPHA)
    v_low = plane @ np.array([math.cos(low), math.sin(low)])
    v_high = plane @ np.array([math.cos(high), math.sin(high)])
    # H absorbs more red (relative to blue) than E, as in the reference (Macenko's: H 0.56/0.41, E 0.22/0.56)
    eps = np.finfo(np.float32).eps
    first_h = v_low[0] / (v_low[2] + eps) > v_high[0] / (v_high[2] + eps)
    he = np.array([v_low, v_high] if first_h else [v_high, v_low]).T
    he = he / np.linalg.norm(he, axis=0)
    concentrations = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.percentile(concentrations, 99, axis=1)
    if not np.all(np.isfinite(he)) or not np.all(max_c > 1e-6):
        raise StainEstimateError("the stain concentrations are degenerate (a single colour?)")
    return he.T, max_c


def lab_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (3 each) of (N, 3) uint8 RGB ``pixels`` in lαβ.

    Raises:
        StainEstimateError: fewer than :data:`MIN_PIXELS` pixels, or a channel without spread.
    """
    if len(pixels) < MIN_PIXELS:
        raise StainEstimateError(f"only {len(pixels)} tissue pixels (at least {MIN_PIXELS} needed)")
    lab = _lab(_subsample(pixels))
    mean, std = lab.mean(axis=0), lab.std(axis=0)
    if not np.all(std > 1e-6):
        raise StainEstimateError("a colour channel has no spread (a single colour?)")
    return mean, std


def _estimate(method: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    if method == "macenko":
        he, max_c = macenko_stains(pixels)
        return {"stain_matrix": he, "max_concentrations": max_c}
    mean, std = lab_statistics(pixels)
    return {"mean": mean, "std": std}


def _rounded(values: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    return {key: np.round(value, 6).tolist() for key, value in values.items()}


def slide_stain(reference: StainReference, pixels: np.ndarray) -> SlideStain:
    """The transform that takes a slide whose tissue pixels are ``pixels`` ((N, 3) uint8 RGB) to ``reference``.

    Raises:
        StainEstimateError: the slide's stains cannot be estimated.
    """
    own = _estimate(reference.method, pixels)
    if reference.method == "macenko":
        he = np.asarray(own["stain_matrix"], np.float64).T
        he_ref = np.asarray(reference.values["stain_matrix"], np.float64).T
        scale = np.asarray(reference.values["max_concentrations"], np.float64) / np.asarray(own["max_concentrations"])
        # od = -ln2·f with f = log2(min(x+1, Io)/Io); od out = od_map·od; Io·exp(-od out) = Io·2^(od_map·f)
        matrix, offset = he_ref @ np.diag(scale) @ np.linalg.pinv(he), np.zeros(3)
    else:
        scale = np.asarray(reference.values["std"], np.float64) / np.asarray(own["std"])
        shift = np.asarray(reference.values["mean"], np.float64) - scale * np.asarray(own["mean"])
        matrix, offset = _lab_domain(np.diag(scale), shift)
    report = {"method": reference.method, "status": "normalised", "reference": reference.source, "slide": _rounded(own)}
    return SlideStain(reference.method, matrix.astype(np.float32), offset.astype(np.float32), True, report)


def unnormalised(reference: StainReference, reason: str) -> SlideStain:
    """A slide that runs without normalisation (its estimate failed, ``data.stain_on_failure=unnormalised``)."""
    report = {"method": reference.method, "status": f"unnormalised: {reason}", "reference": reference.source}
    return SlideStain(reference.method, np.eye(3, dtype=np.float32), np.zeros(3, np.float32), False, report)


def tissue_pixels(rgb: np.ndarray, mask: np.ndarray | None = None, min_saturation: int = 20) -> np.ndarray:
    """(N, 3) uint8 pixels of ``rgb`` under ``mask``; without a mask, those whose HSV saturation exceeds
    ``min_saturation`` (0-255: stained, not glass)."""
    if mask is None:
        saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
        mask = saturation > min_saturation
    return np.ascontiguousarray(rgb[mask].reshape(-1, 3))


_SHAPES = {
    "macenko": {"stain_matrix": (2, 3), "max_concentrations": (2,)},
    "reinhard": {"mean": (3,), "std": (3,)},
}


def _check_values(method: str, values: Any, where: str) -> dict[str, list[Any]]:
    """``values`` as :attr:`StainReference.values` for ``method``, checked. Raises UserInputError naming ``where``."""
    shapes = _SHAPES[method]
    example = ", ".join(f"{k}: {np.zeros(s).tolist()}" for k, s in shapes.items())
    if not isinstance(values, dict) or set(values) != set(shapes):
        raise UserInputError(f"{where} for data.stain={method} must hold exactly {{{example}}}, got {values}")
    checked = {}
    for key, shape in shapes.items():
        try:
            array = np.asarray(values[key], dtype=np.float64)
        except (TypeError, ValueError):
            array = np.zeros(0)
        positive = key in ("max_concentrations", "std")
        if array.shape != shape or not np.all(np.isfinite(array)) or (positive and not np.all(array > 0)):
            raise UserInputError(
                f"{where}.{key} for data.stain={method} must be {'x'.join(map(str, shape))} finite numbers"
                f"{' > 0' if positive else ''}, got {values[key]}"
            )
        checked[key] = array.tolist()
    return checked


def reference_from_config(method: str, values: Any) -> StainReference:
    """The reference given in the model config (``model.stain_reference``), or for ``macenko`` without one the default.

    Raises:
        UserInputError: values of the wrong shape, or ``reinhard`` without a reference.
    """
    if values is None:
        if method == "macenko":
            return StainReference(method, {k: list(v) for k, v in MACENKO_DEFAULT.items()}, "default")
        raise UserInputError(
            "data.stain=reinhard needs a reference: model.stain_reference={mean: [l, a, b], std: [l, a, b]} (lαβ, "
            "from the training set) or data.stain_reference_image=/path/to/a/training/tile.png"
        )
    return StainReference(method, _check_values(method, values, "model.stain_reference"), "model.stain_reference")


def reference_from_image(method: str, path: str | Path) -> StainReference:
    """The reference estimated from an RGB image's stained pixels (``data.stain_reference_image``).

    Raises:
        UserInputError: naming the option and the file, when it cannot be read or holds too little stain.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserInputError(f"data.stain_reference_image='{path}' cannot be read as an image: {exc}") from None
    try:
        values = _rounded(_estimate(method, tissue_pixels(rgb)))
    except StainEstimateError as exc:
        raise UserInputError(
            f"data.stain_reference_image='{path}': no stain reference for data.stain={method} ({exc}); give an "
            "image of stained tissue"
        ) from None
    return StainReference(method, values, "data.stain_reference_image")


def _lab_domain(matrix: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A lαβ affine map (``lab' = matrix·lab + offset``) as the same map on ``log2(lms)``, where it is applied."""
    to_lab = _LOG_LMS_TO_LAB * math.log10(2.0)  # lab = to_lab · log2(lms)
    back = np.linalg.inv(to_lab)
    return back @ matrix @ to_lab, back @ offset


def apply_stain(
    images: torch.Tensor, method: str, matrix: torch.Tensor, offset: torch.Tensor, applied: torch.Tensor
) -> torch.Tensor:
    """Normalise uint8 tiles (N, 3, H, W) on their device with each tile's slide transform.

    Args:
        images: (N, 3, H, W) uint8 RGB.
        method: ``macenko`` or ``reinhard``.
        matrix: (N, 3, 3) float32 :attr:`SlideStain.matrix` of each tile's slide, on ``images``' device.
        offset: (N, 3) float32 :attr:`SlideStain.offset`.
        applied: (N,) bool: False leaves that tile as it is (its slide runs unnormalised).

    Returns:
        (N, 3, H, W) uint8.
    """
    n, _, h, w = images.shape
    pixels = images.reshape(n, 3, h * w).float()
    if method == "macenko":
        f = torch.log2(pixels.add_(1.0).clamp_max_(IO).div_(IO))  # exactly 0 for glass: it stays Io
    else:
        to_lms = torch.as_tensor(_RGB_TO_LMS / 256.0, dtype=torch.float32, device=images.device)
        lms_at_zero = torch.as_tensor(_RGB_TO_LMS.sum(axis=1) / 256.0, dtype=torch.float32, device=images.device)
        f = torch.log2(torch.matmul(to_lms, pixels).add_(lms_at_zero[:, None]).clamp_min_(1e-6))
    y = torch.baddbmm(offset[:, :, None], matrix, f).exp2_()
    if method == "macenko":
        out = y.mul_(IO).clamp_max_(255.0)  # (MONAI's NormalizeHEStains sets values over 255 to 254)
    else:
        to_rgb = torch.as_tensor(np.linalg.inv(_RGB_TO_LMS) * 256.0, dtype=torch.float32, device=images.device)
        out = torch.matmul(to_rgb, y).sub_(0.5).clamp_(0.0, 255.0)  # -1 + 0.5: rounded by the truncation below
    out = out.to(torch.uint8).reshape(n, 3, h, w)  # truncated (MONAI: astype(uint8))
    return out if bool(applied.all()) else torch.where(applied[:, None, None, None], out, images)


@dataclass(frozen=True)
class StainPlan:
    """The run's ``data.stain*`` options, checked, with the reference resolved once (before any slide is opened).

    Attributes:
        method: one of :data:`METHODS`.
        reference: what slides are normalised to (None for ``none``).
        on_failure: one of :data:`ON_FAILURE`.
    """

    method: str = "none"
    reference: StainReference | None = None
    on_failure: str = "unnormalised"

    @classmethod
    def from_options(cls, method: str, reference: Any, reference_image: str | None, on_failure: str) -> StainPlan:
        """Raises UserInputError naming the ``data.stain*`` (or ``model.stain_reference``) option that is wrong."""
        if method not in METHODS:
            raise UserInputError(f"data.stain must be one of {', '.join(METHODS)}; got '{method}'")
        if on_failure not in ON_FAILURE:
            raise UserInputError(f"data.stain_on_failure must be one of {', '.join(ON_FAILURE)}; got '{on_failure}'")
        if method == "none":
            return cls(method, None, on_failure)
        if reference_image not in (None, ""):
            return cls(method, reference_from_image(method, str(reference_image)), on_failure)
        return cls(method, reference_from_config(method, reference), on_failure)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def for_slide(self, path: Path, thumbnail: np.ndarray, mask: np.ndarray | None) -> SlideStain:
        """Slide ``path``'s transform, estimated from the ``mask`` pixels of its ``thumbnail`` (RGB uint8).

        Raises:
            UserInputError: the estimate failed and ``on_failure`` is ``skip`` (the slide is skipped with it).
        """
        assert self.reference is not None
        try:
            return slide_stain(self.reference, tissue_pixels(thumbnail, mask))
        except StainEstimateError as exc:
            if self.on_failure == "skip":
                raise UserInputError(
                    f"slide '{path}': its stain cannot be estimated for data.stain={self.method} ({exc}); "
                    "data.stain_on_failure=unnormalised runs such a slide unnormalised"
                ) from None
            log.warning("slide '%s': stain not normalised (%s; data.stain_on_failure=unnormalised)", path, exc)
            return unnormalised(self.reference, str(exc))

    def table(self, slides: Sequence[Any]) -> StainTable:
        """The transforms of ``slides`` (planned :class:`wsiseg.data.datasets.SlideTiles`), by slide index."""
        return StainTable(self.method, [slide.stain for slide in slides])


class StainTable:
    """Every planned slide's transform as tensors, so a batch mixing slides is normalised in one go on the device.

    Args:
        method: ``macenko`` or ``reinhard``.
        stains: one :class:`SlideStain` per planned slide, in plan order.
    """

    def __init__(self, method: str, stains: Sequence[SlideStain]) -> None:
        self.method = method
        self._host = (
            torch.from_numpy(np.stack([s.matrix for s in stains]).astype(np.float32)),
            torch.from_numpy(np.stack([s.offset for s in stains]).astype(np.float32)),
            torch.tensor([s.applied for s in stains], dtype=torch.bool),
        )
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def apply(self, images: torch.Tensor, slide_index: Any) -> torch.Tensor:
        """``images`` (N, 3, H, W) uint8 on their device, each through its slide's transform (:func:`apply_stain`);
        ``slide_index``: (N,) the slide of each tile (host tensor or list)."""
        device = images.device
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._host)
        matrix, offset, applied = self._on[device]
        index = torch.as_tensor(slide_index, dtype=torch.int64).to(device, non_blocking=True)
        return apply_stain(images, self.method, matrix[index], offset[index], applied[index])
