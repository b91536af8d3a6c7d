# Declarations for the compiled build of broker/storage/writer.py.
#
# setup.py compiles that plain-Python source into broker._speedups.writer;
# Cython finds this file by that module name, and the two classes below
# become extension types whose attributes are C fields, so the loop's many
# reads and writes of them per batch skip the instance dictionary. The pure-Python broker
# runs writer.py as it is and never reads this file.
#
# Every attribute the classes set must be listed here (a test checks: a new
# one would otherwise land in the instance __dict__, slower but working).
# All are Python objects, as in writer.py: no C types, so both builds
# behave the same. DiskWriter keeps a __dict__ so that tests can replace a
# method on one writer, as they can in the pure build.

cdef class _Job:
    cdef public object appends, acks, offsets, deletes, calls, checkpoint, nbytes
    cdef public object results, errors, ends, call_results, unsynced


cdef class DiskWriter:
    # configuration and collaborators
    cdef public object _loop, _offsets, _store, _fsync, _interval, _high, _low
    cdef public object _on_written, _clock, _tail, _inline_max, _checkpoint_every
    cdef public object _retention_every, stats, fsync_histogram
    # the loop's side: pending work, flow control, scheduling
    cdef public object _pending, _pending_bytes, _flight_bytes, _in_flight, _paused
    cdef public object _deletes, _calls, _idle_waiters, _want_checkpoint
    cdef public object _kick_handle, _offsets_handle, _offsets_due, _retention_handle
    cdef public object _closing, _clean_stop
    # the disk thread, the syncer and what they share with the loop
    cdef public object _thread, _queue, _disk_lock, _loop_wake, _thread_due, _wake_queued
    cdef public object _syncer, _sync_queue, _sync_results, _sync_busy, _sync_due, _busy_retry
    cdef public object _dirty, _writeback, _seals, _dirsyncs, _lazy, _changed
    cdef public object _last_checkpoint, _offsets_retry
    cdef dict __dict__
    cdef object __weakref__
