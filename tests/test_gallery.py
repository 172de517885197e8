"""Gallery: tile placement without overlap, canvas geometry, the PNG's size and resolution."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from citylib.figures import gallery


def _unique(cells: np.ndarray) -> bool:
    return len({tuple(c) for c in cells.tolist()}) == len(cells)


@pytest.mark.parametrize("n,grid", [(1, (1, 1)), (50, (8, 8)), (500, (32, 32)), (64, (8, 8))])
def test_every_tile_placed_once(n, grid):
    xy = np.random.default_rng(n).normal(size=(n, 2)) ** 3           # crowded centre
    cells = gallery.place_tiles(xy, grid)
    assert cells.shape == (n, 2) and cells.dtype == np.int64
    assert _unique(cells)
    assert (cells >= 0).all() and (cells[:, 0] < grid[0]).all() and (cells[:, 1] < grid[1]).all()
    np.testing.assert_array_equal(cells, gallery.place_tiles(xy.copy(), grid))   # deterministic


def test_points_on_distinct_cells_stay():
    rows, cols = 6, 9
    rng = np.random.default_rng(0)
    flat = rng.choice(rows * cols, 20, replace=False)
    cells = np.stack(np.divmod(flat, cols), 1)
    cells = np.vstack([[[0, 0], [rows - 1, cols - 1]], cells[~np.isin(flat, [0, rows * cols - 1])]])
    xy = np.stack([cells[:, 1], rows - 1 - cells[:, 0]], 1) * 2.5 + 3   # x: col; y: up = row 0
    np.testing.assert_array_equal(gallery.place_tiles(xy, (rows, cols)), cells)


def test_collision_goes_to_nearest_free_cell():
    # the middle point lands on cell (1, 1) as do the two beside it: the nearer one keeps it,
    # the other moves one cell; a tie between equal points goes to the lower index
    xy = np.array([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [1.1, 1.0], [1.0, 1.0]])
    cells = gallery.place_tiles(xy, (3, 3))
    assert cells[2].tolist() == [1, 1]
    assert _unique(cells)
    assert all(abs(cells[i] - [1, 1]).sum() == 1 for i in (3, 4))
    same = gallery.place_tiles(np.zeros((9, 2)), (3, 3))             # all at one point
    assert cells.shape and sorted(map(tuple, same.tolist())) == [(r, c) for r in range(3)
                                                                   for c in range(3)]
    assert same[0].tolist() == [1, 1]


def test_too_many_tiles_is_an_error():
    with pytest.raises(ValueError, match="10 tiles do not fit a 3 x 3 grid"):
        gallery.place_tiles(np.zeros((10, 2)), (3, 3))
    with pytest.raises(ValueError, match="finite"):
        gallery.place_tiles(np.array([[0.0, np.nan]]), (3, 3))
    assert gallery.place_tiles(np.zeros((0, 2)), (2, 2)).shape == (0, 2)


def test_grid_shape():
    xy = np.random.default_rng(0).random((500, 2)) * [4, 1]          # wide map
    rows, cols = gallery.grid_shape(xy, 500, 2.0)
    assert rows * cols >= 1000 and cols > rows
    assert gallery.grid_shape(np.zeros((3, 2)), 3, 1.0) == (2, 2)


def test_canvas_places_and_frames_tiles():
    tiles = np.stack([np.full((6, 6, 3), v, np.uint8) for v in (10, 20)])
    art = gallery.canvas(tiles, np.array([[0, 1], [1, 0]]), (2, 3), pad=1)
    assert art.shape == (16, 24, 3)
    assert (art[9:15, 1:7] == 20).all() and (art[1:7, 9:15] == 10).all()
    assert (art[0] == 255).all() and (art[1:7, 1:7] == 255).all()     # padding, empty cell
    framed = gallery.canvas(tiles, np.array([[0, 1], [1, 0]]), (2, 3),
                            frames=np.array([[200, 0, 0], [0, 0, 200]], np.uint8))
    assert framed[1, 9].tolist() == [200, 0, 0] and framed[4, 12].tolist() == [10, 10, 10]


def test_explanation_tiles():
    images = np.full((3, 32, 32, 3), 100, np.uint8)
    masks = np.zeros((2, 4, 4), np.float32)
    masks[0, :, :2] = 1.0                             # left half kept; an all-zero mask: black
    tiles = gallery.explanation_tiles(images, masks, 0.5, 8, rows=[2, 0])
    assert tiles.shape == (2, 8, 8, 3) and tiles.dtype == np.uint8
    assert (tiles[0, :, :3] == 100).all() and (tiles[0, :, 5:] == 0).all()
    assert (tiles[1] == 0).all()


def test_gallery_png_size_and_dpi(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (500, 46, 46, 3), dtype=np.uint8)
    xy = rng.normal(size=(500, 2))
    art = gallery.gallery(xy, tiles, fill=2.0)
    rows, cols = gallery.grid_shape(xy, 500, 2.0)
    assert art.shape == (rows * 48, cols * 48, 3)
    path = gallery.save_png(art, tmp_path / "g.png")
    with Image.open(path) as im:
        assert im.size == (cols * 48, rows * 48)
        assert round(im.info["dpi"][0]) == 300


def test_legend_strip():
    strip = gallery.legend_strip(300, ["a", "b"], np.array([[255, 0, 0], [0, 0, 255]]))
    assert strip.shape == (48, 300, 3)
    assert (strip == [255, 0, 0]).all(-1).any() and (strip == [0, 0, 255]).all(-1).any()
