"""API keys for `/v1`, from the command line.

    python -m app.web.keys create --issuer https://shop.example --sub user-42 [--name "billing bot"]
    python -m app.web.keys list [--issuer ... --sub ...]
    python -m app.web.keys revoke KEY_ID

A key belongs to a caller of the same kind as a JWT's (issuer plus sub): its
conversations are the ones that user sees through the widget. The key is
printed once; only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys

from app.storage import Store
from app.web.identity import owner_of
from config.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key and print it (shown this once)")
    listing = commands.add_parser("list", help="the keys (without the keys themselves)")
    for p in (create, listing):
        p.add_argument("--issuer", required=p is create, help="the JWT issuer the caller belongs to")
        p.add_argument("--sub", required=p is create, help="the caller's sub at that issuer")
    create.add_argument("--name", default="", help="what the key is for")
    revoke = commands.add_parser("revoke", help="stop a key (within half a minute on every web process)")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    settings = Settings()
    store = Store(settings.resolved_database_url, settings.resolved_replica_url, pool_size=1)
    try:
        if args.command == "create":
            if any(c.isspace() for c in args.issuer) or not args.sub:
                parser.error("--issuer must have no spaces and --sub must not be empty")
            key_id, key = store.create_api_key(owner_of(args.issuer, args.sub), args.name)
            print(json.dumps({"id": key_id, "key": key}))
        elif args.command == "list":
            owner = owner_of(args.issuer, args.sub) if args.issuer and args.sub else None
            for row in store.api_keys(owner):
                print(json.dumps(row))
        elif not store.revoke_api_key(args.key_id):
            print(f"no such key, or already revoked: {args.key_id}", file=sys.stderr)
            return 1
    finally:
        store.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
