"""Flex Template entry point: the same `index` command, flags as template parameters."""

import sys

from catalog_index import cli

if __name__ == "__main__":
    sys.exit(cli.main(["index", *sys.argv[1:]]))
