"""Several projections of one input as a single GEMM, and how such merged weights map onto checkpoint tensors.

The decoder computes q/k/v as one `qkv_proj` and the MLP's gate/up as one `gate_up_proj`: one GEMM (one weight
read, one launch) instead of three or two. Checkpoints keep transformers' separate tensors
(`self_attn.q_proj.weight`, ...): `checkpoint_sources` tells the loader which checkpoint tensors fill which
rows of a merged parameter, and `checkpoint_state` cuts the parameters back into checkpoint tensors for writing.
Every other parameter maps to the checkpoint tensor of the same name.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """`nn.Linear` whose output rows are the outputs of sibling checkpoint projections, stacked in order.

    parts: checkpoint module name (a sibling of this module, e.g. "q_proj") -> its output size. The weight is
    [sum(sizes), in_features] (and the bias [sum(sizes)]), part after part.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)

    @property
    def sizes(self) -> list[int]:
        """Output sizes of the parts, in order (for `output.split(sizes, dim=-1)`)."""
        return list(self.parts.values())

    def part_rows(self) -> dict[str, slice]:
        """Checkpoint module name -> the rows of the merged weight it fills."""
        rows, start = {}, 0
        for name, size in self.parts.items():
            rows[name] = slice(start, start + size)
            start += size
        return rows


def checkpoint_sources(model: nn.Module) -> dict[str, list[tuple[str, slice | None]]]:
    """Each parameter name of `model` -> the checkpoint tensors it is made of.

    [(same name, None)] for an ordinary parameter; for a MergedLinear's weight or bias, one
    (checkpoint name, rows) per part, e.g. "...self_attn.qkv_proj.weight" ->
    [("...self_attn.q_proj.weight", rows 0:q), ("...self_attn.k_proj.weight", rows q:q+k), ...].
    Tied parameters appear once, under their first name (as `named_parameters` lists them).
    """
    merged: dict[str, list[tuple[str, slice | None]]] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, MergedLinear):
            continue
        parent = module_name.rpartition(".")[0]
        for leaf, _ in module.named_parameters(recurse=False):  # weight, bias
            merged[f"{module_name}.{leaf}"] = [
                (f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}", rows)
                for part, rows in module.part_rows().items()
            ]
    return {name: merged.get(name, [(name, None)]) for name, _ in model.named_parameters()}


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under checkpoint (transformers) names, merged weights cut back into their parts."""
    params = dict(model.named_parameters())
    state = {}
    for name, sources in checkpoint_sources(model).items():
        for source, rows in sources:
            state[source] = (params[name] if rows is None else params[name][rows]).contiguous()
    return state
