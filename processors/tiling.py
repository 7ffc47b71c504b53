"""Thumbnail + tile grid of PerceptionLM images, on uint8 tensors.

The grid rule is transformers' `PerceptionLMImageProcessor` (a Llama-3.2-Vision style canvas choice), see
docs/checkpoint-format.md (images): among all n_w×n_h grids with at most `max_num_tiles` tiles, take the canvas that covers
the image and lets its aspect-preserving fit grow the most (so small images are *upscaled* to the biggest
fitting canvas); if no canvas covers the image, take the grid of the closest aspect ratio. The image is then
stretched (no padding) to that canvas and cut into tiles, row-major, after a 448² thumbnail of the whole
image.

Resizing mirrors torchvision v2's `resize` on uint8 tensors, which is what transformers calls: on the
CPU a native uint8 antialiased kernel for bicubic/lanczos (and bilinear on AVX2/ARM), otherwise float
interpolation, clamp (bicubic/lanczos overshoot) and round. The native kernel is separable and keeps every
channel independent, so feeding it a 4-channel channels-last RGBX tensor gives the same RGB values as
transformers' 3-channel CHW tensor while skipping the kernel's internal repacking, about twice as fast.
"""

from __future__ import annotations

import functools
import itertools
import math
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

Grid = tuple[int, int]  # (n_w, n_h): tiles across, tiles down


@functools.lru_cache(maxsize=64)
def _arrangements(max_num_tiles: int) -> tuple[dict[float, tuple[Grid, ...]], tuple[Grid, ...]]:
    """Grids grouped by aspect ratio n_w/n_h, and all grids flattened, both in the reference's order.

    Order matters: tile counts go from `max_num_tiles` down to 1, factor pairs by ascending n_w; a ratio seen
    again (e.g. 2×2 after 6×6) joins its first group. The fit pass lets later candidates win ties.
    """
    groups: dict[float, list[Grid]] = {}
    for count in range(max_num_tiles, 0, -1):
        for n_w in range(1, count + 1):
            if count % n_w == 0:
                n_h = count // n_w
                groups.setdefault(n_w / n_h, []).append((n_w, n_h))
    frozen = {ratio: tuple(grids) for ratio, grids in groups.items()}
    return frozen, tuple(grid for grids in frozen.values() for grid in grids)


def _fitted_size(width: int, height: int, canvas_w: int, canvas_h: int) -> tuple[float, float]:
    """The image scaled into the canvas, aspect ratio kept (the long side may stay fractional)."""
    scale = width / height
    factor = min(canvas_w / width, canvas_h / height)
    if scale > 1.0:
        new_w = factor * width
        return new_w, math.floor(new_w / scale)
    new_h = factor * height
    return math.floor(new_h * scale), new_h


def _fit_canvas(width: int, height: int, tile_size: int, max_num_tiles: int) -> Grid | None:
    """The covering canvas on which the fitted image's short side is largest (ties: the later grid wins)."""
    best: Grid | None = None
    best_size = (0.0, 0.0)
    portrait = width / height < 1.0
    for n_w, n_h in _arrangements(max_num_tiles)[1]:
        if n_w * tile_size < width or n_h * tile_size < height:
            continue
        size = _fitted_size(width, height, n_w * tile_size, n_h * tile_size)
        if best is None or (size[0] >= best_size[0] if portrait else size[1] >= best_size[1]):
            best, best_size = (n_w, n_h), size
    return best


def _closest_ratio(width: int, height: int, max_num_tiles: int) -> Grid:
    """Fallback for images larger than every canvas: the grid of the nearest aspect ratio (same side of 1)."""
    groups = _arrangements(max_num_tiles)[0]
    target = width / height
    if target >= 1:
        ratio = min((r for r in groups if r <= target), key=lambda r: abs(r - target))
        return max(groups[ratio], key=lambda grid: grid[0])  # widest grid of that ratio
    ratio = min((r for r in groups if r > target), key=lambda r: abs(1 / r - 1 / target))
    return max(groups[ratio], key=lambda grid: grid[1])  # tallest grid of that ratio


@functools.lru_cache(maxsize=4096)
def select_grid(width: int, height: int, tile_size: int, max_num_tiles: int) -> Grid:
    """The (n_w, n_h) grid of a `width`×`height` image: a pure function of the size, no pixels needed."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_num_tiles < 1:
        raise ValueError("max_num_tiles must be at least 1")
    return _fit_canvas(width, height, tile_size, max_num_tiles) or _closest_ratio(
        width, height, max_num_tiles
    )


def _native_uint8(mode: str, device: torch.device) -> bool:
    """Whether torchvision v2 resizes uint8 directly (no float round trip) for this mode on this device."""
    if mode.startswith("nearest"):
        return True
    if device.type != "cpu":
        return False
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return mode in ("bicubic", "lanczos")


def resize_uint8(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to [N, C', height, width] exactly like torchvision v2 `resize(antialias=True)`.

    Native path (CPU): C' = C, and channels-last inputs give channels-last outputs (the kernel's fast layout).
    Float path (CUDA; bilinear on CPUs without AVX2): C' = 3, computed on a contiguous RGB tensor as torchvision
    does, since float kernels may round differently on other layouts.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    antialias = mode in ("bilinear", "bicubic", "lanczos")
    resize = functools.partial(
        F.interpolate,
        size=(height, width),
        mode=mode,
        antialias=antialias,
        align_corners=False if antialias else None,
    )
    if _native_uint8(mode, image.device):
        return resize(image)
    out = resize(image[:, :3].contiguous().float())
    if mode in ("bicubic", "lanczos"):
        out.clamp_(0, 255)  # cubic overshoot; bilinear cannot leave [0, 255]
    return out.round_().to(torch.uint8)


def tile_image(image: torch.Tensor, grid: Grid | None, tile_size: int, mode: str) -> torch.Tensor:
    """Thumbnail (+ grid tiles) of one image.

    image: uint8 [1, C, H, W], C = 3 or 4 (RGB + padding channel), ideally channels-last, on any device.
    grid: (n_w, n_h), or None for the single-tile mode (just the stretched thumbnail).
    Returns contiguous uint8 [1 + n_w·n_h, 3, tile, tile] on the image's device: thumbnail first, then tiles in
    row-major order.
    """
    n_w, n_h = grid or (0, 0)
    t = tile_size
    out = torch.empty((1 + n_w * n_h, 3, t, t), dtype=torch.uint8, device=image.device)
    planar = (
        _native_uint8(mode, image.device) and mode != "nearest-exact" and t % 4 == 0 and image.shape[1] == 4
    )
    if grid is None or not planar:
        to_planar(resize_uint8(image, t, t, mode), out[:1])
        if grid is not None:
            split_tiles(resize_uint8(image, n_h * t, n_w * t, mode), out[1:].view(n_h, n_w, 3, t, t))
        return out
    threads = torch.get_num_threads()
    workers = min(threads, n_w) if threads >= _PARALLEL_MIN_THREADS else 1
    # The thumbnail does not depend on the canvas: with threads, it is resized alongside.
    thumbnail = _executor().submit(resize_uint8, image, t, t, mode) if workers > 1 else None
    _planar_canvas(image, out[1:].view(n_h, n_w, 3, t, t), mode, workers)
    to_planar(thumbnail.result() if thumbnail else resize_uint8(image, t, t, mode), out[:1])
    return out


# The canvas resize, the bulk of the work, in two passes with planar data in between.
#
# The native uint8 kernel is separable and exact in two calls: a horizontal pass (each output row depends on one
# input row) with uint8 rounding, then a vertical pass (each output column depends on one column). It works on
# 4 independent byte lanes per pixel. The horizontal pass runs on the RGBX image (lanes = channels). Its output is
# split into R, G, B planes, and the vertical pass runs on each plane viewed as 4 neighbouring pixels per "pixel"
# (lanes = columns, legal since columns are independent there). The result is already planar: no RGBX canvas to
# de-interleave, no work on the padding channel, and only a block copy into the tiles is left. Both passes also
# split across threads (rows, then tile columns) with identical results, worth it as the kernel itself runs on one
# thread. All of it is tested against one plain resize call.
_PARALLEL_MIN_THREADS = 2
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(2, torch.get_num_threads()), thread_name_prefix="plm-resize")
        return _pool


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """range(n) cut into at most `parts` nearly equal, non-empty [lo, hi) pieces."""
    bounds = sorted({n * i // parts for i in range(parts + 1)})
    return list(itertools.pairwise(bounds))


def _run(fn, ranges: list[tuple[int, int]]) -> None:
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    pool = _executor()
    for future in [pool.submit(fn, lo, hi) for lo, hi in ranges]:
        future.result()


def _planar_canvas(image: torch.Tensor, tiles: torch.Tensor, mode: str, workers: int) -> None:
    """Resize RGBX `image` [1, 4, h, w] (channels-last) to the canvas of `tiles` [n_h, n_w, 3, t, t] and cut it."""
    n_h, n_w, _, t, _ = tiles.shape
    h = image.shape[2]
    planes = torch.empty((1, 3, h, n_w * t), dtype=torch.uint8)  # after the horizontal pass

    def horizontal(lo: int, hi: int) -> None:
        to_planar(resize_uint8(image[:, :, lo:hi], hi - lo, n_w * t, mode), planes[:, :, lo:hi])

    def vertical(lo: int, hi: int) -> None:  # tile columns lo..hi
        columns = planes[0, :, :, lo * t : hi * t]  # [3, h, k·t]
        lanes = columns.unflatten(2, (-1, 4)).permute(0, 3, 1, 2)  # [3, 4, h, k·t/4]: 4 neighbours as lanes
        resized = resize_uint8(lanes, n_h * t, (hi - lo) * t // 4, mode)  # [3, 4, n_h·t, k·t/4]
        canvas = resized.permute(0, 2, 3, 1).reshape(3, n_h, t, hi - lo, t)  # planar [3, n_h·t, k·t]
        tiles[:, lo:hi].copy_(canvas.permute(1, 3, 0, 2, 4))  # rows of t contiguous bytes: a block copy

    _run(horizontal, _ranges(h, workers))
    _run(vertical, _ranges(n_w, workers))


def split_tiles(canvas: torch.Tensor, tiles: torch.Tensor) -> None:
    """Cut canvas [1, C, n_h·t, n_w·t] into tiles uint8 [n_h, n_w, 3, t, t], one row of tiles at a time."""
    n_h, n_w, _, t, _ = tiles.shape
    for row in range(n_h):
        band = canvas[:, :, row * t : (row + 1) * t]  # [1, C, t, n_w·t]
        # -> [1, C, t, n_w, t] -> [n_w, C, t, t]: the band's tiles side by side, as a view
        to_planar(band.unflatten(3, (n_w, t)).permute(3, 1, 2, 4, 0).squeeze(-1), tiles[row])


def to_planar(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the RGB channels of src [N, C, H, W] into dst uint8 [N, 3, H, W] (contiguous planes).

    A plain copy from channels-last RGBX gathers every 4th byte, which the CPU copy kernel does slowly (~3 GB/s).
    Read as int32 pixels instead (little-endian: R is the low byte), each plane is a vectorized narrowing cast of
    `pixel >> 8·c` written straight into dst: 2-3x faster.
    """
    fast = (
        src.device.type == "cpu"
        and src.dtype == torch.uint8
        and src.shape[1] == 4
        and src.stride(1) == 1  # the 4 bytes of a pixel are adjacent...
        and src.storage_offset() % 4 == 0  # ...and word-aligned
        and sys.byteorder == "little"
    )
    if not fast:
        dst.copy_(src[:, :3])
        return
    pixels = src.permute(0, 2, 3, 1).view(torch.int32).squeeze(-1)  # [N, H, W] int32, a view
    dst[:, 0].copy_(pixels)  # int32 -> uint8 keeps the low byte
    torch.bitwise_right_shift(pixels, 8, out=dst[:, 1])
    torch.bitwise_right_shift(pixels, 16, out=dst[:, 2])


def resize_frame(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """One video frame (uint8 [1, C, H, W]) stretched to uint8 [3, height, width]."""
    out = torch.empty((1, 3, height, width), dtype=torch.uint8, device=image.device)
    to_planar(resize_uint8(image, height, width, mode), out)
    return out[0]
