"""`mmh-fast lid-data` on 512-d embedding columns at growing N: wall time, peak
memory (max RSS of the command's process), faiss's recall@k, where the time
goes, and the LIDs against the known truth.

Data (synthetic, a known-LID mixture clustered as embeddings are): N float32
vectors in R^512 in N / 1000 clusters, cluster c Gaussian on its own random
affine subspace of dimension (2, 4, 8, 16, 32)[c % 5] plus isotropic noise,
with 1% of the rows exact copies of 100 rows (the duplicates lid-data exists
to find: true LID 0), in a Parquet file with a fixed-size-list column and a
true_dim column (row groups of 65,536).

    PYTHONPATH=. python bench/lid_data_scale.py --n 10000 100000 --index exact
    PYTHONPATH=. python bench/lid_data_scale.py --n 100000 --index faiss-ivf faiss-hnsw --compare exact
    PYTHONPATH=. python bench/lid_data_scale.py --n 1000000 --index faiss-ivf --threads 2
    PYTHONPATH=. python bench/lid_data_scale.py --n 10000 --index exact --rule fo   # LIDs = true dims

Each run prints one JSON line: n, index, rule, threads, seconds (wall, and per
phase from lid_data.json; the index report splits the neighbour phase into
search and local PCA), peak_rss_gib, recall_at_k (faiss), the median LID_*
per true dimension and the fraction of copies at LID_* 0, and with --compare
the fraction of LIDs equal to the other index's at the same N and rule.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: intrinsic dimensions of the clusters, round robin: the truth the LIDs are checked against
DIMS = (2, 4, 8, 16, 32)


def make_data(path: str, n: int, dim: int = 512, seed: int = 0) -> None:
    """A known-LID mixture, clustered as embeddings are: n / 1000 clusters (at least 10),
    centres drawn N(0, I_512); cluster c is Gaussian (scale 0.5) on its own random affine
    subspace of dimension DIMS[c % 5], plus isotropic noise (0.01) in all 512 directions;
    the last 1% of rows are exact copies of the first 100 rows (point masses: true LID 0).
    Columns: key, emb (fixed-size list of 512 float32), true_dim (int, 0 for the copies)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path):
        return
    g = np.random.default_rng(seed)
    n_clusters = max(10, n // 1000)
    centres = g.normal(size=(n_clusters, dim)).astype(np.float32)
    bases = [np.linalg.qr(g.normal(size=(dim, DIMS[c % len(DIMS)])))[0].astype(np.float32)
             for c in range(n_clusters)]
    n_dup = n // 100
    protos = None
    schema = pa.schema([("key", pa.string()), ("emb", pa.list_(pa.float32(), dim)), ("true_dim", pa.int64())])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema) as w:
        for r0 in range(0, n, 65536):
            m = min(n, r0 + 65536) - r0
            c = g.integers(0, n_clusters, m)
            x = centres[c] + 0.01 * g.normal(size=(m, dim)).astype(np.float32)
            for cl in np.unique(c):
                at = np.flatnonzero(c == cl)
                z = g.normal(size=(len(at), bases[cl].shape[1])).astype(np.float32)
                x[at] += 0.5 * z @ bases[cl].T
            true_dim = np.array([DIMS[cl % len(DIMS)] for cl in c], np.int64)
            if protos is None:
                protos = x[:100].copy()
            rows = np.arange(r0, r0 + m)
            dup = rows >= n - n_dup
            x[dup] = protos[rows[dup] % 100]
            true_dim[dup] = 0
            # the prototypes' own rows are point masses too (they have copies)
            true_dim[rows < 100] = 0
            keys = [f"v{r:08d}" for r in rows]
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), dim)
            w.write_table(pa.table({"key": keys, "emb": emb, "true_dim": true_dim}, schema=schema))
    os.replace(tmp, path)


def sanity(data: str, out: str) -> dict:
    """Median LID_* per true dimension, and the fraction of point masses (copies) at LID 0."""
    import pyarrow.parquet as pq

    truth = pq.read_table(data, columns=["true_dim"]).column("true_dim").to_numpy()
    lid = pq.read_table(os.path.join(out, "lid_data.parquet")).column("lid_data").to_numpy()
    res = {f"median_lid_dim{d}": float(np.median(lid[truth == d])) for d in DIMS}
    res["copies_at_lid0"] = float((lid[truth == 0] == 0).mean())
    return res


def run(data: str, out: str, index: str, k: int, rule: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "mmh_fast", "lid-data", "--data", data, "--out", out, "--features", "emb",
           "--k", str(k), "--rule", rule, "--index", index, "--unit-size", "65536", "--progress", "log",
           "--log-every", "60"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # the command's progress log goes to OUT.log as it runs (a long run can be watched)
    with open(out.rstrip("/") + ".log", "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"lid-data failed: see {out.rstrip('/')}.log")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    with open(os.path.join(out, "lid_data.json")) as f:
        man = json.load(f)
    return {"index": index, "rule": rule, "threads": threads, "wall_s": round(wall, 1),
            "phases_s": man["seconds"], "peak_rss_gib": round(peak / 2**20, 2), "peak_is_this_run": peak > before,
            "recall_at_k": man["index"].get("recall_at_k"), "index_report": {
                k2: v for k2, v in man["index"].items() if k2 not in ("tuning",)},
            "tuning": man["index"].get("tuning"), "load_avg": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", required=True)
    p.add_argument("--index", nargs="+", default=["exact"])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--rule", default="paper")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the lid-data process")
    p.add_argument("--dir", default="/tmp/lid_data_bench")
    p.add_argument("--compare", help="an index already run at the same N and rule: fraction of equal LIDs")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    import pyarrow.parquet as pq

    for n in a.n:
        data = os.path.join(a.dir, f"emb_{n}.parquet")
        make_data(data, n)
        for index in a.index:
            out = os.path.join(a.dir, f"out_{n}_{index}_{a.rule}")
            res = {"n": n, "dim": 512, "k": a.k, **run(data, out, index, a.k, a.rule, a.threads),
                   **sanity(data, out)}
            if a.compare:
                other = os.path.join(a.dir, f"out_{n}_{a.compare}_{a.rule}", "lid_data.parquet")
                x = pq.read_table(os.path.join(out, "lid_data.parquet")).column("lid_data").to_numpy()
                y = pq.read_table(other).column("lid_data").to_numpy()
                res[f"equal_lids_vs_{a.compare}"] = float((x == y).mean())
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
