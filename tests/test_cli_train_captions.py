"""`mmh-fast train --captions`: a caption-conditioned StableDiffusionPipeline trained with the lab's code."""
import json
import os

import numpy as np
import pytest
import torch

from mmh_fast.cli import main

CAPTIONS = ["A red square.", "a blue circle", "Green stripe, thin", "a dark cross", "bright dot on gray",
            "a red circle"]
WORDS = [["a", "red", "square", "."], ["a", "blue", "circle"], ["green", "stripe", ",", "thin"],
         ["a", "dark", "cross"], ["bright", "dot", "on", "gray"], ["a", "red", "circle"]]  # by hand
ARGS = ["--captions", "--image-size", "16", "--batch-size", "8", "--vae-steps", "20", "--quiet"]


def _images(n=6, size=16, seed=0):
    """Flat-coloured 16 x 16 images, each with a bar of another colour at its own place."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[...] = rng.integers(0, 255, 3)
        a[4:12, 2 + i:6 + i] = rng.integers(0, 255, 3)
        out.append(a)
    return out


def _folder(root, captions=CAPTIONS):
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    for i, (a, c) in enumerate(zip(_images(len(captions)), captions)):
        Image.fromarray(a).save(os.path.join(root, f"im{i}.png"))
        if c is not None:
            with open(os.path.join(root, f"im{i}.txt"), "w") as f:
                f.write(c)
    return str(root)


def _parquet(path, captions=CAPTIONS):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    pngs = []
    for a in _images(len(captions)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"key": [f"im{i}" for i in range(len(captions))], "image": pngs,
                             "label_text": captions}), path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One model for the tests that read it: 400 joint steps on the 6 captioned images (~25 s on 1 thread)."""
    root = tmp_path_factory.mktemp("captions")
    data = _folder(root / "imgs")
    out = root / "model"
    assert main(["train", "--data", data, "--out", str(out), "--steps", "400", *ARGS]) == 0
    return data, out


def _pipe(out):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_caption_words_split_as_clip_does():
    from mmh_fast.cli.train import caption_words

    assert caption_words(CAPTIONS) == WORDS


def test_saved_pipeline_loads_with_diffusers_and_generates(trained):
    _, out = trained
    pipe = _pipe(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scheduler"][1] == "DDIMScheduler"
    img = pipe("a red square", num_inference_steps=3, height=16, width=16, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
    info = json.loads((out / "train.json").read_text())
    assert info["captioned"] and info["images"] == 6 and info["lab_config"]["image_size"] == 16


def test_tokenizer_makes_each_caption_word_one_token(trained):
    _, out = trained
    tok = _pipe(out).tokenizer
    for cap, words in zip(CAPTIONS, WORDS):
        for w in words:
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
        ids = tok(cap).input_ids
        assert len(ids) == len(words) + 2  # bos, one id per word, eos
    # the text encoder's positions cover the longest caption (4 words + 2 specials)
    assert tok.model_max_length == 6


def test_caption_vocabulary_resolves_merge_collisions():
    """In the longest-first order 'cats' and 'scat' are cut by the merge 'a t' of 'attic' (it ranks
    before their own 'c a'): the order found must make every word one token (a fresh tokenizer)."""
    import tempfile

    from mmh_fast.cli.train import caption_vocabulary
    from mmh_fast.lab.data import write_tokenizer

    words = ["cats", "attic", "scat", "tics", "stat", "tat"]
    with tempfile.TemporaryDirectory() as d:
        _, bad = write_tokenizer(d, sorted(words, key=lambda w: (-len(w), w)), 16)
    assert bad == ["cats", "scat"]  # the collision this test is about exists
    order = caption_vocabulary(words)
    assert sorted(order) == sorted(words)
    with tempfile.TemporaryDirectory() as d:
        tok, bad = write_tokenizer(d, order, 16)
    assert bad == [] and all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)


def test_model_learned_the_training_set_and_its_captions(trained):
    """Value-level: on the training images, with noise and times fixed, the trained model's
    epsilon-prediction error is far below the same networks at their initial weights (the
    lab's make_* at the seeds _train uses), and below its error when each image is given
    another image's caption (the text conditioning carries information about the image).

    Measured on this CPU: trained 0.093, initial 1.145, captions shuffled 0.112. Bounds: half
    the initial error (an untrained model sits at ~1, the variance of eps); shuffled captions
    5% above the right ones (measured 20% above; equal for a model that ignores its captions)."""
    from PIL import Image

    from mmh_fast.lab.training import LabConfig, make_text_encoder, make_unet, train_scheduler

    data, out = trained
    pipe = _pipe(out)
    info = json.loads((out / "train.json").read_text())
    cfg = LabConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["lab_config"].items()})
    x = torch.from_numpy(np.stack([np.asarray(Image.open(os.path.join(data, f"im{i}.png"))) for i in range(6)]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    acp = train_scheduler().alphas_cumprod.float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=cfg.max_length,
                             return_tensors="pt").input_ids
        t = torch.randint(0, len(acp), (16, 6), generator=g)
        eps = torch.randn((16,) + lat.shape, generator=g)

        def err(unet, text, ids):
            h = text(ids)[0]
            out = []
            for r in range(len(t)):
                a = acp[t[r]].view(-1, 1, 1, 1)
                out.append((unet(a.sqrt() * lat + (1 - a).sqrt() * eps[r], t[r],
                                 encoder_hidden_states=h).sample - eps[r]).pow(2).mean())
            return float(torch.stack(out).mean())

        trained_err = err(pipe.unet, pipe.text_encoder, ids)
        seed = info["settings"]["seed"]
        initial_err = err(make_unet(cfg, seed + 3), make_text_encoder(cfg, pipe.tokenizer, seed + 2), ids)
        shuffled_err = err(pipe.unet, pipe.text_encoder, ids[[1, 2, 3, 4, 5, 0]])
    assert trained_err < 0.5 * initial_err
    assert shuffled_err > 1.05 * trained_err
    curve = [v for _, v in info["loss_curve"]]
    assert curve[-1] < 0.5 * curve[0]


def test_training_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    data = _parquet(tmp_path / "d.parquet")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["train", "--data", data, "--out", str(tmp_path / name), "--steps", "15", "--seed", str(seed),
                     "--caption-column", "label_text", *ARGS]) == 0
        runs[name] = {c: load_file(str(tmp_path / name / c / "diffusion_pytorch_model.safetensors"))
                      for c in ("unet", "vae")}
    for comp in ("unet", "vae"):
        assert runs["a"][comp].keys() == runs["b"][comp].keys()
        assert all(torch.equal(runs["a"][comp][k], runs["b"][comp][k]) for k in runs["a"][comp])
        # another seed trains other weights (so the equality above is not vacuous)
        assert not all(torch.equal(runs["a"][comp][k], runs["c"][comp][k]) for k in runs["a"][comp])


def test_scan_runs_a_caption_metric_on_the_trained_model(trained, tmp_path):
    import pyarrow.parquet as pq

    data, out = trained
    assert main(["scan", "--model", str(out), "--data", data, "--out", str(tmp_path / "scan"),
                 "--metrics", "cfg_norm_train", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    t = pq.read_table(tmp_path / "scan" / "results.parquet").to_pydict()
    assert sorted(t["caption"]) == sorted(CAPTIONS)
    v = np.asarray(t["cfg_norm_train"], float)
    assert len(v) == 6 and np.isfinite(v).all() and (v > 0).all() and all(e is None for e in t["error"])


def test_bad_input_errors_name_the_argument(tmp_path, capsys):
    def run(data, *extra):
        rc = main(["train", "--data", data, "--out", str(tmp_path / "m"), "--steps", "1", *ARGS, *extra])
        return rc, capsys.readouterr().err

    no_caps = _folder(tmp_path / "nocap", captions=[None] * 3)
    rc, err = run(no_caps)
    assert rc == 2 and "--captions: 3 of 3 images" in err and "no or an empty caption" in err
    empty = _folder(tmp_path / "empty", captions=["a red square", "  ", "a dot"])
    rc, err = run(empty)
    assert rc == 2 and "1 of 3 images" in err and "im1.png" in err
    rc, err = run(_parquet(tmp_path / "d.parquet"), "--caption-column", "nope")
    assert rc == 2 and "nope" in err
    rc, err = run(_folder(tmp_path / "accent", captions=["un café", "a dot"]))
    assert rc == 2 and "caf" in err and "non-ASCII" in err
    ok = _folder(tmp_path / "ok", captions=["a dot", "a bar"])
    rc, err = run(ok, "--arch", "mlp")
    assert rc == 2 and "--arch mlp" in err
    rc, err = run(ok, "--image-size", "12")
    assert rc == 2 and "--image-size a multiple of 8" in err
    rc, err = run(ok, "--width", "48")
    assert rc == 2 and "--width a multiple of 32" in err
    rc, err = run(ok, "--t-power", "1.5")
    assert rc == 2 and "--t-power" in err
    rc = main(["train", "--data", ok, "--out", str(tmp_path / "m"), "--caption-column", "text", "--steps", "1",
               "--quiet"])
    assert rc == 2 and "--caption-column needs --captions" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m" / "model_index.json")
