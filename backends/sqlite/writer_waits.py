"""When a writer last had to wait for SQLite's one write lock, kept in a small file beside the
database that every process maps (``<database>-waits``): an import pauses after a batch only if
a live writer waited meanwhile, and otherwise goes at full speed."""

import mmap
import os
import struct
import time

# A statement that took longer than this waited for the lock: SQLite's busy handler sleeps at
# least a millisecond between tries, and an upsert alone takes less.
WAITED = 0.001


class WriterWaits:
    """The moment (time.monotonic, the same clock in every process) a writer last waited."""

    def __init__(self, database: str):
        fd = os.open(database + "-waits", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self.moment = mmap.mmap(fd, 8)
        finally:
            os.close(fd)  # the mapping keeps the file

    def note(self) -> None:
        """Record that a writer waited, now (one aligned 8-byte store: never read half done)."""
        struct.pack_into("d", self.moment, 0, time.monotonic())

    def since(self, mark: float) -> bool:
        """Whether a writer waited at or after ``mark``."""
        return struct.unpack_from("d", self.moment, 0)[0] >= mark

    def close(self) -> None:
        """Unmap the file."""
        self.moment.close()
