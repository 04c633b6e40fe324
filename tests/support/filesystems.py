"""A small filesystem that really fills up (a tmpfs, which needs root), and filling it."""

import subprocess
from contextlib import contextmanager

import pytest


@contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the test: a disk that can really fill up."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (root is needed): {result.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path) -> None:
    """Write a file until the filesystem is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
