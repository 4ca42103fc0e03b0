"""A stand-in for llama.cpp's ``llama-server`` (tests only): ``/health`` and ``/completion`` over HTTP.

Imported, :func:`serve` runs it in a thread; run as a script with llama-server's command line it serves on
``--port`` and writes its arguments to ``argv-<port>.json`` beside ``-m``'s file. A completion continues the prompt
with made-up tokens (``last prompt id + 1, + 2, ...`` within the tiny vocabulary); with ``--spec-type`` its timings
report half the tokens as accepted drafts out of twice as many drafted, as the real server reports them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VOCAB = 96  # tests/tiny.py's


def fake_tokens(ids: list[int], n: int) -> list[int]:
    return [3 + (ids[-1] + i) % (VOCAB - 3) for i in range(1, n + 1)]


class State:
    """What the server saw: request bodies and the most requests in flight at once."""

    def __init__(self, speculative: bool, delay_s: float = 0.0) -> None:
        self.speculative, self.delay_s = speculative, delay_s
        self.bodies: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()


def handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.reply(200, {"status": "ok"}) if self.path == "/health" else self.reply(404, {})

        def do_POST(self) -> None:
            if self.path != "/completion":
                return self.reply(404, {})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append(body)
                state.in_flight += 1
                state.most_in_flight = max(state.most_in_flight, state.in_flight)
            time.sleep(state.delay_s)
            tokens = fake_tokens(body["prompt"], body["n_predict"])
            timings = {"predicted_n": len(tokens)}
            if state.speculative:
                timings.update(draft_n=2 * len(tokens), draft_n_accepted=len(tokens) // 2)
            with state.lock:
                state.in_flight -= 1
            self.reply(200, {"tokens": tokens, "content": "", "stop": True, "timings": timings})

    return Handler


def serve(speculative: bool = False, delay_s: float = 0.0) -> tuple[ThreadingHTTPServer, State]:
    """A fake server on a free local port, in a daemon thread; ``server.server_address[1]`` is its port."""
    state = State(speculative, delay_s)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, state


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--no-ui"]  # every other option the peer passes takes one value
    opts = dict(zip(args[::2], args[1::2]))
    port = int(opts["--port"])
    (Path(opts["-m"]).parent / f"argv-{port}.json").write_text(json.dumps(argv))
    state = State("--spec-type" in opts, delay_s=0.05)
    ThreadingHTTPServer(("127.0.0.1", port), handler(state)).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
