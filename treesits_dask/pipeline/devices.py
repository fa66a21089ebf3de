"""The accelerators of a worker process: which device an inference task runs on, and one
forward at a time per device.

On an accelerator one forward pass runs at a time per device (its batches are sized from the free
device memory), while the worker's other windows in flight (``GPU`` shares of the Dask resource)
select their pixels beside it; a worker with several GPUs spreads its windows over them.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["DevicePool", "device_lock", "device_pool"]

_LOCK = threading.Lock()
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_POOLS: dict[str, DevicePool | None] = {}


class DevicePool:
    """The accelerators of one worker process: each inference task takes the device with the
    fewest tasks on it, so concurrent tasks spread over the devices; the forwards on one device
    take turns (:func:`device_lock`), while the other windows on it prepare their pixels."""

    def __init__(self, devices: list[str]):
        if not devices:
            raise ValueError("a device pool needs at least one device")
        self.devices = list(devices)
        self._users = dict.fromkeys(self.devices, 0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self):
        """``with pool.take() as device:`` the least busy device of this process."""
        with self._lock:
            device = min(self.devices, key=lambda d: self._users[d])
            self._users[device] += 1
        try:
            yield device
        finally:
            with self._lock:
                self._users[device] -= 1


def device_pool(device: str) -> DevicePool | None:
    """The process's pool of accelerators for the ``device`` setting (None on CPU)."""
    if device not in _POOLS:
        with _LOCK:
            if device not in _POOLS:
                from ..models.loading import visible_devices

                devices = visible_devices(device)
                _POOLS[device] = None if devices == ["cpu"] else DevicePool(devices)
    return _POOLS[device]


def device_lock(device: str) -> threading.Lock:
    lock = _DEVICE_LOCKS.get(device)
    if lock is None:
        with _LOCK:
            lock = _DEVICE_LOCKS.setdefault(device, threading.Lock())
    return lock
