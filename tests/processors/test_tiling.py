"""Grid choice, token counts and tile pixels against transformers' PerceptionLMImageProcessor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from plm_serve.processors.image_decode import decode_image, probe_image
from plm_serve.processors.limits import MediaLimits
from plm_serve.processors.tiling import resize_uint8, select_grid, tile_image
from tests.processors import media
from tests.processors.conftest import hf_image_processor

SIZES = [
    (1, 1), (1, 5000), (5000, 1), (33, 47), (47, 33), (448, 448), (449, 448), (447, 449), (640, 480),
    (480, 640), (800, 600), (1024, 768), (768, 1024), (1280, 720), (1920, 1080), (1080, 1920), (2560, 1440),
    (3840, 2160), (4032, 3024), (3024, 4032), (6000, 4000), (4000, 3000), (300, 2000), (2000, 300),
    (1000, 200), (100, 5000), (5000, 100), (3000, 3000), (333, 517), (1001, 999), (897, 449), (1345, 2689),
    (224, 224), (2, 3), (7919, 13), (13, 7919), (8000, 8000), (2689, 1345), (12345, 6789), (896, 448),
]  # fmt: skip
MAX_TILES = [1, 2, 3, 4, 5, 8, 9, 16, 36]


def hf_grid(width: int, height: int, max_num_tiles: int) -> tuple[int, int]:
    hf = hf_image_processor(max_num_tiles)
    grid = hf._fit_image_to_canvas(img_width=width, img_height=height, tile_size=448)
    return grid or hf._find_closest_aspect_ratio(img_width=width, img_height=height, tile_size=448)


@pytest.mark.parametrize("max_num_tiles", MAX_TILES)
def test_grid_matches_reference(max_num_tiles: int) -> None:
    for width, height in SIZES:
        assert select_grid(width, height, 448, max_num_tiles) == hf_grid(width, height, max_num_tiles), (
            width,
            height,
        )


def test_grid_matches_reference_on_random_sizes() -> None:
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 9000, size=(300, 2)).tolist():
        for max_num_tiles in (4, 36):
            assert select_grid(width, height, 448, max_num_tiles) == hf_grid(width, height, max_num_tiles)


def test_token_counts_match_reference_processor(processor, hf_processor) -> None:
    """count_image_tokens == transformers' `_get_num_multimodal_tokens` (checkpoint: max_num_tiles = 4)."""
    ours = [processor.count_image_tokens(w, h) for w, h in SIZES]
    theirs = hf_processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in SIZES]).num_image_tokens
    assert ours == theirs


# Grids transformers picks with max_num_tiles = 36 (measured with its image processor)
TABLE = {
    (448, 448): 9472, (224, 224): 9472, (2048, 2048): 9472, (640, 480): 9216, (1024, 768): 9216,
    (768, 1024): 9216, (1920, 1080): 8448, (1080, 1920): 8448, (300, 2000): 7424, (2000, 300): 7424,
    (1000, 200): 9472, (100, 5000): 9472, (3000, 3000): 9472, (3840, 2160): 7424, (4000, 3000): 3328,
    (4032, 3024): 3328, (6000, 4000): 6400,
}  # fmt: skip


def test_token_table() -> None:
    for (width, height), tokens in TABLE.items():
        n_w, n_h = select_grid(width, height, 448, 36)
        assert (n_w * n_h + 1) * 256 == tokens, (width, height)


def test_request_max_num_tiles_lowers_the_grid(processor) -> None:
    """A request's max_num_tiles acts like the reference's *attribute* max_num_tiles (never raises it)."""
    for width, height in SIZES:
        for limit in (1, 2, 3):
            n_w, n_h = hf_grid(width, height, limit)
            assert processor.count_image_tokens(width, height, max_num_tiles=limit) == (n_w * n_h + 1) * 256
        assert processor.count_image_tokens(width, height, max_num_tiles=99) == processor.count_image_tokens(
            width, height
        )
    assert processor.count_image_tokens(640, 480, detail="low") == 256


def _smooth(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(media.photo(w, h, seed)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest-exact", "lanczos"])
def test_resize_matches_torchvision(mode: str) -> None:
    """4-channel channels-last resize == torchvision v2 on the reference 3-channel CHW tensor, bit for bit."""
    if mode == "lanczos" and not _has_mode(mode):
        pytest.skip("this torch has no lanczos interpolation")  # torch 2.11 (the GPU machine); 2.14 has it
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    interpolation = InterpolationMode(mode)
    cases = [
        ((97, 131), (448, 448)),
        ((480, 640), (1344, 1792)),
        ((1000, 200), (448, 1792)),
        ((3, 700), (896, 448)),
    ]
    rng = np.random.default_rng(1)
    for i, ((h, w), (oh, ow)) in enumerate(cases):
        for image in (_smooth(h, w, i), torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))):
            expected = tvF.resize(image, [oh, ow], interpolation=interpolation, antialias=True)
            rgbx = torch.cat([image, torch.full((1, h, w), 255, dtype=torch.uint8)])
            rgbx = rgbx.permute(1, 2, 0).contiguous().unsqueeze(0).permute(0, 3, 1, 2)  # [1, 4, h, w] CL
            ours = resize_uint8(rgbx, oh, ow, mode)[0, :3]
            assert torch.equal(ours, expected), (mode, h, w, oh, ow)


def _ours_tiles(data: bytes, max_num_tiles: int, tiled: bool = True, tile_size: int = 448) -> torch.Tensor:
    probe = probe_image(data, MediaLimits())
    grid = select_grid(probe.width, probe.height, tile_size, max_num_tiles) if tiled else None
    return tile_image(decode_image(probe), grid, tile_size, "bicubic")


def _hf_pixels(data: bytes, hf) -> torch.Tensor:
    return hf(Image.open(io.BytesIO(data)), return_tensors=None)["pixel_values"][0]


def _normalize(tiles: torch.Tensor) -> torch.Tensor:
    return (tiles.float() - 127.5) / 127.5  # what the model does with our uint8 tiles


@pytest.mark.parametrize(
    ("width", "height", "max_num_tiles"),
    [(640, 480, 4), (1024, 768, 36), (333, 517, 9), (1, 900, 4), (2000, 300, 2), (5000, 3000, 4)],
)
def test_tiles_match_reference_pixels(width: int, height: int, max_num_tiles: int) -> None:
    data = media.jpeg(width, height, seed=width)
    ours = _ours_tiles(data, max_num_tiles)
    theirs = _hf_pixels(data, hf_image_processor(max_num_tiles))
    assert ours.dtype == torch.uint8 and ours.is_contiguous()
    assert ours.shape == theirs.shape
    # The brief allows one grey level; on this CPU path we are bit-exact.
    assert (_normalize(ours) - theirs).abs().max().item() <= 1 / 127.5 + 1e-6
    assert torch.equal(_normalize(ours), theirs)


def test_single_tile_mode_matches_reference() -> None:
    data = media.jpeg(700, 300, seed=3)
    ours = _ours_tiles(data, 36, tiled=False)
    theirs = _hf_pixels(data, hf_image_processor(36, vision_input_type="vanilla"))
    assert ours.shape == (1, 3, 448, 448)
    assert torch.equal(_normalize(ours), theirs)


def test_tile_size_is_honoured() -> None:
    data = media.jpeg(500, 450, seed=4)
    ours = _ours_tiles(data, 4, tile_size=224)
    theirs = _hf_pixels(data, hf_image_processor(4, tile_size=224))
    assert ours.shape == theirs.shape == (5, 3, 224, 224)  # the reference's 500×450 test: 4 tiles + thumbnail
    assert torch.equal(_normalize(ours), theirs)


def test_reference_ignores_size() -> None:
    """transformers' PLM image processor resizes to tile_size and never reads `size`; so do we."""
    data = media.jpeg(300, 200, seed=5)
    hf = hf_image_processor(2)
    small = type(hf)(
        max_num_tiles=2, size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    assert torch.equal(_hf_pixels(data, hf), _hf_pixels(data, small))


@pytest.mark.gpu
def test_cuda_resize_matches_reference_on_cuda() -> None:
    """On CUDA, resizing goes through float (like torchvision there): equal to transformers run on CUDA."""
    data = media.jpeg(1024, 768, seed=6)
    probe = probe_image(data, MediaLimits())
    grid = select_grid(probe.width, probe.height, 448, 36)
    ours = tile_image(decode_image(probe).cuda(), grid, 448, "bicubic")
    hf = hf_image_processor(36)
    theirs = hf(Image.open(io.BytesIO(data)), return_tensors=None, device="cuda")["pixel_values"][0]
    # Compared as uint8: on CUDA, dividing by a scalar multiplies by its reciprocal, so normalizing our tiles
    # with `/ 127.5` can differ from transformers' division by a tensor in the last float bit.
    assert torch.equal(ours, (theirs * 127.5 + 127.5).round().to(torch.uint8))


def _has_mode(mode: str) -> bool:
    try:
        torch.nn.functional.interpolate(torch.zeros((1, 1, 4, 4)), size=(2, 2), mode=mode, antialias=True)
    except (ValueError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "lanczos"])
def test_planar_canvas_is_bit_identical(mode: str) -> None:
    """Two passes with planar lanes in between, on 1..7 threads == one resize call (up- and downscaling)."""
    from plm_serve.processors.tiling import _planar_canvas, split_tiles

    if not _has_mode(mode):
        pytest.skip(f"this torch has no {mode} interpolation")

    cases = [
        ((480, 640), (5, 7)), ((3024, 4032), (3, 4)), ((97, 1001), (1, 9)), ((448, 896), (1, 2)),
        ((2000, 50), (9, 1)), ((448, 333), (1, 3)), ((901, 448), (2, 1)),
    ]  # fmt: skip
    for i, ((h, w), (n_h, n_w)) in enumerate(cases):
        rng = np.random.default_rng(i)
        rgb = _smooth(h, w, i) if i % 2 else torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        image = torch.cat([rgb, torch.zeros((1, h, w), dtype=torch.uint8)]).unsqueeze(0)
        image = image.contiguous(memory_format=torch.channels_last)
        expected = torch.empty((n_h, n_w, 3, 448, 448), dtype=torch.uint8)
        split_tiles(resize_uint8(image, n_h * 448, n_w * 448, mode), expected)
        for workers in (1, 2, 3, 7):
            ours = torch.empty_like(expected)
            _planar_canvas(image, ours, mode, workers)
            assert torch.equal(ours, expected), (h, w, n_h, n_w, workers)
