"""Where the encode stage's memory goes: a census at 25 % and 75 % of the items fused (issue 9).

    python benchmarks/heap_census.py N [IMAGE_POOL] [WORKDIR]      # e.g. 40000 1000 /tmp/census

Runs ``catalog-index index`` in this process (DirectRunner, tiny encoders, 16 shards, --no-reuse) on
bench_memory.py's seeded catalog of N items and, when the fused-item count crosses each mark, prints
RSS (/proc/self/smaps_rollup: anonymous vs file pages), glibc's arenas (malloc_info), pymalloc's arena
count, Arrow's live bytes, and the Python objects by type (a walk from gc.get_objects through their
referents). At the end, the difference between the marks per item. A profiling aid, not a benchmark:
the census itself takes seconds and the run is slower than bench_memory's. Linux and glibc only.
It found that Arrow's mimalloc pool kept what bundle threads freed (files.use_system_memory_pool).
"""
import collections, ctypes, gc, os, sys, tempfile, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.dirname(HERE))
import bench_memory as bm, _measure  # noqa: E402,E401
N = int(sys.argv[1]); pool = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
work = sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp(prefix="heap-census-")
if not os.path.exists(f'{work}/catalog-{N}'):
    cat = bm.make_catalog(work, bm.Items(N, 0), N, 4, pool)
text, image = _measure.tiny_encoders(work, 64, 48)
import pyarrow as pa
from pipelines import transforms as T, index_pipeline

class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI

def rollup():
    out = {}
    for line in open('/proc/self/smaps_rollup'):
        p = line.split()
        if len(p) >= 3 and p[-1] == 'kB': out[p[0].rstrip(':')] = int(p[1]) / 1024
    return {k: out.get(k, 0) for k in ('Rss', 'Anonymous', 'Rss_File' if 'Rss_File' in out else 'RssFile', 'Pss_File', 'Pss_Anon')}

def minfo():
    import re, tempfile
    libc.fopen.restype = ctypes.c_void_p
    path = tempfile.mktemp()
    f = libc.fopen(path.encode(), b"w"); libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
    x = open(path).read(); os.unlink(path)
    tail = x[x.rfind('</heap>'):]
    cur = re.search(r'<system type="current" size="(\d+)"', tail); fast = re.search(r'<total type="fast" count="\d+" size="(\d+)"', tail)
    rest = re.search(r'<total type="rest" count="\d+" size="(\d+)"', tail); mm = re.search(r'<total type="mmap" count="\d+" size="(\d+)"', tail)
    return dict(arenas=x.count('<heap nr='), system=int(cur.group(1)) / 2**20, free_fast=int(fast.group(1)) / 2**20, free_rest=int(rest.group(1)) / 2**20, mmap=int(mm.group(1)) / 2**20)

def pymalloc():
    import re, tempfile
    path = tempfile.mktemp(); fd = os.open(path, os.O_WRONLY | os.O_CREAT); saved = os.dup(2); os.dup2(fd, 2)
    try: sys._debugmallocstats()
    finally: os.dup2(saved, 2); os.close(saved); os.close(fd)
    x = open(path).read(); os.unlink(path)
    cur = re.search(r'# arenas allocated current\s*=\s*([\d,]+)', x)
    return int(cur.group(1).replace(',', '')) if cur else -1

def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

def census():
    gc.collect()
    seen = set(); cnt = collections.Counter(); size = collections.Counter()
    objs = gc.get_objects()
    stack = list(objs)
    while stack:
        o = stack.pop()
        i = id(o)
        if i in seen: continue
        seen.add(i)
        t = type(o); k = f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', t.__name__)}"
        cnt[k] += 1
        try: size[k] += sys.getsizeof(o)
        except Exception: pass
        if not gc.is_tracked(o): continue
        for r in gc.get_referents(o):
            if id(r) not in seen and not gc.is_tracked(r): stack.append(r)
    del objs, stack, seen
    return cnt, size

snaps = {}
count = [0]; marks = [int(N * f) for f in (0.25, 0.75)]
orig = T._Fuse.process
def process(self, batch):
    yield from orig(self, batch)
    count[0] += len(batch)
    for m in marks:
        if count[0] >= m and m not in snaps:
            t = time.time(); c, s = census(); mi = libc.mallinfo2()
            snaps[m] = dict(rss=rss(), cnt=c, size=s, pa=pa.total_allocated_bytes() / 2**20,
                            heap_used=mi.uordblks / 2**20, heap_free=mi.fordblks / 2**20, mmap=mi.hblkhd / 2**20, roll=rollup(), mi=minfo(), arenas=pymalloc())
            print("   ", snaps[m]['roll'], snaps[m]['mi'], 'pymalloc arenas', snaps[m]['arenas'], flush=True)
            print(f"SNAP {m}: rss {snaps[m]['rss']:.0f} MiB pa {snaps[m]['pa']:.1f} heap used {snaps[m]['heap_used']:.0f} free {snaps[m]['heap_free']:.0f} mmap {snaps[m]['mmap']:.0f} ({time.time()-t:.1f}s)", flush=True)
T._Fuse.process = process
out = f'{work}/out-{N}'
import shutil; shutil.rmtree(out, ignore_errors=True)
index_pipeline.run(['--catalog', f'{work}/catalog-{N}/part-*.parquet', '--output', out, '--text-encoder', text,
                    '--image-encoder', image, '--shards', '16', '--dimension', '256', '--runner', 'DirectRunner',
                    '--no-reuse', '--min-recall', '0'])
a, b = (snaps[m] for m in marks)
items = marks[1] - marks[0]
print(f"between marks ({items} items): rss {b['rss']-a['rss']:+.0f} MiB = {(b['rss']-a['rss'])*1024/items:.2f} KiB/item; "
      f"pa {b['pa']-a['pa']:+.1f}; heap used {b['heap_used']-a['heap_used']:+.0f} free {b['heap_free']-a['heap_free']:+.0f} mmap {b['mmap']-a['mmap']:+.0f}")
rows = []
for k in set(a['size']) | set(b['size']):
    rows.append((b['size'][k] - a['size'][k], b['cnt'][k] - a['cnt'][k], k))
rows.sort(reverse=True)
for ds, dc, k in rows[:25]:
    print(f"{ds/2**20:10.2f} MiB {dc:+10d} objs  {ds/items:8.1f} B/item  {k}")
print({k: round(b['roll'][k] - a['roll'][k], 1) for k in a['roll']}, {k: round(b['mi'][k] - a['mi'][k], 1) for k in a['mi']})
print("total python size delta:", sum(r[0] for r in rows) / 2**20, "MiB")
