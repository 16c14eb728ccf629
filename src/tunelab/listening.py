"""`listen(host, port)`: the listening socket `tunelab serve` and `tunelab ui` hand to uvicorn.

Bound before the model loads or the URL is shown, so that a taken port is one error line, not a server that
claims to serve and then fails.
"""

from __future__ import annotations

import errno
import socket

from tunelab.errors import TunelabError


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (connections wait in its backlog until the server takes them), bound as
    uvicorn binds it; a one-line TunelabError when it cannot be."""
    # uvicorn's family: IPv4 unless the host is an IPv6 address. The first of getaddrinfo's answers is not: a hosts
    # file that lists `::1 localhost` first would serve `--host localhost` on IPv6 only, and 127.0.0.1 would fail
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError as e:
        raise TunelabError(f"--host {host}: not an address of this machine ({e.strerror or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-closed server's port is free
        sock.bind(address)
        sock.listen(2048)  # uvicorn's backlog; two servers can bind one port with SO_REUSEADDR, only one listen
    except OSError as e:
        sock.close()
        why = "another program is listening there; stop it or give another --port" \
            if e.errno == errno.EADDRINUSE else e.strerror or e
        raise TunelabError(f"cannot listen on {host} port {port}: {why}") from None
    return sock
