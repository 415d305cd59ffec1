"""A shared MLflow tracking server on 127.0.0.1 (the same as `bpexp-server`; see bpexp/server.py)."""

import sys

from bpexp.server import main

if __name__ == "__main__":
    sys.exit(main())
