"""One step's host-to-device data in one pinned buffer and one non-blocking copy per dtype.

`torch.tensor(list, device="cuda")` copies from pageable memory and waits for the copy (a host sync); a step
that built its inputs that way synchronised ~8 times. Here the host packs every small array of a step (chunk
slots and starts, new block ids, new sequences' tokens, sampling parameters) into a pinned buffer, and one
`copy_(non_blocking=True)` per dtype moves it; kernels enqueued after the copy read views of the device buffer.

Reuse is safe without waiting on the device: the device buffer is rewritten only by a later copy on the same
stream (after every kernel that read it), and each pinned buffer of the ring is refilled only after the event
recorded behind its copy has completed (in practice long before: the loop runs at most one step ahead).

    staging = HostStaging(device)
    step = staging.begin()
    h = step.add(np.asarray(values, dtype=np.int64))   # or float32
    step.upload()
    t = step.get(h)                                     # a device view, valid for this step's kernels
"""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


class _Buffers:
    """A growable pinned host buffer and its device twin, for one dtype."""

    def __init__(self, dtype: torch.dtype, device: torch.device, pinned: bool) -> None:
        self.dtype, self.device, self.pinned = dtype, device, pinned
        self.host = torch.empty(0, dtype=dtype)
        self.dev = torch.empty(0, dtype=dtype, device=device)

    def ensure(self, n: int) -> None:
        if self.host.numel() < n:
            size = max(n, 2 * self.host.numel(), 1024)
            self.host = torch.empty(size, dtype=self.dtype, pin_memory=self.pinned)
            self.dev = torch.empty(size, dtype=self.dtype, device=self.device)


class StagedStep:
    """The arrays of one step; `upload()` once, then `get()` device views."""

    def __init__(self, staging: HostStaging, slot: int) -> None:
        self._staging, self._slot = staging, slot
        self._arrays: dict[torch.dtype, list[np.ndarray]] = {torch.int64: [], torch.float32: []}
        self._offsets: list[tuple[torch.dtype, int, int]] = []
        self._sizes = {torch.int64: 0, torch.float32: 0}
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def add(self, values: np.ndarray) -> int:
        """Queue a 1-D int64 or float32 array; returns its handle."""
        dtype = _DTYPES[values.dtype]
        assert values.ndim == 1 and not self._views, "1-D arrays, before upload()"
        self._arrays[dtype].append(values)
        self._offsets.append((dtype, self._sizes[dtype], values.shape[0]))
        self._sizes[dtype] += values.shape[0]
        return len(self._offsets) - 1

    def upload(self) -> None:
        self._views = self._staging.upload(self._slot, self._arrays, self._sizes)

    def get(self, handle: int) -> torch.Tensor:
        dtype, start, n = self._offsets[handle]
        return self._views[dtype][start : start + n]


class HostStaging:
    """A ring of pinned staging buffers (two: the overlapped loop prepares one step while one runs)."""

    def __init__(self, device: torch.device, ring: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._ring = [
            {dt: _Buffers(dt, device, self.cuda) for dt in (torch.int64, torch.float32)} for _ in range(ring)
        ]
        self._events: list[torch.cuda.Event | None] = [None] * ring
        self._next = 0

    def begin(self) -> StagedStep:
        slot = self._next
        self._next = (slot + 1) % len(self._ring)
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the copy that last read this pinned buffer is done (normally long ago)
        return StagedStep(self, slot)

    def upload(
        self, slot: int, arrays: dict[torch.dtype, list[np.ndarray]], sizes: dict[torch.dtype, int]
    ) -> dict[torch.dtype, torch.Tensor]:
        views = {}
        for dtype, parts in arrays.items():
            n = sizes[dtype]
            if not self.cuda:  # the device is the host: no copy at all
                views[dtype] = (
                    torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=dtype)
                )
                continue
            buf = self._ring[slot][dtype]
            buf.ensure(n)
            if n:
                np.concatenate(parts, out=buf.host[:n].numpy())
                buf.dev[:n].copy_(buf.host[:n], non_blocking=True)
            views[dtype] = buf.dev[:n]
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event
        return views
