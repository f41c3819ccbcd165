#!/usr/bin/env python3
"""A git smart-HTTP server over HTTPS for the integration tests.

Runs `git http-backend` as a CGI behind Basic auth that only sidekey holds.
Standard library only. Usage:

    git_server.py --port-file PATH --root DIR --cert CERT --key KEY \
                  --user USER --password PASS

Binds 127.0.0.1:0 and writes the port to PATH (atomically) once listening.
Every request is appended to ROOT/requests.log as "METHOD PATH STATUS",
where PATH is the request target as received (query included).
"""

import argparse
import base64
import hmac
import http.server
import os
import ssl
import subprocess
import sys
import threading

ARGS = None
LOG_LOCK = threading.Lock()


def log_request_line(method, path, status):
    with LOG_LOCK:
        with open(os.path.join(ARGS.root, "requests.log"), "a") as f:
            f.write(f"{method} {path} {status}\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "git-test-server"

    def log_message(self, fmt, *args):
        sys.stderr.write("%s\n" % (fmt % args))

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def authorized(self):
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        expected = base64.b64encode(f"{ARGS.user}:{ARGS.password}".encode()).decode()
        return hmac.compare_digest(value.strip().encode(), expected.encode())

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError("eof in chunked body")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers, up to the blank line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        log_request_line(self.command, self.path, status)

    def serve(self):
        # Framing and progress on stderr (server.log), for failure messages.
        sys.stderr.write(
            "> %s %s te=%s cl=%s expect=%s\n"
            % (
                self.command,
                self.path,
                self.headers.get("Transfer-Encoding"),
                self.headers.get("Content-Length"),
                self.headers.get("Expect"),
            )
        )
        sys.stderr.flush()
        body = self.read_body()
        sys.stderr.write("> body %d bytes\n" % len(body))
        sys.stderr.flush()
        if not self.authorized():
            self.reply(
                401,
                [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Type", "text/plain")],
                b"authentication required\n",
            )
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": ARGS.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": ARGS.root,
            "REMOTE_USER": ARGS.user,
            "REMOTE_ADDR": self.client_address[0],
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        }
        encoding = self.headers.get("Content-Encoding")
        if encoding:
            env["HTTP_CONTENT_ENCODING"] = encoding
        protocol = self.headers.get("Git-Protocol")
        if protocol:
            env["GIT_PROTOCOL"] = protocol
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True
        )
        if proc.stderr:
            sys.stderr.write(proc.stderr.decode(errors="replace"))
        out = proc.stdout
        sep = out.find(b"\r\n\r\n")
        sep_len = 4
        if sep < 0:
            sep = out.find(b"\n\n")
            sep_len = 2
        if sep < 0:
            self.reply(502, [("Content-Type", "text/plain")], b"bad CGI output\n")
            return
        status = 200
        headers = []
        for line in out[:sep].decode("latin-1").splitlines():
            if not line.strip():
                continue
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k.lower() != "content-length":
                headers.append((k, v))
        self.reply(status, headers, out[sep + sep_len :])


def main():
    global ARGS
    p = argparse.ArgumentParser()
    for name in ("port-file", "root", "cert", "key", "user", "password"):
        p.add_argument("--" + name, required=True)
    ARGS = p.parse_args()
    ARGS.root = os.path.abspath(ARGS.root)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ARGS.cert, ARGS.key)
    ctx.set_alpn_protocols(["http/1.1"])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # The handshake happens on first read, in the request's own thread.
    server.socket = ctx.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    port = server.server_address[1]
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, ARGS.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
