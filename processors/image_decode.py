"""Image bytes -> header facts (size, orientation) -> RGB uint8 tensor, decoding the pixels once.

`probe_image` reads only the header: the size and EXIF orientation decide the token count, and the pixel limit
(decompression-bomb guard) is enforced before any pixel is decoded. `decode_image` then decodes the same PIL
object.

RGB conversion follows transformers 5 (`image_transforms.convert_to_rgb`): anything with an alpha band or a
transparency key is composited onto white, everything else goes through PIL's `convert("RGB")` (palette,
grayscale, 16-bit, CMYK). EXIF orientation is applied like `ImageOps.exif_transpose`, which transformers' own
loaders (`load_image`, `load_image_as_tensor`) do for URLs and files.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import torch
from PIL import Image

from plm_serve.processors.errors import MediaDecodeError, MediaTooLargeError
from plm_serve.processors.limits import MediaLimits

# Only these PIL plugins may open request bytes: the common web formats (the JPEG plugin also opens MPO, which
# many phones write). A short list keeps rarely used, historically fragile decoders (and Ghostscript for EPS)
# out of reach.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
)


@dataclass(slots=True)
class ProbedImage:
    """An opened, not yet decoded image. `width`/`height` are the displayed size (after EXIF orientation)."""

    image: Image.Image
    width: int
    height: int
    transpose: Image.Transpose | None


def probe_image(data: bytes, limits: MediaLimits) -> ProbedImage:
    """Open `data` and read its header. Raises MediaDecodeError / MediaTooLargeError; decodes no pixels."""
    if len(data) == 0:
        raise MediaDecodeError("the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise MediaTooLargeError(
            f"the image has {len(data)} bytes, over the limit of {limits.max_image_bytes}; "
            "send a smaller file"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
    except Image.DecompressionBombError:
        raise _too_many_pixels(limits.max_image_pixels) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad headers
        raise MediaDecodeError(
            f"cannot decode the image ({_reason(e)}); supported formats: JPEG, PNG, GIF, WebP, BMP, TIFF"
        ) from e
    if width < 1 or height < 1:
        raise MediaDecodeError(f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise MediaTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_image_pixels}; "
            "downscale it before sending"
        )
    transpose = _TRANSPOSE.get(_orientation(image))
    if transpose in _SWAPS_AXES:
        width, height = height, width
    return ProbedImage(image=image, width=width, height=height, transpose=transpose)


def _too_many_pixels(limit: int | None) -> MediaTooLargeError:
    """Our own message for PIL's decompression-bomb refusal (PIL's speaks of "DOS attacks")."""
    over = f"over the pixel limit of {limit}" if limit else "over the pixel limit"
    return MediaTooLargeError(f"the image's header declares a size {over}; downscale it before sending")


def _orientation(image: Image.Image) -> int:
    """EXIF (or XMP) orientation from the header only.

    PNG's `getexif` decodes the whole image when the eXIf chunk is not before the pixels, so the base-class
    method is used there: it reads the header chunks only (an eXIf chunk after the pixel data is ignored).
    """
    try:
        exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
        value = exif.get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not reject an otherwise fine image
        return 1
    return value if isinstance(value, int) else 1


def decode_image(probed: ProbedImage, convert_rgb: bool = True) -> torch.Tensor:
    """Decode to uint8 [1, 4, H, W] channels-last RGBX (the 4th channel is padding), upright.

    The RGBX layout is PIL's own in-memory layout for RGB, so exporting it is a plain copy, and it is the
    layout the native resize kernel works in (see tiling.py).
    """
    image = probed.image
    try:
        image.load()
        rgb = _to_rgb(image) if convert_rgb else image
        if rgb.mode != "RGB":
            raise MediaDecodeError(
                "this model's processor disables RGB conversion and the image is in mode "
                f"{rgb.mode}; send an RGB image"
            )
        if probed.transpose is not None:
            rgb = rgb.transpose(probed.transpose)
        raw = bytearray(rgb.tobytes("raw", "RGBX"))  # writable, so torch can share it without a warning
    except MediaDecodeError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(None) from None
    except Exception as e:  # truncated data, corrupt streams, unsupported modes
        raise MediaDecodeError(
            f"cannot decode the image ({_reason(e)}); the file may be truncated or corrupt"
        ) from e
    finally:
        image.close()
    width, height = rgb.size
    # [1, H, W, 4] -> [1, 4, H, W], a view (no copy) with unambiguous channels-last strides (batch stride =
    # numel), so torch keeps channels-last for the resize output too.
    return torch.frombuffer(raw, dtype=torch.uint8).view(1, height, width, 4).permute(0, 3, 1, 2)


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers 5 `convert_to_rgb`: alpha or transparency is composited onto white, the rest converted."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _reason(e: BaseException) -> str:
    # PyAV names the input '<none>' and PIL the in-memory file '<_io.BytesIO object at 0x…>' when reading from
    # memory; neither says anything to a user.
    text = re.sub(r":? ?'<none>'", "", str(e))
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "…"
