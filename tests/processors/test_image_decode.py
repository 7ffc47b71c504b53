"""Image decoding: every accepted format decodes to the RGB transformers 5 makes of the same PIL image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from plm_serve.processors import ImageInput
from plm_serve.processors.image_decode import IMAGE_FORMATS, decode_image, probe_image
from plm_serve.processors.limits import MediaLimits
from tests.processors import media


def _rgba(seed: int = 0, size: tuple[int, int] = (120, 80)) -> Image.Image:
    w, h = size
    rgb = media.photo(w, h, seed)
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    alpha[: h // 3] = 0  # fully transparent band
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def _corpus() -> dict[str, bytes]:
    rgb = Image.fromarray(media.photo(120, 80, 1))
    rgba = _rgba(2)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    gray16 = Image.fromarray((np.linspace(0, 65535, 120 * 80).reshape(80, 120)).astype(np.uint16))
    frames = [Image.fromarray(media.photo(64, 48, s)).convert("P") for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "jpeg_rgb": media.encode(rgb, "JPEG", quality=92),
        "jpeg_gray": media.encode(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": media.encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_progressive": media.encode(rgb, "JPEG", progressive=True),
        "png_rgb": media.encode(rgb, "PNG"),
        "png_rgba": media.encode(rgba, "PNG"),
        "png_la": media.encode(rgba.convert("LA"), "PNG"),
        "png_palette": media.encode(palette, "PNG"),
        "png_palette_transparent": media.encode(palette_transparent, "PNG", transparency=3),
        "png_rgb_transparent_key": media.encode(rgb, "PNG", transparency=(30, 40, 60)),
        "png_gray16": media.encode(gray16, "PNG"),
        "png_bilevel": media.encode(rgb.convert("1"), "PNG"),
        "gif_animated": gif.getvalue(),
        "gif_transparent": media.encode(palette_transparent, "GIF", transparency=3),
        "webp_lossy": media.encode(rgb, "WEBP", quality=80),
        "webp_alpha": media.encode(rgba, "WEBP", lossless=True),
        "bmp": media.encode(rgb, "BMP"),
        "tiff": media.encode(rgb, "TIFF"),
    }


CORPUS = _corpus()


def _reference_rgb(data: bytes) -> np.ndarray:
    """What transformers 5 feeds its resize for a PIL image: convert_to_rgb (alpha composited on white)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decoded_rgb_matches_reference(name: str) -> None:
    data = CORPUS[name]
    probe = probe_image(data, MediaLimits())
    pixels = decode_image(probe)
    assert pixels.shape == (1, 4, probe.height, probe.width)
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    ours = pixels[0, :3].permute(1, 2, 0).numpy()
    assert np.array_equal(ours, _reference_rgb(data)), name


def test_transparency_is_composited_on_white() -> None:
    ours = decode_image(probe_image(CORPUS["png_rgba"], MediaLimits()))
    assert (ours[0, :3, :20] == 255).all()  # the fully transparent band is white


def test_gif_uses_the_first_frame() -> None:
    ours = decode_image(probe_image(CORPUS["gif_animated"], MediaLimits()))[0, :3].permute(1, 2, 0).numpy()
    first = np.array(Image.open(io.BytesIO(CORPUS["gif_animated"])).convert("RGB"))
    assert np.array_equal(ours, first)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation: int) -> None:
    """Applied like ImageOps.exif_transpose (as transformers URL/path loaders do); sizes are upright."""
    image = Image.fromarray(media.photo(90, 60, orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = media.encode(image, "JPEG", exif=exif.tobytes())
    probe = probe_image(data, MediaLimits())
    expected = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert (probe.height, probe.width) == expected.shape[:2]
    assert np.array_equal(decode_image(probe)[0, :3].permute(1, 2, 0).numpy(), expected)


def test_rotated_photo_tokens_follow_the_upright_size(processor) -> None:
    image = Image.fromarray(media.photo(900, 300, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = media.encode(image, "JPEG", exif=exif.tobytes())
    out = processor.process_chat([{"role": "user", "content": [ImageInput(data)]}])
    assert out.media[0].length == processor.count_image_tokens(300, 900)


def test_transparent_png_end_to_end_matches_reference(processor, hf_processor) -> None:
    data = media.encode(_rgba(5, (300, 200)), "PNG")
    ours = processor.process_chat([{"role": "user", "content": [ImageInput(data)]}])
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(data))}]}]
    theirs = hf_processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert ours.token_ids == theirs["input_ids"][0]
    assert torch.equal((ours.media[0].pixels.float() - 127.5) / 127.5, theirs["pixel_values"][0])


def test_allowed_formats_are_registered() -> None:
    Image.init()
    assert set(IMAGE_FORMATS) <= set(Image.OPEN)
