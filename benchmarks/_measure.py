"""Shared helpers for the benchmarks: run a command in a fresh child and measure it.

Two memory figures per run, both from the child started for that run only:

* ``maxrss_mib``: ``ru_maxrss`` from ``os.wait4`` on that child. The kernel
  reports the peak RSS of the child *or of the largest of its waited-for
  descendants* (a maximum over processes, never a sum), so for a run that forks
  workers it is the biggest single process, not the whole tree.
* ``tree_peak_rss_mib`` / ``tree_peak_pss_mib``: the child and all its
  descendants, summed, sampled from /proc every ``interval`` seconds (RSS
  double counts pages shared between processes; PSS splits them). A sample
  can miss a peak shorter than the interval.
"""

import os
import subprocess
import sys
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _tree(pid):
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _rss_pss(pid):
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = pss = int(f.read().split()[1]) * _PAGE
        except OSError:
            pass
    return rss, pss


def run_measured(cmd, interval=0.2, env=None, cwd=None, stdout_path=None, timeout=None):
    """Runs ``cmd`` in a fresh child; returns a dict of wall_s, rc, maxrss_mib, tree peaks and stdout."""
    out = open(stdout_path, "w+b") if stdout_path else subprocess.PIPE
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    peaks = {"rss": 0, "pss": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = pss = 0
            for p in _tree(proc.pid):
                r, s = _rss_pss(p)
                rss += r
                pss += s
            peaks["rss"] = max(peaks["rss"], rss)
            peaks["pss"] = max(peaks["pss"], pss)
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    text = b""
    if out is subprocess.PIPE:
        # Read while waiting so a chatty child never blocks on a full pipe.
        reader_buf = []
        reader = threading.Thread(target=lambda: reader_buf.append(proc.stdout.read()), daemon=True)
        reader.start()
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if out is subprocess.PIPE:
        reader.join()
        text = reader_buf[0] if reader_buf else b""
    else:
        out.seek(0)
        text = out.read()
        out.close()
    return {
        "wall_s": wall,
        "rc": proc.returncode,
        "maxrss_mib": usage.ru_maxrss / 1024.0,  # Linux: KiB
        "tree_peak_rss_mib": peaks["rss"] / 2**20,
        "tree_peak_pss_mib": peaks["pss"] / 2**20,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "output": text.decode("utf-8", "replace"),
    }


def machine_facts():
    import importlib.metadata as md
    import platform

    facts = {"nproc": os.cpu_count(), "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            facts["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for pkg in ("apache-beam", "tensorflow", "annoy", "numpy", "pyarrow"):
        try:
            facts[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            facts[pkg] = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return facts


def median(values):
    values = sorted(values)
    n = len(values)
    if not n:
        return float("nan")
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict:
    """The environment for a benchmark's child: this checkout first on PYTHONPATH, TensorFlow quiet."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tiny_encoders(work, text_dim=64, image_dim=48):
    """(text, image) paths of embedding/tiny.py's encoders at these sizes under ``work``, built once (seeded:
    the same models every time) in a child process, so this process never imports TensorFlow."""
    base = os.path.join(work, f"encoders-{text_dim}-{image_dim}")
    text, image = os.path.join(base, "text"), os.path.join(base, "image")
    if not (os.path.isdir(text) and os.path.isdir(image)):
        code = ("import sys; from embedding import tiny; "
                f"tiny.build_text_encoder(sys.argv[1], dim={text_dim}, seed=0); "
                f"tiny.build_image_encoder(sys.argv[2], dim={image_dim}, seed=0)")
        subprocess.run([sys.executable, "-c", code, text, image], check=True, env=child_env(), cwd=ROOT,
                       capture_output=True)
    return text, image


def loadavg():
    """The 1, 5 and 15 minute load averages, or None off Linux."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def code_state() -> dict:
    """HEAD and the files that differ from it: the runs import the working tree, not a commit."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--untracked-files=no").splitlines()}
