"""The slide writer's options, checked before any slide is opened."""

from __future__ import annotations

import pytest

from wsiseg.errors import UserInputError
from wsiseg.writers.options import slide_writer_options


def test_options_are_grouped_and_bad_ones_name_their_key() -> None:
    options = slide_writer_options(blend="linear", chunk=1024, cache_mb=2, tiff_tile=256, contours="geojson")
    assert (options.store.blend, options.store.chunk, options.store.cache_bytes) == ("linear", 1024, 2 << 20)
    assert options.render.contours == ("geojson",) and options.blend_thread == "auto"
    for bad, message in [
        ({"blend": "cubic"}, "writer.blend must be one of"),
        ({"chunk": 500}, r"writer.chunk \(500\) must be a multiple of 2 x writer.tiff_tile \(256\), e.g. 512"),
        ({"blend_thread": "yes"}, "writer.blend_thread must be auto, true or false"),
        ({"threshold": 0}, r"writer.threshold must be in \(0, 1\]"),
        ({"blend_thred": True}, "writer.blend_thred is not an option of writer=slide"),
    ]:
        with pytest.raises(UserInputError, match=message):
            slide_writer_options(**bad)
