"""``python -m specdec.bench``: see :mod:`specdec.bench.app`."""

from specdec import extras

extras.require_or_exit("bench", "python -m specdec.bench")

from specdec.bench.app import main  # noqa: E402 - after the check that names a missing extra

if __name__ == "__main__":
    main()
