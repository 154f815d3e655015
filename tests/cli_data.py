"""Small data sets for the CLI tests: a folder, tar shards and tables of 32x32 images."""
import io
import os
import tarfile

import numpy as np
from PIL import Image

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_plugin.py")


def make_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    imgs = []
    for i in range(n):
        # smooth random images (low-frequency noise) so PNG/JPEG behave like photos
        base = rng.normal(size=(4, 4, 3))
        img = np.kron(base, np.ones((size // 4, size // 4, 1))) + 0.3 * rng.normal(size=(size, size, 3))
        imgs.append(np.clip(127.5 + 40 * img, 0, 255).astype(np.uint8))
    return imgs


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, n=12, corrupt=(), truncated=(), captions=True, seed=0):
    """img000.png ... with captions 'caption i'; `corrupt` indices get garbage bytes,
    `truncated` ones a cut-off PNG. Returns {key: array} of the readable images."""
    os.makedirs(root, exist_ok=True)
    imgs = make_images(n, seed=seed)
    good = {}
    for i, arr in enumerate(imgs):
        name = f"img{i:03d}.png"
        data = png_bytes(arr)
        if i in corrupt:
            data = b"this is not an image"
        elif i in truncated:
            data = data[: len(data) // 2]
        else:
            good[name] = arr
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        if captions:
            with open(os.path.join(root, f"img{i:03d}.txt"), "w") as f:
                f.write(f"caption {i}\n")
    return good


def make_shards(root, n_shards=2, per_shard=5, seed=0):
    """img2dataset-style shards root/{00000..}.tar with KEY.png, KEY.txt, KEY.json."""
    os.makedirs(root, exist_ok=True)
    imgs = make_images(n_shards * per_shard, seed=seed)
    good = {}
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tf:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:05d}{j:04d}"
                members = {f"{key}.png": png_bytes(imgs[i]), f"{key}.txt": f"caption {i}".encode(),
                           f"{key}.json": b'{"url": "x"}'}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                good[key] = imgs[i]
    return good


def make_table(path, n=10, mode="bytes", seed=0):
    """A Parquet (mode 'bytes': image bytes column) or CSV (mode 'path': image paths
    relative to the table) table with key and caption columns."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    imgs = make_images(n, seed=seed)
    keys = [f"k{i:04d}" for i in range(n)]
    caps = [f"caption {i}" for i in range(n)]
    if mode == "bytes":
        t = pa.table({"key": keys, "image": [png_bytes(a) for a in imgs], "caption": caps})
        pq.write_table(t, path, row_group_size=4)
    else:
        d = os.path.dirname(path)
        os.makedirs(os.path.join(d, "files"), exist_ok=True)
        rel = []
        for i, a in enumerate(imgs):
            rel.append(f"files/{i}.png")
            with open(os.path.join(d, rel[-1]), "wb") as f:
                f.write(png_bytes(a))
        pcsv.write_csv(pa.table({"id": keys, "path": rel, "text": caps}), path)
    return dict(zip(keys, imgs))
