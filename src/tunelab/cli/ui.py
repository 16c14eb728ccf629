"""tunelab ui [--dir outputs] [--port 7860] [--host 127.0.0.1] [--token SECRET | --no-token] [--no-browser]

    tunelab ui                                  # http://127.0.0.1:7860/?token=<random>, runs under ./outputs
    tunelab ui --host 0.0.0.0 --token s3cret    # reachable from other machines; every request needs the token

Every request needs a token, a random one unless given (as Jupyter does): the UI starts processes as you, and on a
machine shared with other users 127.0.0.1 is reachable by all of them. The printed URL carries it once; the browser
keeps it in a cookie. `--no-token` (loopback only) drops it on a machine that is yours alone.

Runs in the foreground; Ctrl-C stops the web server only: runs started from it keep training.
"""

from __future__ import annotations

import argparse
import os
import secrets
from urllib.parse import quote

from tunelab.cli import port_number, positive_int
from tunelab.listening import listen
from tunelab.ui import MAX_UPLOAD_MB

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="outputs", help="folder that holds the runs (output.dir; default outputs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--token", default=None,
                   help="secret every request must carry (?token= once in the browser; default: a random one, in "
                        "the printed URL)")
    p.add_argument("--no-token", action="store_true",
                   help="no token (loopback only): anyone with an account on this machine can then use the UI")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--max-upload-mb", type=positive_int, default=MAX_UPLOAD_MB,
                   help=f"largest dataset upload from the New run page, in MiB (default {MAX_UPLOAD_MB}); copy "
                        "larger files into data/raw/ by hand")


def run(args: argparse.Namespace) -> int:
    from tunelab.errors import TunelabError

    if args.host not in LOOPBACK and (args.no_token or not args.token):
        raise TunelabError(f"--host {args.host} makes the UI reachable from other machines, and it can start "
                           "processes: add --token SECRET (every request then needs it)")
    if args.no_token and args.token:
        raise TunelabError("give --token SECRET or --no-token, not both")
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise TunelabError(f"--dir {args.dir} is a file: give the folder that holds (or will hold) the run folders")
    token = None if args.no_token else args.token or secrets.token_urlsafe(16)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise TunelabError(f"tunelab ui needs the ui extra ({e.name} is missing): pip install 'tunelab[ui]'") from None
    from tunelab.ui.app import LOOPBACK_NAMES, create_app

    allowed = tuple(LOOPBACK_NAMES) if args.host in LOOPBACK else None
    app = create_app(args.dir, token=token, allowed_hosts=allowed, max_upload_mb=args.max_upload_mb)
    sock = listen(args.host, args.port)  # before the URL is shown: a taken port must not open another server's page
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown_host}:{sock.getsockname()[1]}/" + (f"?token={quote(token)}" if token else "")
    print(f"tunelab ui: {url}  (runs in {args.dir}; Ctrl-C stops the server, not the runs)", flush=True)
    if not args.no_browser:
        import webbrowser

        webbrowser.open(url)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run catches it too)
        pass
    finally:
        sock.close()
    return 0
