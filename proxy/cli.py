"""The ``pgwarden`` command."""
import argparse, asyncio, sys
from .config import load_config, ConfigError
from .server import Server, new_event_loop

def main(argv=None):
    ap = argparse.ArgumentParser(prog="pgwarden")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve"); s.add_argument("--config", "-c", required=True)
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    loop = new_event_loop()
    async def run():
        srv = Server(cfg); await srv.start(); print("listening", srv.port, flush=True); await srv.serve_forever()
    loop.run_until_complete(run())
