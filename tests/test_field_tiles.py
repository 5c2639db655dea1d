"""Native-resolution tiles of a field (--input tiles): the grid, padding and stitching."""

from __future__ import annotations

import numpy as np
import pytest

from histoclass.data.field_tiles import InputMode, field_tiles, stitch, tile_boxes


def test_breakhis_field_at_224_gives_twelve_tiles_ending_at_the_border():
    boxes = tile_boxes(700, 460, 224)
    assert sorted({x for x, _ in boxes}) == [0, 224, 448, 476]  # 476 = 700 - 224
    assert sorted({y for _, y in boxes}) == [0, 224, 236]  # 236 = 460 - 224
    assert len(boxes) == 12
    assert boxes[:5] == [(0, 0), (224, 0), (448, 0), (476, 0), (0, 224)]  # row by row


def test_stride_and_exact_fit():
    assert tile_boxes(224, 224, 224) == [(0, 0)]
    # stride 112 over 448: 0, 112, 224 (224 + 224 = 448 ends at the border: nothing added)
    assert sorted({x for x, _ in tile_boxes(448, 224, 224, 112)}) == [0, 112, 224]


def test_small_field_is_reflect_padded():
    assert tile_boxes(100, 300, 224) == [(0, 0), (0, 76)]
    arr = np.arange(300 * 100 * 3, dtype=np.int64).reshape(300, 100, 3).astype(np.uint8)
    tiles = field_tiles(arr, 224)
    assert tiles.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(tiles[0, :, :100], arr[:224])
    # column 100 mirrors column 98 (reflect, without repeating the edge)
    np.testing.assert_array_equal(tiles[0, :, 100], arr[:224, 98])


def test_stitch_averages_overlaps_and_has_the_field_shape():
    maps = np.stack([np.full((224, 224), float(i)) for i in range(12)])
    full = stitch(maps, 700, 460, 224)
    assert full.shape == (460, 700)
    assert full[0, 0] == 0 and full[0, 230] == 1
    assert full[0, 460] == 2  # only the tile at 448
    assert full[0, 500] == pytest.approx((2 + 3) / 2)  # x 500: tiles at 448 and 476
    assert full[459, 699] == 11


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="stride 300: must be an integer in"):
        tile_boxes(700, 460, 224, 300)
    with pytest.raises(ValueError, match="input mode 'crop': choose one of resize, tiles"):
        InputMode.from_dict({"mode": "crop"})
    assert InputMode.from_dict(None) == InputMode()  # old files: resize
    tiles = InputMode.from_dict({"mode": "tiles", "size": 224, "stride": None})
    assert (tiles.tiles, tiles.stride) == (True, 224)
    assert InputMode.from_dict(tiles.to_dict()) == tiles
