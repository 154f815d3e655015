"""`mmh-fast lid-data` on 512-d embedding columns at growing N: wall time, peak
memory (max RSS of the command's process) and faiss's recall@k.

Data (synthetic, clustered as embeddings are): N float32 vectors in R^512 in
N / 1000 clusters, each Gaussian on a 16-dimensional subspace plus isotropic
noise, with 1% of the rows exact copies of 100 vectors (the duplicates
lid-data exists to find), in a Parquet file with a fixed-size-list column
(row groups of 65,536).

    PYTHONPATH=. python bench/lid_data_scale.py --n 25000 50000 100000 --index exact
    PYTHONPATH=. python bench/lid_data_scale.py --n 100000 --index faiss-ivf faiss-hnsw --compare exact
    PYTHONPATH=. python bench/lid_data_scale.py --n 1000000 --index faiss-ivf

Each run prints one JSON line: n, index, seconds (wall, and per phase from
lid_data.json), peak_rss_gib, recall_at_k (faiss), and with --compare the
fraction of LIDs equal to the other index's at the same N.
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


def make_data(path: str, n: int, dim: int = 512, intrinsic: int = 16, seed: int = 0) -> None:
    """Clusters as embeddings have them: n / 1000 centres (at least 10) drawn N(0, I_512),
    each cluster Gaussian on its own random 16-dim subspace (scale 0.5) plus isotropic noise
    (0.01); the last 1% of rows are copies of 100 earlier rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.isfile(path):
        return
    g = np.random.default_rng(seed)
    n_clusters = max(10, n // 1000)
    centres = g.normal(size=(n_clusters, dim)).astype(np.float32)
    bases = np.stack([np.linalg.qr(g.normal(size=(dim, intrinsic)))[0] for _ in range(min(n_clusters, 64))])
    bases = bases.astype(np.float32)  # 64 subspaces shared round-robin by the clusters
    n_dup = n // 100
    protos = None
    schema = pa.schema([("key", pa.string()), ("emb", pa.list_(pa.float32(), dim))])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema) as w:
        for r0 in range(0, n, 65536):
            m = min(n, r0 + 65536) - r0
            c = g.integers(0, n_clusters, m)
            z = g.normal(size=(m, intrinsic)).astype(np.float32)
            x = centres[c] + 0.5 * np.einsum("mk,mdk->md", z, bases[c % len(bases)])
            x += 0.01 * g.normal(size=(m, dim)).astype(np.float32)
            if protos is None:
                protos = x[:100].copy()
            rows = np.arange(r0, r0 + m)
            dup = rows >= n - n_dup
            x[dup] = protos[rows[dup] % 100]
            keys = [f"v{r:08d}" for r in rows]
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), dim)
            w.write_table(pa.table({"key": keys, "emb": emb}, schema=schema))
    os.replace(tmp, path)


def run(data: str, out: str, index: str, k: int) -> dict:
    cmd = [sys.executable, "-m", "mmh_fast", "lid-data", "--data", data, "--out", out, "--features", "emb",
           "--k", str(k), "--index", index, "--unit-size", "65536", "--progress", "log", "--log-every", "60"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"lid-data failed:\n{r.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child so far
    with open(os.path.join(out, "lid_data.json")) as f:
        man = json.load(f)
    return {"index": index, "wall_s": round(wall, 1), "phases_s": man["seconds"],
            "peak_rss_gib": round(peak / 2**20, 2), "peak_is_this_run": peak > before,
            "recall_at_k": man["index"].get("recall_at_k"), "index_report": {
                k2: v for k2, v in man["index"].items() if k2 not in ("tuning",)},
            "tuning": man["index"].get("tuning"), "load_avg": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", required=True)
    p.add_argument("--index", nargs="+", default=["exact"])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--dir", default="/tmp/lid_data_bench")
    p.add_argument("--compare", help="an index already run at the same N: fraction of equal LIDs")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    import pyarrow.parquet as pq

    for n in a.n:
        data = os.path.join(a.dir, f"emb_{n}.parquet")
        make_data(data, n)
        for index in a.index:
            out = os.path.join(a.dir, f"out_{n}_{index}")
            res = {"n": n, "dim": 512, "k": a.k, **run(data, out, index, a.k)}
            if a.compare:
                other = os.path.join(a.dir, f"out_{n}_{a.compare}", "lid_data.parquet")
                x = pq.read_table(os.path.join(out, "lid_data.parquet")).column("lid_data").to_numpy()
                y = pq.read_table(other).column("lid_data").to_numpy()
                res[f"equal_lids_vs_{a.compare}"] = float((x == y).mean())
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
