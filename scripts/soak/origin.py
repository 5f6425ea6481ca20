"""The soak's origin, run in the agent's namespace: an HTTP server whose bodies are known to
the visitors byte for byte, and an echo server.

    python3 origin.py --http ADDR:PORT --echo ADDR:PORT

- `GET /bulk/SEED/LEN` answers LEN bytes of `body(SEED, LEN)` with a Content-Length, kept
  alive unless the request says `Connection: close`.
- The echo server sends back every byte it gets, and half-closes after the client did.

Prints `ready` once both listen. Imported by the soak for `body`.
"""

import argparse
import random
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = random.Random(20261130).randbytes(1 << 20)
PIECE = 64 * 1024
MAX_LEN = 256 << 20


def body(seed, start, end):
    """Bytes [start, end) of the body for SEED: BLOCK repeated, starting at SEED's offset."""
    out = bytearray()
    pos = (seed + start) % len(BLOCK)
    left = end - start
    while left > 0:
        take = min(left, len(BLOCK) - pos)
        out += BLOCK[pos:pos + take]
        left -= take
        pos = 0
    return bytes(out)


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.split("/")
        try:
            if len(parts) != 4 or parts[1] != "bulk":
                raise ValueError
            seed, length = int(parts[2]), int(parts[3])
            if not 0 <= length <= MAX_LEN:
                raise ValueError
        except ValueError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        for start in range(0, length, PIECE):
            self.wfile.write(body(seed, start, min(length, start + PIECE)))

    def log_message(self, *args):
        pass


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        while True:
            data = s.recv(PIECE)
            if not data:
                break
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--echo", required=True)
    args = ap.parse_args()
    ThreadingHTTPServer.daemon_threads = True
    http = ThreadingHTTPServer(split(args.http), Http)
    echo = EchoServer(split(args.echo), Echo)
    for server in (http, echo):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the soak closes our stdin (or is gone)


if __name__ == "__main__":
    main()
