"""Shared CLI entry: a UserError becomes one line on stderr and exit code 2, never a traceback."""
import sys

from .errors import UserError


def run_cli(main):
    try:
        main()
    except UserError as e:
        from . import distributed
        where = f" (rank {distributed.rank()} of {distributed.world()})" if distributed.active() else ""
        print(f"error{where}: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # unwritable --out, full disk, ...: the message names the path
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
