"""``python -m specdec.bench``: see :mod:`specdec.bench.app`."""

from specdec.bench.app import main

if __name__ == "__main__":
    main()
