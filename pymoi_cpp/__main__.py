"""`python -m pymoi_cpp`: the `pymoi` command line."""

from .cli import entry_point

if __name__ == "__main__":
    entry_point()
