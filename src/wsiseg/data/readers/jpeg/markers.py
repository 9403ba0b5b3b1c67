"""JPEG marker segments: a stored TIFF tile made into a standalone stream that decodes to RGB as OpenSlide decodes it.

TIFF writers (Aperio, libtiff) store each tile as an abbreviated JPEG stream whose quantisation and Huffman tables
live in the page's JPEGTables tag. :func:`tile_stream` inserts those tables after the tile's SOI (:func:`merge_tables`)
and, when the stream's own markers would make libjpeg convert colours otherwise than the TIFF photometric says
(:func:`jpeg_colour_space`), replaces its JFIF/Adobe markers with an Adobe APP14 marker carrying the right transform —
what OpenSlide (libtiff) does, whatever markers the stream carries.

Units: positions are byte offsets into a stream; a marker is the byte that follows 0xFF. The colour kinds
:data:`COLOUR_YCBCR` and :data:`COLOUR_RGB` say which conversion the decoder applies. No pixel geometry here.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["COLOUR_RGB", "COLOUR_YCBCR", "jpeg_colour_space", "merge_tables", "tile_stream"]

COLOUR_YCBCR = 0  # the decoder converts YCbCr → RGB
COLOUR_RGB = 1  # the components are R, G, B already (no conversion)

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_APP0, _APP14 = 0xE0, 0xEE
_SOF_ALL = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length field


def _segments(data: bytes, start: int = 2) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of the marker segments of a JPEG stream from ``start`` (just past SOI) up to and including
    SOS or EOI; ``end`` is exclusive. Raises ValueError on a malformed header."""
    pos, size = start, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}, found 0x{data[pos]:02x}")
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= size:
            break
        marker = data[pos + 1]
        if marker in _STANDALONE or marker in (_SOI, _EOI):
            yield marker, pos, pos + 2
            if marker == _EOI:
                return
            pos += 2
            continue
        if pos + 4 > size:
            raise ValueError(f"JPEG segment 0x{marker:02x} at byte {pos} is truncated")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            raise ValueError(f"JPEG segment 0x{marker:02x} at byte {pos} runs past the end of the data")
        yield marker, pos, end
        if marker == _SOS:
            return
        pos = end
    raise ValueError("JPEG stream ends before its scan (no SOS or EOI marker)")


def _is_jfif(data: bytes, start: int, end: int) -> bool:
    return data[start + 4 : start + 9] == b"JFIF\x00"


def _adobe_transform(data: bytes, start: int, end: int) -> int | None:
    """The colour transform byte of an Adobe APP14 segment, or None for another APP14."""
    if data[start + 4 : start + 9] != b"Adobe" or end - start < 16:
        return None
    return data[start + 15]


def _adobe_segment(transform: int) -> bytes:
    """An Adobe APP14 segment: version 100, no flags, ``transform`` (0 = no conversion / RGB, 1 = YCbCr)."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def jpeg_colour_space(stream: bytes) -> int:
    """How libjpeg (libjpeg-turbo, as in OpenSlide and torchvision) interprets a 3-component stream by its own
    markers: JFIF → YCbCr; else Adobe APP14 transform 0 → RGB, other transforms → YCbCr; else component IDs
    'R','G','B' → RGB; else YCbCr. Returns :data:`COLOUR_RGB` or :data:`COLOUR_YCBCR`."""
    adobe: int | None = None
    ids: tuple[int, ...] = ()
    for marker, start, end in _segments(stream):
        if marker == _APP0 and _is_jfif(stream, start, end):
            return COLOUR_YCBCR
        if marker == _APP14 and adobe is None:
            adobe = _adobe_transform(stream, start, end)
        if marker in _SOF_ALL:
            count = stream[start + 9]
            ids = tuple(stream[start + 10 + 3 * k] for k in range(count))
    if adobe is not None:
        return COLOUR_RGB if adobe == 0 else COLOUR_YCBCR
    return COLOUR_RGB if ids == (82, 71, 66) else COLOUR_YCBCR


def merge_tables(tile: bytes, tables: bytes | None) -> bytes:
    """A full JPEG stream from an abbreviated tile stream and the level's JPEGTables: the tables' segments (DQT, DHT,
    …) go right after the tile's SOI; the tables' own SOI and EOI are dropped. Tables defined again in the tile come
    later and so win, as TIFF requires. Returns ``tile`` unchanged when ``tables`` is None or empty."""
    if not tile.startswith(b"\xff\xd8"):
        raise ValueError("JPEG tile does not start with SOI")
    if not tables:
        return tile
    if not tables.startswith(b"\xff\xd8"):
        raise ValueError("JPEGTables does not start with SOI")
    body = [tables[start:end] for marker, start, end in _segments(tables) if marker not in (_SOI, _EOI)]
    return b"\xff\xd8" + b"".join(body) + tile[2:]


def tile_stream(tile: bytes, tables: bytes | None, colour: int) -> bytes:
    """A standalone JPEG stream for one stored tile that decodes to RGB as OpenSlide decodes it.

    Merges ``tables`` (:func:`merge_tables`), then makes the stream's colour interpretation follow ``colour`` (from
    the TIFF photometric, which libtiff — and so OpenSlide — obeys whatever the stream's markers say): when libjpeg
    would read the stream otherwise (:func:`jpeg_colour_space`; e.g. Aperio's RGB tiles carry no marker and would be
    taken as YCbCr), its JFIF/Adobe markers are dropped and an Adobe APP14 with the right transform is put first.

    Raises:
        ValueError: the tile is not a JPEG stream, or its header is malformed.
    """
    stream = merge_tables(tile, tables)
    if jpeg_colour_space(stream) == colour:
        return stream
    kept = []
    for marker, start, end in _segments(stream):
        if marker == _SOS:
            kept.append(stream[start:])
            break
        if (marker == _APP0 and _is_jfif(stream, start, end)) or (
            marker == _APP14 and _adobe_transform(stream, start, end) is not None
        ):
            continue
        kept.append(stream[start:end])
    transform = 0 if colour == COLOUR_RGB else 1
    return b"\xff\xd8" + _adobe_segment(transform) + b"".join(kept)


def _sof(stream: bytes) -> tuple[int, int, int, int, int]:
    """(SOF marker, precision, height, width, components) of a full stream."""
    for marker, start, _end in _segments(stream):
        if marker in _SOF_ALL:
            s = stream[start + 4 :]
            return marker, s[0], int.from_bytes(s[1:3], "big"), int.from_bytes(s[3:5], "big"), s[5]
    raise ValueError("no SOF marker before the scan")
