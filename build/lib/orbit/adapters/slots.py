"""Double-buffered adapter storage: every adapter tensor of every module lives in one flat
buffer per slot, so "push the new adapter to the sampler" is a single device copy.

Slot 0 is the train slot: each module's slot-0 tensors are `nn.Parameter`s whose `.data` is a
view into `flat(0)`. The optimizer sees those per-module parameters (named like PEFT's, e.g.
`...q_proj.lora_A`), AdamW's in-place updates land in the flat buffer, and autograd gives each
parameter its own `.grad` (a view-of-a-flat-Parameter design would make every slice's backward
allocate a zero tensor the size of the whole buffer). Slot 1 is the serve slot: plain tensors
(non-persistent buffers) viewing `flat(1)`, never trained.

Moving the model (`model.to(...)`) after binding replaces parameter storage and silently
breaks the aliasing; `FlatSlots.check_bound()` detects that, and `stage` calls it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NUM_SLOTS = 2
# Each view starts on a 64-element boundary (128 bytes in bf16) so kernels get aligned rows.
ALIGN = 64


class SlottedAdapter(nn.Module):
    """Base class of adapter modules with two slots of named tensors.

    Subclasses call `_init_slots({name: tensor})` with their initial slot-0 values; slot 1
    starts as a copy. `active_slot` picks what `forward` uses: 0, 1 or None (adapter off).
    """

    slot_names: tuple[str, ...] = ()

    def _init_slots(self, values: dict[str, Tensor]) -> None:
        assert tuple(values) == self.slot_names, (tuple(values), self.slot_names)
        self.active_slot: int | None = 0
        for name, v in values.items():
            self.register_parameter(name, nn.Parameter(v.contiguous()))
            self.register_buffer(f"{name}_serve", v.detach().clone().contiguous(), persistent=False)

    def slot_tensor(self, slot: int, name: str) -> Tensor:
        if slot == 0:
            return getattr(self, name)
        if slot == 1:
            return getattr(self, f"{name}_serve")
        raise ValueError(f"adapter slot must be 0, 1 or None, got {slot!r}")

    def slot_tensors(self, slot: int) -> dict[str, Tensor]:
        return {n: self.slot_tensor(slot, n) for n in self.slot_names}

    def slot_version(self, slot: int, name: str) -> tuple[int, int]:
        """Changes whenever the slot tensor is written, through the module's tensor or through
        the flat buffer (a Parameter whose `.data` was re-pointed keeps its own counter, so
        both counters are read)."""
        t = self.slot_tensor(slot, name)
        view = self.__dict__.get("_bound_views", {}).get((slot, name))
        return (t._version, -1 if view is None else view._version)

    def slots_written(self) -> None:
        """Hook: slot storage was written behind the module's back (stage/load); drop caches."""

    def _bind(self, slot: int, name: str, view: Tensor) -> None:
        """Point this slot's tensor at `view` (already holding the value)."""
        self.__dict__.setdefault("_bound_views", {})[(slot, name)] = view
        if slot == 0:
            param = getattr(self, name)
            param.data = view
        else:
            self._buffers[f"{name}_serve"] = view


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class FlatSlots:
    """Owns the two flat buffers of a set of `SlottedAdapter` modules and binds their views.

    Binding copies each module's current slot values into the flat buffers, so modules may be
    built (and initialized) one by one first.
    """

    def __init__(self, modules: dict[str, SlottedAdapter], dtype: torch.dtype) -> None:
        if not modules:
            raise ValueError("no adapter modules to bind: the target patterns matched nothing")
        self.modules = modules
        self.dtype = dtype
        # layout: (module path, tensor name) -> (offset, shape)
        self.layout: dict[tuple[str, str], tuple[int, torch.Size]] = {}
        offset = 0
        devices = set()
        for path, mod in modules.items():
            for name in mod.slot_names:
                t = mod.slot_tensor(0, name)
                devices.add(t.device)
                self.layout[(path, name)] = (offset, t.shape)
                offset = _align(offset + t.numel())
        if len(devices) != 1:
            raise ValueError(f"adapter tensors span several devices {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.numel = offset
        self._flat = [
            torch.zeros(offset, dtype=dtype, device=self.device) for _ in range(NUM_SLOTS)
        ]
        self._pending: torch.cuda.Event | None = None
        self._stream: torch.cuda.Stream | None = None
        self._expect: list[tuple[dict, str, int, str]] | None = None
        for (path, name), (off, shape) in self.layout.items():
            mod = modules[path]
            for slot in range(NUM_SLOTS):
                view = self._flat[slot][off : off + math.prod(shape)].view(shape)
                view.copy_(mod.slot_tensor(slot, name).detach())
                mod._bind(slot, name, view)
        self.check_bound()

    def flat(self, slot: int) -> Tensor:
        if slot not in range(NUM_SLOTS):
            raise ValueError(f"adapter slot must be 0 or 1, got {slot!r}")
        return self._flat[slot]

    def _expected_pointers(self) -> list[tuple[dict, str, int, str]]:
        """(module tensor dict, key, expected data_ptr, label) for every slot tensor. The flat
        buffers stay alive, so no other tensor can be allocated at these addresses."""
        out = []
        for (path, name), (off, _) in self.layout.items():
            mod = self.modules[path]
            for slot in range(NUM_SLOTS):
                flat = self._flat[slot]
                if slot == 0:
                    table, key = mod._parameters, name
                else:
                    table, key = mod._buffers, f"{name}_serve"
                ptr = flat.data_ptr() + off * flat.element_size()
                out.append((table, key, ptr, f"{path}.{name}[slot {slot}]"))
        return out

    def check_bound(self) -> None:
        """Raise if some module's slot tensor no longer aliases the flat buffer (~1 us/tensor)."""
        if self._expect is None:
            self._expect = self._expected_pointers()
        bad = [
            label
            for table, key, ptr, label in self._expect
            if table[key] is None or table[key].data_ptr() != ptr
        ]
        if bad:
            raise RuntimeError(
                f"adapter tensors no longer view the flat slot buffers (was the model moved or "
                f"cast after inject_adapters? inject after .to()): {bad[:8]}"
                + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            )

    def stage(self, src: int = 0, dst: int = 1, wait: bool = True) -> None:
        """Copy slot `src` into slot `dst` with one device copy.

        On CUDA the copy runs on a side stream after everything already queued on the current
        stream (so it sees the last optimizer step). With `wait=True` the current stream then
        waits for the copy on the GPU (the host is never blocked); with `wait=False` the caller
        must call `wait_staged()` (or `set_active`) before touching either slot.
        """
        if src == dst:
            raise ValueError(f"stage needs two different slots, got src=dst={src}")
        s, d = self.flat(src), self.flat(dst)
        self.check_bound()
        for mod in self.modules.values():
            mod.slots_written()
        if s.device.type != "cuda":
            with torch.no_grad():
                d.copy_(s)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=s.device)
        self.wait_staged()
        cur = torch.cuda.current_stream(s.device)
        self._stream.wait_stream(cur)
        with torch.cuda.stream(self._stream), torch.no_grad():
            d.copy_(s, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._pending = ev
        if wait:
            self.wait_staged()

    def wait_staged(self) -> None:
        """Make the current stream wait (on the GPU) for an in-flight stage copy."""
        if self._pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending)
            self._pending = None

    def set_active(self, slot: int | None) -> None:
        if slot is not None and slot not in range(NUM_SLOTS):
            raise ValueError(f"adapter slot must be 0, 1 or None, got {slot!r}")
        self.wait_staged()
        for mod in self.modules.values():
            mod.__dict__["active_slot"] = slot  # skips nn.Module.__setattr__'s checks (hot path)
