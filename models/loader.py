"""Build PerceptionLM models: from a transformers checkpoint folder, or with random weights from a config.

Loading never holds a full fp32 copy of the weights in host memory: the model is built on the meta device
(shapes only), then each safetensors tensor is read (memory-mapped) straight onto the target device, cast to
the target dtype there, and assigned as the parameter. Checkpoint names are the module's own parameter names
(docs/checkpoint-format.md), with two exceptions: the decoder's merged projections (`qkv_proj`, `gate_up_proj`) are filled from the
checkpoint's separate tensors (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`), each copied into its
rows (models/merged_linear.py); and the tied `lm_head.weight`, which tied checkpoints omit (and which is
ignored if present, as transformers re-ties it).

Meta's `original/` folder (consolidated.pth, params.json) is never read: only `model.safetensors`, or the
shards listed in `model.safetensors.index.json`, at the top of the folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from plm_serve.models.config import PLMConfig
from plm_serve.models.merged_linear import checkpoint_sources
from plm_serve.models.perception_lm import PerceptionLM

_TIED_KEY = "lm_head.weight"
_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar from 1 GiB of weights on


def build_model(
    config: PLMConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    init: Literal["meta", "random"] = "meta",
    seed: int = 0,
) -> PerceptionLM:
    """A PerceptionLM for `config` in `dtype`, in eval mode, without gradients.

    init="meta": parameters stay on the meta device (shapes only: count them, or fill them with `load_model`).
    init="random": parameters are allocated on `device` and drawn there from N(0, 0.02) (biases 0, norms 1,
    LayerScale gammas `init_values`), seeded; fast for real-size benchmarks: nothing passes through the host.
    """
    with torch.device("meta"):
        model = PerceptionLM(config)
    model.to(dtype=dtype).eval().requires_grad_(False)
    if init == "meta":
        return model
    if init != "random":
        raise ValueError(f"init must be 'meta' or 'random', got {init!r}")
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the two tied modules separate tensors
    _random_init(model, seed)
    model.reset_buffers()
    return model


@torch.no_grad()
def _random_init(model: PerceptionLM, seed: int) -> None:
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    layer_scale = model.config.vision.init_values
    for name, p in model.named_parameters():  # tied weights appear once
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("gamma_"):
            p.fill_(layer_scale if layer_scale is not None else 1.0)
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:  # LayerNorm / RMSNorm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def checkpoint_files(folder: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read -> the tensor names the index assigns them (None: all of the file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[Path, list[str] | None] = defaultdict(list)
        for name, file in weight_map.items():
            files[folder / file].append(name)  # type: ignore[union-attr]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard files: {missing}")
        return dict(files)
    single = folder / "model.safetensors"
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> PerceptionLM:
    """Load a transformers PerceptionLM checkpoint folder onto `device` in `dtype` (eval mode, no gradients).

    Raises ValueError naming the tensors if the checkpoint lacks any parameter or holds tensors the model does
    not have, or if a shape differs. `progress`: show a tqdm bar (default: for checkpoints of 1 GiB or more).
    """
    folder = Path(path)
    config = PLMConfig.from_pretrained(folder)
    model = build_model(config, dtype=dtype, init="meta")
    # Tied: lm_head.weight is not listed here (it is the same tensor as embed_tokens.weight).
    params = dict(model.named_parameters())
    targets = _checkpoint_targets(params, checkpoint_sources(model))
    names_by_file = _tensor_names(checkpoint_files(folder))
    _check_names(folder, targets, names_by_file, config.tie_word_embeddings)
    device = torch.device(device)
    state = _read_tensors(names_by_file, params, targets, device, dtype, progress)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced embed_tokens.weight; point lm_head at the new tensor
    model.requires_grad_(False)
    _materialize_buffers(model, device)
    return model


def _tensor_names(files: dict[Path, list[str] | None]) -> dict[Path, list[str]]:
    out = {}
    for file, listed in files.items():
        with safe_open(str(file), framework="pt") as f:  # reads the header only
            out[file] = list(listed if listed is not None else f.keys())
    return out


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes: a parameter (all of it, or `rows` of a merged one) and its shape."""

    param: str
    rows: slice | None
    shape: tuple[int, ...]


def _checkpoint_targets(
    params: dict[str, nn.Parameter], sources: dict[str, list[tuple[str, slice | None]]]
) -> dict[str, _Target]:
    """Checkpoint tensor name -> its target, for every tensor the model needs."""
    targets = {}
    for name, parts in sources.items():
        shape = tuple(params[name].shape)
        for source, rows in parts:
            part_shape = shape if rows is None else (rows.stop - rows.start, *shape[1:])
            targets[source] = _Target(name, rows, part_shape)
    return targets


def _check_names(
    folder: Path, targets: dict[str, _Target], names_by_file: dict[Path, list[str]], tied: bool
) -> None:
    found = {n for names in names_by_file.values() for n in names}
    if tied:
        found.discard(_TIED_KEY)  # transformers re-ties it on load, so a saved copy is ignored
    missing = sorted(set(targets) - found)
    unexpected = sorted(found - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match the model built from its config.json: "
            f"missing tensors {missing or 'none'}; unexpected tensors {unexpected or 'none'}"
        )


def _read_tensors(
    names_by_file: dict[Path, list[str]],
    params: dict[str, nn.Parameter],
    targets: dict[str, _Target],
    device: torch.device,
    dtype: torch.dtype,
    progress: bool | None,
) -> dict[str, torch.Tensor]:
    """Each tensor goes from the file's memory map straight to `device`, then is cast there (a merged
    parameter is allocated once and each part copied, with the cast, into its rows)."""
    total = sum(p.numel() * p.element_size() for p in params.values())
    bar = _progress_bar(len(targets), total, progress)
    state: dict[str, torch.Tensor] = {}
    for file, names in names_by_file.items():
        with safe_open(str(file), framework="pt", device=_safetensors_device(device)) as f:
            for name in names:
                target = targets.get(name)
                if target is None:
                    continue  # the tied lm_head copy
                t = f.get_tensor(name)
                if tuple(t.shape) != target.shape:
                    raise ValueError(
                        f"tensor {name} in {file.name} has shape {tuple(t.shape)}, "
                        f"the model expects {target.shape}"
                    )
                if target.rows is None:
                    state[target.param] = t.to(dtype)
                else:
                    if target.param not in state:
                        state[target.param] = torch.empty(
                            params[target.param].shape, dtype=dtype, device=device
                        )
                    state[target.param][target.rows].copy_(t)
                bar.update(1)
    bar.close()
    return state


def _materialize_buffers(model: PerceptionLM, device: torch.device) -> None:
    """Non-persistent buffers (RoPE tables) are still on meta: allocate them on `device` (keeping the dtypes
    `build_model` gave them: the model dtype, fp32 for inv_freq), then fill them."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                module.register_buffer(name, torch.empty_like(buf, device=device), persistent=False)
    model.reset_buffers()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover}")


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _progress_bar(count: int, total_bytes: int, progress: bool | None):
    from tqdm.auto import tqdm

    show = total_bytes >= _PROGRESS_MIN_BYTES if progress is None else progress
    return tqdm(total=count, desc="loading weights", unit="tensor", disable=not show)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights once), works on meta models."""
    return sum(p.numel() for p in model.parameters())
