"""``python -m safesearch``: the same command line as the ``safesearch`` script."""

from safesearch.cli import main

if __name__ == "__main__":
    main()
