"""Another commit's code beside this checkout's, for the benchmarks that compare two versions:
a git worktree of it, and a folder that makes either version importable as customers_service."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_worktree(commit: str, folder: str) -> str:
    """``commit``'s code checked out at ``folder`` (a git worktree: remove it with
    remove_worktree)."""
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", folder, commit], check=True)
    return folder


def remove_worktree(folder: str) -> None:
    """Remove a worktree made by add_worktree, if it is there."""
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", folder], check=False)


def shim(code: str, folder: str) -> str:
    """``folder``, made with one entry, ``customers_service``: a link to a version's code, so
    that a process with ``folder`` on its PYTHONPATH imports that version."""
    os.makedirs(folder)
    os.symlink(os.path.abspath(code), os.path.join(folder, "customers_service"))
    return folder
