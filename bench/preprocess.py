"""Image preprocessing throughput: ours vs transformers' PerceptionLMImageProcessor, side by side.

    python bench/preprocess.py                         # 1024x768 JPEG, 36 tiles max, on this machine's CPU
    python bench/preprocess.py --size 1920x1080 --rounds 7 --iters 10

Each system goes from JPEG bytes to the tiles of one photo:
- transformers: `Image.open` -> `PerceptionLMImageProcessor` -> float32 [T, 3, 448, 448] (its only output);
- ours: `probe_image` -> `decode_image` -> `tile_image` -> uint8 [T, 3, 448, 448] (the model normalizes).
Measurements are interleaved round by round (ours, then transformers) so that both see the same machine load;
the table reports the median time per photo. Also: our time split into decode / resize / split, our
whole `Processor.process_chat` for one image with text, two worker threads (the server runs preprocessing in
`asyncio.to_thread`), and, where CUDA is available, the resize on the GPU. The table is printed and written
to bench/results/preprocess-<date>-<cpu|cuda>.md with the date and the hardware.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import source_tree  # bench/ is first on sys.path when a script here runs

source_tree.ensure_importable()

from plm_serve.processors.image_decode import decode_image, probe_image
from plm_serve.processors.limits import MediaLimits
from plm_serve.processors.tiling import select_grid, tile_image

Row = tuple[str, float, str]  # (system, ms per photo, note)


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth gradients, soft blobs, sensor-like noise), quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width - 1
    y /= height - 1
    img = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x) * y + 60], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(
            -80, 80, size=3
        )
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def hardware() -> str:
    model, cores = platform.processor() or platform.machine(), os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cores = int(value.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    text = (
        f"CPU: {model}, {cores} cores; torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)"
    )
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name()}"
    return text


def interleaved(systems: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each system, measured round-robin (each round: `iters` calls of each)."""
    for fn in systems.values():  # warm-up: allocator, kernels, lazy imports
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, fn in systems.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def threaded(fn: Callable[[], object], workers: int, calls: int) -> float:
    """Seconds per call with `workers` threads calling `fn` concurrently."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: fn(), range(workers * 2)))  # warm-up
        start = time.perf_counter()
        list(pool.map(lambda _: fn(), range(calls)))
        return (time.perf_counter() - start) / calls


def cpu_rows(data: bytes, max_num_tiles: int, rounds: int, iters: int) -> tuple[list[Row], int]:
    from transformers import PerceptionLMImageProcessor

    limits = MediaLimits()
    hf = PerceptionLMImageProcessor(max_num_tiles=max_num_tiles, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def ours() -> torch.Tensor:
        probe = probe_image(data, limits)
        return tile_image(
            decode_image(probe), select_grid(probe.width, probe.height, 448, max_num_tiles), 448, "bicubic"
        )

    def theirs() -> torch.Tensor:
        return hf(Image.open(io.BytesIO(data)), return_tensors=None)["pixel_values"][0]

    tiles, reference = ours(), theirs()
    exact = torch.equal((tiles.float() - 127.5) / 127.5, reference)
    times = interleaved({"ours": ours, "transformers": theirs}, rounds, iters)
    speedup = times["transformers"] / times["ours"]
    rows: list[Row] = [
        ("transformers PerceptionLMImageProcessor (float32 tiles)", times["transformers"], "reference"),
        (
            "ours: bytes -> uint8 tiles",
            times["ours"],
            f"{speedup:.1f}x faster; bit-exact: {'yes' if exact else 'NO'}",
        ),
    ]

    probe = probe_image(data, limits)
    grid = select_grid(probe.width, probe.height, 448, max_num_tiles)
    image = decode_image(probe_image(data, limits))
    parts = interleaved(
        {
            "decode": lambda: decode_image(probe_image(data, limits)),
            "tile": lambda: tile_image(image, grid, 448, "bicubic"),
        },
        rounds,
        iters,
    )
    threads = torch.get_num_threads()
    workers = min(threads, grid[0]) if threads >= 2 else 1
    rows += [
        ("  ours, step: header + JPEG decode to RGBX", parts["decode"], "PIL, once"),
        (
            "  ours, step: thumbnail + canvas + tiles",
            parts["tile"],
            f"native uint8 bicubic, RGBX then planar passes, {workers} thread(s)",
        ),
    ]

    chat = chat_row(data, max_num_tiles, rounds, iters)
    if chat is not None:
        rows.append(chat)
    for workers in (2,):
        rows.append(
            (f"transformers, {workers} worker threads", threaded(theirs, workers, 4 * iters), "per photo")
        )
        rows.append((f"ours, {workers} worker threads", threaded(ours, workers, 4 * iters), "per photo"))
    return rows, tiles.shape[0]


def chat_row(data: bytes, max_num_tiles: int, rounds: int, iters: int) -> Row | None:
    """Our whole chat path for one image + text: parse, probe, count, template, tokenize, hash, pixels."""
    try:
        from plm_serve.processors import ImageInput, Processor, write_processor_files

        folder = write_processor_files(tempfile.mkdtemp(prefix="plm-bench-"), max_num_tiles=max_num_tiles)
    except Exception as e:  # llama-models (the tokenizer source) may be missing on a bare GPU machine
        print(f"skipping the process_chat row: {e}")
        return None
    processor = Processor.from_pretrained(folder)
    messages = [
        {"role": "user", "content": [ImageInput(data), {"type": "text", "text": "Describe the photo."}]}
    ]
    seconds = interleaved({"chat": lambda: processor.process_chat(messages)}, rounds, iters)["chat"]
    return ("ours: Processor.process_chat (1 photo + text)", seconds, "template, tokens, sha256, tiles")


def cuda_rows(data: bytes, max_num_tiles: int, rounds: int, iters: int) -> list[Row]:
    """Resize on the GPU: ours (float path, like torchvision on CUDA) vs transformers with device="cuda"."""
    from transformers import PerceptionLMImageProcessor

    limits = MediaLimits()
    hf = PerceptionLMImageProcessor(max_num_tiles=max_num_tiles, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    probe = probe_image(data, limits)
    grid = select_grid(probe.width, probe.height, 448, max_num_tiles)
    host = decode_image(probe_image(data, limits))
    device_image = host.cuda()

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    def ours_full() -> torch.Tensor:
        p = probe_image(data, limits)
        return tile_image(decode_image(p).cuda(non_blocking=True), grid, 448, "bicubic")

    def theirs() -> torch.Tensor:
        return hf(Image.open(io.BytesIO(data)), return_tensors=None, device="cuda")["pixel_values"][0]

    # Compared as uint8: CUDA divides by a scalar as a multiplication by its reciprocal, so normalizing our tiles
    # with `/ 127.5` may differ from transformers' division by a tensor in the last bit of the float.
    exact = torch.equal(synced(ours_full)(), (synced(theirs)() * 127.5 + 127.5).round().to(torch.uint8))
    times = interleaved(
        {
            "theirs": synced(theirs),
            "ours": synced(ours_full),
            "resize": synced(lambda: tile_image(device_image, grid, 448, "bicubic")),
            "to_host": synced(lambda: tile_image(device_image, grid, 448, "bicubic").cpu()),
        },
        rounds,
        iters,
    )
    return [
        ("CUDA: transformers, device='cuda'", times["theirs"], "reference on the GPU"),
        (
            "CUDA: ours, bytes -> uint8 tiles on the GPU",
            times["ours"],
            f"{times['theirs'] / times['ours']:.1f}x faster; bit-exact with transformers on CUDA: "
            f"{'yes' if exact else 'NO'}",
        ),
        ("CUDA: ours, resize + split only (image already on the GPU)", times["resize"], "thumbnail + canvas"),
        (
            "CUDA: ours, resize + split + copy tiles to the host",
            times["to_host"],
            "if the engine wants CPU tiles",
        ),
    ]


def table(rows: list[Row]) -> str:
    lines = ["| system | ms / photo | photos / s | note |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {sec * 1e3:.1f} | {1 / sec:.1f} | {note} |" for name, sec, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x768", help="photo WIDTHxHEIGHT (default 1024x768)")
    parser.add_argument("--max-num-tiles", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    parser.add_argument("--iters", type=int, default=6, help="calls per system per round")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    data = photo_jpeg(width, height)

    rows, num_tiles = cpu_rows(data, args.max_num_tiles, args.rounds, args.iters)
    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        rows += cuda_rows(data, args.max_num_tiles, args.rounds, args.iters)

    now = datetime.datetime.now()
    report = "\n".join(
        [
            f"# Image preprocessing, {width}x{height} JPEG ({len(data) // 1024} KiB) -> {num_tiles} tiles",
            "",
            f"- date: {now:%Y-%m-%d %H:%M}",
            f"- hardware: {hardware()}",
            f"- command: `{' '.join(['python bench/preprocess.py', *sys.argv[1:]])}`",
            f"- method: median of {args.rounds} interleaved rounds x {args.iters} photos per system, after warm-up",
            "",
            table(rows),
            "",
        ]
    )
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"preprocess-{now:%Y-%m-%d}-{device}.md"
        path.write_text(report)
        print(f"written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
