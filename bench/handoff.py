"""What handing an upsert to another process would cost: the round trip group commit needs.

    .venv/bin/python bench/handoff.py [--round-trips 20000]

A group commit on SQLite needs one writer per host that the gunicorn workers hand their upserts
to (issue 23, bench/group_commit.py measures what joining them saves). This measures the hand-off
alone: a worker's upsert parameters (upsert_params of the seed customer) pickled over a Unix
socket to a second process, which answers a customer's body of the usual size, also pickled.
Prints the wall time and the CPU of each side per round trip.
"""

import argparse
import os
import pickle
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from support.data import SEED  # noqa: E402

from customers_service.backends.shared import upsert_params  # noqa: E402
from customers_service.storage import utc_now  # noqa: E402

BODY = b'{"customer":' + b"x" * 600 + b"}"  # about a stored customer's size
WARM_UP = 1000


def receive(sock: socket.socket) -> object:
    """One length-prefixed pickled message."""
    size = int.from_bytes(sock.recv(4), "big")
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return pickle.loads(data)


def send(sock: socket.socket, message: object) -> None:
    """One length-prefixed pickled message."""
    data = pickle.dumps(message)
    sock.sendall(len(data).to_bytes(4, "big") + data)


def writer(sock: socket.socket, count: int) -> None:
    """The other process: answer each upsert with a body."""
    for _ in range(count):
        receive(sock)
        send(sock, ("ok", BODY))


def main() -> None:
    """Time the round trips and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    args = parser.parse_args()
    params = upsert_params({**SEED, "customer_id": "handoff-1"}, utc_now())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        writer(theirs, WARM_UP + args.round_trips)
        os._exit(0)
    theirs.close()
    for _ in range(WARM_UP):
        send(ours, params)
        receive(ours)
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.round_trips):
        send(ours, params)
        receive(ours)
    wall = (time.perf_counter() - started) / args.round_trips * 1e6
    client = (time.process_time() - cpu) / args.round_trips * 1e6
    os.waitpid(pid, 0)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    served = (child.ru_utime + child.ru_stime) / (WARM_UP + args.round_trips) * 1e6
    print(
        f"{args.round_trips:,} round trips, parameters of {len(pickle.dumps(params))} bytes: "
        f"{wall:.1f} us each, CPU {client:.1f} us in the worker and {served:.1f} us in the writer"
    )


if __name__ == "__main__":
    main()
