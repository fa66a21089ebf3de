"""The reads' recycled buffers: an array is given out again only once nothing refers to it."""

import pickle
import time

import numpy as np

from treesits_dask.io.buffers import IDLE_SECONDS, LOCAL_IDLE_SECONDS, MIN_BYTES, Recycler

SHAPE = (4, 10, 256, 300)  # 6 MB: above MIN_BYTES
NBYTES = int(np.prod(SHAPE)) * 2


def test_a_buffer_is_reused_only_when_no_view_of_it_is_left():
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    a = pool.empty(SHAPE)
    a[:] = 7
    piece = a[:, :, 10:20, 5:9]  # a piece of a band outlives the band
    frame = memoryview(a[1])  # a frame being sent
    del a
    b = pool.empty(SHAPE)
    assert pool.reused_bytes == 0 and pool.fresh_bytes == 2 * b.nbytes
    b[:] = -1
    assert (piece == 7).all() and (np.frombuffer(frame, np.int16) == 7).all()
    del frame
    c = pool.empty(SHAPE)  # the piece still holds the first owner
    assert pool.reused_bytes == 0
    del piece, c
    d = pool.empty(SHAPE)
    assert pool.reused_bytes == d.nbytes  # now reused
    assert pool.held()[0] == 3 * d.nbytes


def test_a_pickled_array_keeps_its_buffer_until_the_pickle_is_gone():
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    a = pool.empty(SHAPE)
    a[:] = 3
    buffers_out = []
    data = pickle.dumps(a, protocol=5, buffer_callback=buffers_out.append)  # zero copy
    del a
    pool.empty(SHAPE)[:] = 0  # must not be the pickled one's memory
    back = pickle.loads(data, buffers=buffers_out)
    assert (back == 3).all()


def test_sizes_small_arrays_and_fit():
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    small = pool.empty((10, 10))
    assert small.base is None and pool.held() == (0, 0)  # plain numpy below MIN_BYTES
    big = pool.full((MIN_BYTES,), -9999)  # 2 x MIN_BYTES bytes
    assert (big == -9999).all() and big.flags.c_contiguous
    del big
    other = pool.empty((MIN_BYTES // 2,))  # half the size: not served by the idle owner
    assert pool.reused_bytes == 0
    del other
    again = pool.copy(np.arange(MIN_BYTES, dtype=np.int16))
    assert pool.reused_bytes == again.nbytes
    np.testing.assert_array_equal(again, np.arange(MIN_BYTES, dtype=np.int16))


def test_idle_owners_are_freed_after_a_while_and_beyond_the_limit():
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=0.2)
    a = pool.empty(SHAPE)
    keep = pool.empty(SHAPE)
    del a
    assert pool.held() == (2 * keep.nbytes, keep.nbytes)
    deadline = time.monotonic() + 10
    while pool.held()[1] and time.monotonic() < deadline:  # the janitor thread frees it
        time.sleep(0.05)
    assert pool.held() == (keep.nbytes, 0)
    tight = Recycler(idle_bytes=keep.nbytes, idle_seconds=60)
    x, y = tight.empty(SHAPE), tight.empty(SHAPE)
    del x, y  # two idle owners, room for one
    assert tight.held() == (keep.nbytes, keep.nbytes)


def test_no_idle_owner_is_kept_where_memory_in_use_passes_dasks_target():
    import dask

    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    a = pool.empty(SHAPE)
    del a
    assert pool.held()[1] == NBYTES  # this process is far below 60 % of the machine
    with dask.config.set({"distributed.worker.memory.target": 1e-6}):
        b = pool.empty(SHAPE)  # reused (it is taken, not kept idle)
        assert pool.reused_bytes == b.nbytes
        del b
        assert pool.held() == (0, 0)  # freed at once, not kept


def test_parts_side_by_side_in_one_owner_of_the_room_asked():
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    a, b = pool.empty_parts([SHAPE, (2, 10, 256, 100)], room=2 * int(np.prod(SHAPE)))
    assert a.shape == SHAPE and b.shape == (2, 10, 256, 100)
    assert a.flags.c_contiguous and b.flags.c_contiguous and not np.may_share_memory(a, b)
    a[:], b[:] = 1, 2
    assert (a == 1).all() and (b == 2).all()
    assert pool.fresh_bytes == 2 * NBYTES  # the room, not the parts
    del a
    (c,) = pool.empty_parts([SHAPE], room=2 * int(np.prod(SHAPE)))
    assert pool.reused_bytes == 0  # b still holds the owner
    del b, c
    (d,) = pool.empty_parts([(1, 10, 256, 300)], room=2 * int(np.prod(SHAPE)))
    assert pool.reused_bytes == 2 * NBYTES and pool.held()[0] == 4 * NBYTES


def test_outside_a_dask_worker_idle_buffers_are_freed_once_the_reads_are_over():
    """A driver or a notebook (no Dask worker): reads that follow each other reuse their buffers,
    but nothing is held a few seconds after the last (bench's driver held 1.2 GB of windows for
    minutes, through the end-to-end run it measured)."""
    pool = Recycler(idle_bytes=1 << 30)  # the default idle time
    a = pool.empty(SHAPE)
    del a
    b = pool.empty(SHAPE)
    assert pool.reused_bytes == b.nbytes
    del b
    assert pool.held() == (NBYTES, NBYTES)
    assert pool.idle_seconds == LOCAL_IDLE_SECONDS
    deadline = time.monotonic() + LOCAL_IDLE_SECONDS + 15
    while pool.held()[1] and time.monotonic() < deadline:  # the janitor thread frees it
        time.sleep(0.1)
    assert pool.held() == (0, 0)


def test_a_dask_worker_keeps_idle_buffers_for_its_next_reads(client):
    def idle_after(seconds: float) -> tuple:
        pool = Recycler(idle_bytes=1 << 30)
        pool.empty(SHAPE)  # dropped at once: idle
        time.sleep(seconds)
        return pool.held()[1], pool.idle_seconds

    kept, idle = client.submit(idle_after, LOCAL_IDLE_SECONDS + 3, pure=False).result()
    assert idle == IDLE_SECONDS and kept == NBYTES
