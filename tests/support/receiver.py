"""A webhook receiver for tests and the benchmark: a small HTTP server on 127.0.0.1 that checks
each signature as a Lago receiver does and records every request it gets."""

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support.servers import free_port


@dataclass
class Arrival:
    """One request the receiver got, in arrival order, and what it answered."""

    key: str
    sequence: int
    customer_id: str
    webhook_type: str
    body: bytes
    headers: dict
    signed: bool  # the signature matched the secret
    try_number: int  # 1 for the first request with this X-Lago-Unique-Key
    at: float  # time.monotonic() of its arrival
    status: int | None = None  # set once answered
    answered_at: float | None = None  # time.monotonic() when the answer was sent


def lago_signature_is_valid(secret: str, body: bytes, signature: str) -> bool:
    """What a Lago HMAC receiver checks: base64 of HMAC-SHA256(secret, raw body)."""
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    return hmac.compare_digest(expected.decode(), signature)


class Receiver:
    """Takes webhooks on 127.0.0.1:port. ``answer(arrival)`` says what to do with each: a
    status, and seconds to wait before answering (200 at once by default). It can be stopped
    and started again on the same port (a receiver that is down for a while)."""

    def __init__(self, secret: str = "", port: int | None = None, record_bodies: bool = True):
        self.secret, self.port = secret, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhooks"
        self.record_bodies = record_bodies
        self.arrivals: list[Arrival] = []
        self.tries: dict[str, int] = {}
        self.lock = threading.Lock()
        self.answer = lambda arrival: (200, 0.0)
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do
            # The status line and the body go out in two writes: without this, Nagle's
            # algorithm holds the second until the deliverer's delayed ACK, on every request.
            disable_nagle_algorithm = True

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                arrival = receiver.arrived(body, dict(self.headers))
                status, delay = receiver.answer(arrival)
                if delay:
                    time.sleep(delay)
                extra = {"Location": receiver.url + "/elsewhere"} if 300 <= status < 400 else {}
                # Noted before sending: the deliverer may act on the answer before this thread
                # runs again. Taken back if the answer could not be sent.
                arrival.answered_at, arrival.status = time.monotonic(), status
                try:
                    self.send_response(status)
                    for name, value in {"Content-Length": "2", **extra}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(b"ok")
                    self.wfile.flush()
                except OSError:  # the deliverer gave up waiting and closed: no answer given
                    arrival.answered_at = arrival.status = None

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        # It looks for a shutdown() request at this interval: a stop need not wait out the
        # default half second.
        serve = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def arrived(self, body: bytes, headers: dict) -> Arrival:
        event = json.loads(body)
        key = headers.get("X-Lago-Unique-Key", "")
        signed = lago_signature_is_valid(self.secret, body, headers.get("X-Lago-Signature", ""))
        with self.lock:
            self.tries[key] = self.tries.get(key, 0) + 1
            arrival = Arrival(
                key=key,
                sequence=event["sequence"],
                customer_id=event["customer"]["customer_id"],
                webhook_type=event["webhook_type"],
                body=body if self.record_bodies else b"",
                headers=headers,
                signed=signed,
                try_number=self.tries[key],
                at=time.monotonic(),
            )
            self.arrivals.append(arrival)
        return arrival

    def delivered(self) -> list[Arrival]:
        """The requests answered 2xx, in arrival order."""
        with self.lock:
            return [a for a in self.arrivals if a.status is not None and 200 <= a.status < 300]
