"""Command-line flags: unknown or misspelt ones are an error before any work.

Beam's PipelineOptions discards a flag it does not know with a warning, so
``--shardz 4`` would publish one shard and exit 0. Every command checks its
flags here first: app flags and every Beam/runner flag are accepted, anything
else raises UsageError with Beam's "did you mean" suggestion.
"""

import argparse
import difflib
from typing import Iterable, Optional

from schemas.errors import UsageError


def _suggest(flag: str, known: Iterable[str]) -> str:
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, sorted(set(known)), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown(unknown: list, known: Iterable[str], prog: str) -> None:
    flag = next((a for a in unknown if a.startswith("-")), unknown[0] if unknown else None)
    if flag is None:
        return
    known = list(known)
    if flag.startswith("-"):
        raise UsageError(f"unknown flag {flag.split('=', 1)[0]}{_suggest(flag, known)} "
                         f"(see `{prog} --help`)")
    raise UsageError(f"unexpected argument {flag!r} (see `{prog} --help`)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        parsed, rest = self.parse_known_args(args, namespace)
        if rest:
            _unknown(rest, self._known(), self.prog)
        return parsed

    def _known(self):
        out = []
        for action in self._actions:
            out.extend(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    out.extend(o for a in sub._actions for o in a.option_strings)
        return out


# Packages whose PipelineOptions subclasses are this project's commands (everything else is Beam's).
_APP_PACKAGES = frozenset({"pipelines", "catalog_index"})


def check_pipeline_flags(argv: list, prog: str, extra: Optional[argparse.ArgumentParser] = None,
                         app: Optional[type] = None) -> None:
    """Raises UsageError for any flag that neither the app nor any Beam PipelineOptions class knows.

    ``app``: the command's own PipelineOptions class (default IndexOptions). Other commands' option
    classes do not count: `train --shards 3` is an unknown flag, not an index flag silently ignored.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    from pipelines.options import IndexOptions

    app = app or IndexOptions

    class Parser(_BeamArgumentParser):
        def error(self, message):  # a bad value (--shards x): one line, not usage and SystemExit
            raise UsageError(f"{message} (see `{prog} --help`)")

    parser = Parser(allow_abbrev=False)
    seen = set()

    def add(cls):
        for sub in cls.__subclasses__():
            if sub.__module__.split(".")[0] in _APP_PACKAGES and sub is not app:
                continue  # another command's options
            if sub.__name__ not in seen:
                seen.add(sub.__name__)
                try:
                    sub._add_argparse_args(parser)  # pylint: disable=protected-access
                except argparse.ArgumentError:
                    pass  # a class registered twice (reloaded module): its flags are there already
                add(sub)

    add(PipelineOptions)
    known = [o for action in parser._actions for o in action.option_strings]
    if extra is not None:
        known += [o for action in extra._actions for o in action.option_strings]
    _, unknown = parser.parse_known_args(list(argv))
    if extra is not None and unknown:
        _, unknown = extra.parse_known_args(unknown)
    if unknown:
        _unknown(unknown, known, prog)


class SharedFlags:
    """A parser view for PipelineOptions._add_argparse_args that skips flags another options class of
    this project already added: Beam's get_all_options puts every PipelineOptions subclass in one
    parser, and `index` and `train` share --output, --seed, --batch-size... (argparse would refuse the
    second copy). Each command still parses its own class alone (view_as), with its own defaults."""

    def __init__(self, parser):
        self._parser = parser

    def add_argument(self, *names, **kwargs):
        taken = getattr(self._parser, "_option_string_actions", {})
        if any(name in taken for name in names):
            return None
        return self._parser.add_argument(*names, **kwargs)

    def __getattr__(self, name):
        return getattr(self._parser, name)
