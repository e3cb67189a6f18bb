"""The recall gate (pipelines/recall.py ``measure``) before and after, on one release, side by side.

    python benchmarks/bench_recall_gate.py RELEASE_DIR [REPEATS] [--baseline REV] [--min-recall 0.95]
        [--threads N]

RELEASE_DIR is a release folder (the one holding manifest.json) or an output root (LATEST is followed).
Each repeat runs ``measure(RELEASE_DIR, manifest, min_recall)`` once with the code at ``--baseline``
(default 8eb2313, the last commit before the gate was made faster; extracted with ``git archive`` into a
temp dir) and once with this working tree, each in a fresh child process, alternating which goes first.
Only the ``measure`` call is timed (not the interpreter's start or imports at module level); each child's
peak RSS is reported too (imports included). Prints each run, the medians, and whether both gave exactly
the same dict (or the same refusal). ``--threads`` is
passed to the new code only (the old one has no such argument); default: one per CPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "8eb2313"

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipelines import recall
from schemas.errors import PublicationError
release, min_recall, threads = sys.argv[2], float(sys.argv[3]), sys.argv[4]
manifest = json.load(open(release + "/manifest.json"))
kwargs = {} if threads == "" else {"threads": int(threads)}
t = time.perf_counter()
try:
    out = {"validation": recall.measure(release, manifest, min_recall, **kwargs)}
except PublicationError as e:
    out = {"refused": str(e)}
out["seconds"] = time.perf_counter() - t
import resource
out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(out))
"""


def release_dir(path: str) -> str:
    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    with open(os.path.join(path, "LATEST")) as f:
        return os.path.join(path, json.load(f)["path"])


def run(code_root: str, release: str, min_recall: float, threads: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=code_root)
    done = subprocess.run([sys.executable, "-c", CHILD, code_root, release, str(min_recall), threads],
                          capture_output=True, text=True, env=env, cwd=code_root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measure failed in {code_root} (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release")
    ap.add_argument("repeats", nargs="?", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the code to compare with")
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--threads", default="", help="threads for the new code (default: one per CPU)")
    args = ap.parse_args(argv)
    release = release_dir(args.release)

    with tempfile.TemporaryDirectory(prefix="bench-recall-gate-") as old_root:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old_root], input=archive, check=True)
        roots = {"before": (old_root, ""), "after": (ROOT, args.threads)}
        results = {"before": [], "after": []}
        print(f"release {release}, min_recall {args.min_recall}, baseline {args.baseline}, "
              f"{os.cpu_count()} CPUs", flush=True)
        for r in range(args.repeats):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for name in order:
                load = os.getloadavg()[0]
                code_root, threads = roots[name]
                t = time.perf_counter()
                out = run(code_root, release, args.min_recall, threads)
                out["child_s"] = time.perf_counter() - t
                results[name].append(out)
                print(f"  repeat {r} {name:>6}: measure {out['seconds']:7.2f}s (child {out['child_s']:.1f}s, "
                      f"peak RSS {out['maxrss_mib']:.0f} MiB, load {load:.2f} before)", flush=True)

    for name in ("before", "after"):
        print(f"median {name:>6}: {statistics.median(x['seconds'] for x in results[name]):.2f}s, peak RSS "
              f"{statistics.median(x['maxrss_mib'] for x in results[name]):.0f} MiB over {len(results[name])} runs")
    before = statistics.median(x["seconds"] for x in results["before"])
    after = statistics.median(x["seconds"] for x in results["after"])
    print(f"speed-up {before / after:.1f}x")
    answers = {json.dumps({k: v for k, v in x.items() if k not in ("seconds", "child_s", "maxrss_mib")},
                          sort_keys=True)
               for name in results for x in results[name]}
    print(f"identical results: {len(answers) == 1}")
    for answer in sorted(answers):
        print(f"  {answer}")
    return 0 if len(answers) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
