"""Backfill: one index version per date, from a dated catalog pattern.

``--catalog-pattern 'gs://bucket/catalog/dt={date}/*.parquet' --from D1 --to D2``
runs the index pipeline once per date (ISO ``YYYY-MM-DD``, inclusive), naming
the version after the date; its snapshot is the date's midnight (UTC), so a
backfilled date never moves LATEST back from a newer version. Dates already published are skipped unless
``--force``. A failing date does not stop the others; the exit status says
whether all of them succeeded.
"""

import argparse
import dataclasses
import datetime
import logging
import textwrap
from typing import Callable, Optional

from schemas.errors import CatalogIndexError, ConfigError, brief
from pipelines import files
from pipelines import flags
from pipelines import index_pipeline
from schemas import layout

_log = logging.getLogger(__name__)


def _date(value: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2026-11-28") from None


# Index flags that backfill sets itself for each date (refused when given) or takes as its own.
SET_PER_DATE = ("--catalog", "--version", "--snapshot-time")
OWN = ("--output", "--force")


def passed_through() -> list:
    """The `catalog-index index` flags that pass through to each date's run (dashed spellings)."""
    from pipelines.options import IndexOptions

    view = argparse.ArgumentParser(add_help=False)
    IndexOptions._add_argparse_args(view)  # pylint: disable=protected-access
    return [a.option_strings[0] for a in view._actions if a.option_strings[0] not in SET_PER_DATE + OWN]


def parse_args(argv):
    epilog = textwrap.fill(
        "Every other `catalog-index index` flag passes through to each date's run, with the defaults "
        "`catalog-index index --help` shows: " + ", ".join(passed_through()) + "; and so does any Beam flag "
        "(--runner, --direct_num_workers, Dataflow flags). Backfill sets " + ", ".join(SET_PER_DATE)
        + " itself for each date (the date's catalog, the date as the version, its midnight UTC as the "
        "snapshot); giving one is refused.", width=79, break_on_hyphens=False)
    # allow_abbrev=False: else `--catalog X` would silently replace --catalog-pattern (a prefix of it)
    # instead of being refused below.
    parser = flags.ArgumentParser(prog="catalog-index backfill", description=__doc__.split("\n\n")[0],
                                  epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  allow_abbrev=False)
    parser.add_argument("--catalog-pattern", required=True,
                        help="[required] Catalog glob with a {date} placeholder, e.g. "
                             "'gs://b/catalog/dt={date}/*.parquet'.")
    parser.add_argument("--from", dest="start", type=_date, required=True,
                        help="[required] First date, YYYY-MM-DD.")
    parser.add_argument("--to", dest="end", type=_date, required=True,
                        help="[required] Last date, YYYY-MM-DD (inclusive).")
    parser.add_argument("--output", required=True, help="[required] Output root, as for `catalog-index index`.")
    parser.add_argument("--force", action="store_true",
                        help="Rebuild dates that are already published (and pass --force to each date's run).")
    args, rest = parser.parse_known_args(argv)
    flags.check_pipeline_flags(rest, "catalog-index backfill")
    if "{date}" not in args.catalog_pattern:
        raise ConfigError("--catalog-pattern must contain {date}, e.g. 'catalog/dt={date}/*.parquet'")
    if args.end < args.start:
        raise ConfigError(f"--to {args.end} is before --from {args.start}")
    for flag in ("--catalog", "--version", "--snapshot-time", "--snapshot_time"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ConfigError(f"backfill sets {flag} itself for each date; remove it")
    return args, rest


@dataclasses.dataclass
class DateOutcome:
    date: str
    status: str  # "published", "skipped", "failed" or "dry run"
    detail: str = ""


def run(argv=None, index_run: Optional[Callable] = None) -> list:
    """Runs the backfill; returns one DateOutcome per date, in date order."""
    args, rest = parse_args(argv)
    index_run = index_run or index_pipeline.run
    outcomes = []
    day = args.start
    while day <= args.end:
        date = day.isoformat()
        day += datetime.timedelta(days=1)
        published = files.exists(files.join(args.output.rstrip("/"), date, layout.CURRENT_FILE))
        if published and not args.force:
            outcomes.append(DateOutcome(date, "skipped", "already published (use --force to rebuild)"))
            continue
        argv_date = ["--catalog", args.catalog_pattern.replace("{date}", date), "--output", args.output,
                     "--version", date, "--snapshot-time", layout.date_snapshot(date), *rest
                     ] + (["--force"] if args.force else [])
        try:
            result = index_run(argv_date)
        except CatalogIndexError as e:
            outcomes.append(DateOutcome(date, "failed", str(e)))
            _log.error("%s: %s", date, e)
            continue
        except Exception as e:  # a pipeline failure for one date must not stop the others
            outcomes.append(DateOutcome(date, "failed", brief(e)))
            _log.exception("%s failed", date)
            continue
        lines = [line.strip() for line in result.summary().splitlines()]
        if result.manifest is None:  # a Dataflow dry run: built, not submitted
            outcomes.append(DateOutcome(date, "dry run", lines[0]))
            continue
        counts = [line for line in lines if line.startswith("read ")]
        where = [line for line in lines if line.startswith("LATEST")]  # where LATEST ended, and why
        outcomes.append(DateOutcome(date, "published", "; ".join((counts or lines[:1]) + where)))
    return outcomes
