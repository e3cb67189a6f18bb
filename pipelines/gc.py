"""Garbage collection of an output root: abandoned and replaced releases, old versions.

Never removes the release LATEST names, nor a version's live release unless the
whole version goes (only with --keep/--older-than, and never the version LATEST
names nor the N newest by snapshot). Releases that nothing names are removed only
once older than --grace-minutes: a run may still be writing one, and a reader
may still have a just-replaced one open. Takes the output root's lease, so it
never runs beside a publisher.
"""

import logging
import uuid

from pipelines import files
from pipelines import lease
from pipelines import publication as pub

_log = logging.getLogger(__name__)


def main(argv, parser) -> int:
    parser.add_argument("--output", required=True,
                        help="[required] output root of `catalog-index index` (local or gs://)")
    parser.add_argument("--keep", type=int, default=None,
                        help="keep the N newest published versions (by snapshot) and remove the others (with "
                             "--older-than: only those older than DAYS); never the version LATEST names "
                             "(default: no version is removed)")
    parser.add_argument("--older-than", "--older_than", dest="older_than", type=float, default=None,
                        help="remove versions whose snapshot is older than this many days (with --keep: only "
                             "beyond the N newest); never the version LATEST names (default: no age limit)")
    parser.add_argument("--grace-minutes", "--grace_minutes", dest="grace_minutes", type=float, default=60.0,
                        help="leave releases that nothing names alone until they are this old "
                             "(default: %(default)g)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print what would be removed, remove nothing")
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep < 0:
        parser.error("--keep must be >= 0")
    if args.grace_minutes < 0 or (args.older_than is not None and args.older_than < 0):
        parser.error("--grace-minutes and --older-than must be >= 0")
    output = args.output.rstrip("/")
    if not files.list_files(output):
        print(f"gc: nothing under {output}")
        return 0
    owner = lease.Lease(output, "gc-" + uuid.uuid4().hex[:8], command="gc").acquire()
    try:
        removals = pub.plan_garbage(output, args.keep, args.older_than, args.grace_minutes)
        for r in removals:
            print(f"{'would remove' if args.dry_run else 'removing'} {r.path}  ({r.why})")
            if not args.dry_run:
                pub.remove(r, output)
        print(f"gc: {len(removals)} item(s) {'to remove' if args.dry_run else 'removed'} from {output}")
    finally:
        owner.release()
    return 0
