"""``python -m wsiseg.bench``: the same as the ``wsiseg-bench`` console script."""

from wsiseg.bench.command import main

if __name__ == "__main__":
    main()
