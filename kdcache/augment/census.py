"""Op census: the ATen ops a call issues and how many of them make the host wait.

On a GPU a host sync (reading a value back, or an op whose output shape depends on the
data) stalls the queue; so does copying a constant from host memory on every call.
`OpCensus` counts both at the dispatcher, so the device path can be checked on a
machine without a GPU, where `torch.cuda.set_sync_debug_mode` is not available.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a device value on the host, or whose output shape depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.nonzero_static.default,
    aten.bincount.default, aten.masked_select.default, aten.unique_dim.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.is_nonzero.default,
    aten.equal.default,
}
# torch.tensor(data) on any device builds the tensor in host memory first.
HOST_CONSTANT_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


def _is_sync(func, args, kwargs) -> bool:
    if func in SYNC_OPS or func in HOST_CONSTANT_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        # A boolean mask index runs nonzero inside the op.
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
    if func is aten._to_copy.default:  # .to(device) of a host tensor
        device = kwargs.get("device")
        return args[0].device.type == "cpu" and device is not None and torch.device(device).type != "cpu"
    if func is aten.copy_.default:  # dst.copy_(host tensor)
        return args[1].device.type == "cpu" and args[0].device.type != "cpu"
    return False


class OpCensus(TorchDispatchMode):
    """Counts ATen ops (`ops`) and host syncs (`syncs`, by op name) issued inside the block."""

    def __enter__(self):
        self.ops = Counter()
        self.syncs = Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        if _is_sync(func, args, kwargs):
            self.syncs[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())
