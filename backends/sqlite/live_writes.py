"""When a live writer last began a write, kept in a small file beside the database that every
process maps (``<database>-writes``): an import pauses after a batch only if a live write began
while it held SQLite's one write lock (that writer waited for it), and otherwise goes on at full
speed."""

import mmap
import os
import struct
import time


class LiveWrites:
    """The moment (time.monotonic, one clock for every process) a live write last began."""

    def __init__(self, database: str):
        fd = os.open(database + "-writes", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self.moment = mmap.mmap(fd, 8)
        finally:
            os.close(fd)  # the mapping keeps the file

    def note(self) -> None:
        """Record that a live write begins now (one aligned 8-byte store: never read half
        done). Noted before the write, so an import sees a writer while it still waits."""
        struct.pack_into("d", self.moment, 0, time.monotonic())

    def since(self, mark: float) -> bool:
        """Whether a live write began at or after ``mark``."""
        return struct.unpack_from("d", self.moment, 0)[0] >= mark

    def close(self) -> None:
        """Unmap the file."""
        self.moment.close()
