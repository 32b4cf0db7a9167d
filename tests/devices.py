"""A CPU run that obeys CUDA's device rules: fake "cuda" tensors and the mixes CUDA refuses.

Every CPU test sees one device, so a host bookkeeping tensor meeting a device activation is
invisible there, and on a GPU it is the first routed request's crash. ``FakeCuda`` is a
``TorchFunctionMode`` that makes the mix visible:

* tensors made with ``device="cuda"`` (or moved with ``.to("cuda")`` / ``.cuda()`` /
  ``.to(t.device)`` of a device tensor) are ``OnDevice`` tensors: plain CPU storage, tagged,
  reporting ``device == cuda:0``; whatever is computed from them is tagged too;
* an op that mixes a device tensor with a host tensor raises ``DeviceMixError``, with
  CUDA's exceptions: a 0-dim host tensor in an elementwise op (a scalar), a host index
  into a device tensor (``d[host_idx]``, ``d[host_idx] = device_value``), and the
  explicit crossings (``.to``, ``.cpu``, ``.cuda``, ``copy_``);
* a device tensor read as a Python value (``.item()``, ``.tolist()``, ``bool()``, ``int()``,
  ``float()``) or as a mask/``nonzero``/``unique`` (data-dependent size) is a host-device
  synchronisation: counted in ``syncs``; ``.numpy()`` raises as on CUDA;
* every crossing is counted in ``h2d`` / ``d2h`` with its bytes.

FakeTensorMode (``torch._subclasses``) fakes real CUDA tensors on this CPU-only build and
catches mixes in elementwise ops, but not in indexing (advanced indexing of a fake CUDA
tensor raises whatever the index's device), so the routing code's index-heavy paths need
this tagging mode. On a GPU host the same checks run on real CUDA tensors
(``tests/device_checks.py``, ``tools/gpu_check.py --phase micro``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceMixError", "FakeCuda", "OnDevice", "is_device", "iter_device"]

FAKE = torch.device("cuda", 0)


class DeviceMixError(RuntimeError):
    """An op CUDA would refuse: host and device tensors mixed."""


class OnDevice(torch.Tensor):
    """A CPU tensor standing for a CUDA one (see the module docstring)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def is_device(t: Any) -> bool:
    return isinstance(t, OnDevice)


def _tag(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice):
        return t.as_subclass(OnDevice)
    return t


def _untag(t: Any) -> Any:
    if isinstance(t, OnDevice):
        return t.as_subclass(torch.Tensor)
    return t


def _is_cuda(d: Any) -> bool:
    if isinstance(d, torch.Tensor):
        return is_device(d)
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


def _is_place(d: Any) -> bool:
    return isinstance(d, (str, torch.device)) and (
        str(d).startswith("cuda") or str(d).startswith("cpu")
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_T = torch.Tensor
_PY_VALUE = {_T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__index__}
_DATA_SIZED = {torch.nonzero, _T.nonzero, torch.unique, _T.unique, torch.masked_select}
_PROPS = {_T.device.__get__: lambda t: FAKE, _T.is_cuda.__get__: lambda t: True}
_GETITEM = {_T.__getitem__}
_SETITEM = {_T.__setitem__}


class FakeCuda(TorchFunctionMode):
    """Run code under CUDA's device rules on CPU tensors (``with FakeCuda() as dev:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.h2d = 0  # host -> device copies
        self.d2h = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0

    # -- helpers for tests ------------------------------------------------------------

    def tensor(self, t: torch.Tensor) -> OnDevice:
        """``t`` as a device tensor (not counted as a copy: it stands for data made there)."""
        return _tag(t.detach().clone())

    def reset(self) -> None:
        self.syncs.clear()
        self.h2d = self.d2h = self.h2d_bytes = self.d2h_bytes = 0

    # -- the mode -----------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _PROPS and args and is_device(args[0]):
            return _PROPS[func](args[0])
        if func in _PY_VALUE or func is _T.numpy:
            return self._python_value(func, args, kwargs)
        crossing = self._crossing(func, args, kwargs)
        if crossing is not None:
            return crossing
        to_device = self._creation_device(kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dev = [t for t in tensors if is_device(t)]
        host = [t for t in tensors if not is_device(t)]
        if dev and host:
            self._check_mix(func, args, host)
        if dev and func in _DATA_SIZED:
            self.syncs[_name(func)] += 1
        if dev and func in _GETITEM and _has_device_mask(args):
            self.syncs["mask index"] += 1
        out = func(*tree_map(_untag, args), **tree_map(_untag, kwargs))
        if dev or to_device:
            return tree_map(_tag, out) if not _in_place_on_host(func, args) else out
        return out

    def _creation_device(self, kwargs: dict) -> bool:
        d = kwargs.get("device")
        if d is None:
            return False
        kwargs["device"] = "cpu"
        return _is_cuda(d)

    def _python_value(self, func, args, kwargs):
        t = args[0]
        if is_device(t):
            if func is _T.numpy:
                raise TypeError("can't convert cuda:0 device type tensor to numpy")
            self.syncs[_name(func)] += 1
        return func(*tree_map(_untag, args), **kwargs)

    def _crossing(self, func, args, kwargs):
        """``.to`` / ``.cpu`` / ``.cuda`` / ``copy_``: the explicit moves, counted."""
        if func is _T.cpu:
            return self._move(args[0], False)
        if func is _T.cuda:
            return self._move(args[0], True)
        if func is _T.to:
            target = kwargs.pop("device", None)
            rest = []
            for a in args[1:]:
                if target is None and (_is_place(a) or isinstance(a, torch.Tensor)):
                    target = a
                    if isinstance(a, torch.Tensor):
                        rest.append(a.dtype)
                else:
                    rest.append(a)
            src = args[0]
            moved = src.as_subclass(torch.Tensor).to(*rest, **kwargs)
            if target is None:
                return _tag(moved) if is_device(src) else moved
            return self._move(moved, _is_cuda(target), counted_from=src)
        if func is _T.copy_:
            dst, src = args[0], args[1]
            if is_device(dst) != is_device(src) and isinstance(src, torch.Tensor):
                self._count(is_device(dst), _nbytes(src))
            dst.as_subclass(torch.Tensor).copy_(src.as_subclass(torch.Tensor))
            return dst
        return None

    def _move(self, t, to_device: bool, counted_from=None):
        src = t if counted_from is None else counted_from
        plain = t.as_subclass(torch.Tensor)
        if is_device(src) != to_device:
            self._count(to_device, _nbytes(plain))
            plain = plain.clone()  # a real move is a copy: later writes do not alias
        return _tag(plain) if to_device else plain

    def _count(self, to_device: bool, nbytes: int) -> None:
        if to_device:
            self.h2d += 1
            self.h2d_bytes += nbytes
        else:
            self.d2h += 1
            self.d2h_bytes += nbytes

    def _check_mix(self, func, args, host: list[torch.Tensor]) -> None:
        if func in _GETITEM and is_device(args[0]):
            return  # a host index into a device tensor: CUDA copies the index over
        if func in _SETITEM and is_device(args[0]):
            value = args[2] if len(args) > 2 else None
            bad = isinstance(value, torch.Tensor) and not is_device(value) and value.dim() > 0
            if not bad:
                return
        elif all(t.dim() == 0 for t in host) and func not in _GETITEM | _SETITEM:
            return  # 0-dim CPU tensors are scalars to CUDA kernels
        raise DeviceMixError(
            f"{_name(func)}: host tensor(s) {[tuple(t.shape) for t in host]} mixed with "
            "device tensors (CUDA refuses this)"
        )


def _in_place_on_host(func, args) -> bool:
    return (
        bool(args)
        and isinstance(args[0], torch.Tensor)
        and not is_device(args[0])
        and (_name(func).endswith("_") or func in _SETITEM)
    )


def _has_device_mask(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(is_device(i) and i.dtype == torch.bool for i in items)


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def iter_device(ts) -> Iterator[torch.Tensor]:
    """The device tensors among ``ts`` (a pytree)."""
    return (t for t in tree_flatten(ts)[0] if is_device(t))
