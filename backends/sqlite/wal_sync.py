"""Group fsync of SQLite's WAL after commits, outside SQLite's write lock: FULL durability
without writers queueing behind each other's fsync."""

import fcntl
import mmap
import os
import struct
import time

LOCK_PATIENCE = 0.01  # seconds: a few fsyncs long, so only a stuck holder makes us fsync alone


class WalSync:
    """Group fsync of the WAL, shared by every process that writes the database.

    Two counters live in a small file mapped by all of them (``<database>-sync``): fsyncs
    started and fsyncs finished. After its commit a writer notes how many had started, then
    takes the file's lock: if an fsync that started after its commit has finished meanwhile, its
    commit is already on disk and it is done; otherwise it runs the next fsync itself. While one
    fsync runs, the writers that commit queue on the lock and are then covered by one more.
    The lock only batches fsyncs, it is not needed for them: a writer that cannot get it soon
    fsyncs on its own, so a frozen process holding it delays no one for long.
    """

    def __init__(self, database: str):
        self.wal_path = database + "-wal"
        self.wal_fd: int | None = None  # opened at the first commit: the WAL exists by then
        self.sync_fd = os.open(database + "-sync", os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.sync_fd).st_size < 16:
            os.ftruncate(self.sync_fd, 16)
        self.counters = mmap.mmap(self.sync_fd, 16)

    def after_commit(self) -> None:
        """Return once the WAL holds, on disk, every commit made before this call."""
        started_before = struct.unpack_from("q", self.counters, 0)[0]
        if not self._lock_briefly():
            # The lock's holder is slow or stuck (a frozen process): never wait on it.
            os.fsync(self._wal())
            return
        try:
            if struct.unpack_from("q", self.counters, 8)[0] > started_before:
                return
            number = struct.unpack_from("q", self.counters, 0)[0] + 1
            struct.pack_into("q", self.counters, 0, number)
            os.fsync(self._wal())
            struct.pack_into("q", self.counters, 8, number)
        finally:
            fcntl.flock(self.sync_fd, fcntl.LOCK_UN)

    def _lock_briefly(self) -> bool:
        """Take the lock, waiting a few fsyncs' time at most."""
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(self.sync_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.0001)

    def _wal(self) -> int:
        """The WAL's descriptor, opened at the first commit (the file exists by then)."""
        if self.wal_fd is None:
            self.wal_fd = os.open(self.wal_path, os.O_RDONLY)
        return self.wal_fd

    def close(self) -> None:
        """Release the mapping and the descriptors; safe to call again."""
        if self.sync_fd is None:
            return
        self.counters.close()
        os.close(self.sync_fd)
        if self.wal_fd is not None:
            os.close(self.wal_fd)
        self.sync_fd = self.wal_fd = None

    def __del__(self) -> None:
        # A thread's cached connection is freed, not closed, when the thread ends (flask run
        # serves each client on a thread of its own): its descriptors must not outlive it.
        self.close()
