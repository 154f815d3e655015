"""`mmh-fast train` and the sampling weights of `train_denoiser`."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from mmh_fast.cli import main
from mmh_fast.models.training import train_denoiser

from cli_data import make_folder


class _Recorder(nn.Module):
    """Predicts 0 and records the noised inputs it is trained on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, sample, timestep, return_dict=True):
        self.seen.append(sample.detach().clone())
        return (sample * self.w,)


def test_weights_set_how_often_each_point_is_drawn():
    from diffusers import DDPMScheduler

    data = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    weights = [1.0, 0.0, 3.0, 4.0]
    m = _Recorder()
    # t_power 1000: t = t_min + (1 - t_min) u^1000 is ~t_min for 99.5% of draws, where the noise
    # (sigma ~ 0.03) cannot move a point 5 units: each draw's point is its nearest
    train_denoiser(m, data, scheduler=DDPMScheduler(), steps=40, batch_size=250, t_power=1000.0, weights=weights)
    x = torch.cat(m.seen).reshape(-1)
    idx = torch.argmin((x[:, None] - data.reshape(1, -1)).abs(), dim=1)
    freq = torch.bincount(idx, minlength=4).double() / len(idx)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    # 10,000 draws: 4 binomial standard deviations (<= 0.02), plus the 0.5% of draws at large t
    assert torch.allclose(freq, p, atol=4 * float((p * (1 - p) / len(idx)).sqrt().max()) + 0.005), freq
    assert freq[1] < 0.005  # weight 0: never drawn but for a large-t draw misread
    with pytest.raises(ValueError, match="one value per training point"):
        train_denoiser(_Recorder(), data, steps=1, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        train_denoiser(_Recorder(), data, steps=1, weights=[1.0, -1.0, 1.0, 1.0])


def test_train_unet_saves_a_pipeline_that_scan_uses(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=4, captions=False)
    out = tmp_path / "model"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(out), "--image-size", "8", "--steps", "150",
                 "--batch-size", "16", "--width", "8", "--lr", "3e-3", "--quiet"]) == 0
    info = json.loads((out / "train.json").read_text())
    assert info["images"] == 4 and info["settings"]["arch"] == "unet"
    # the network learns: the loss of the last 15 steps against that of the first 50 (already
    # falling) measured 0.747 -> 0.397 (x 0.53) on this CPU; a network that does not learn stays at
    # its first loss, so the bound x 0.75 leaves room for another platform, not for no training
    assert info["final_loss"] < 0.75 * info["first_loss"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert main(["scan", "--model", str(out), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "scan"),
                 "--metrics", "flipd", "--workers", "0", "--quiet"]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "scan" / "results.parquet").to_pydict()
    assert len(t["flipd"]) == 4 and all(np.isfinite(t["flipd"]))
    # a second run into the same folder must be asked for
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(out), "--steps", "1", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_train_bad_weights(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=3, captions=False)
    (tmp_path / "w.csv").write_text("key,weight\nimg000,5\n")
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "m"), "--weights",
                 str(tmp_path / "w.csv"), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no key matches" in err and "weights keys: img000;" in err and "data keys: img000.png" in err
    (tmp_path / "w2.csv").write_text("key,weight\nimg000.png,-1\n")
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "m"), "--weights",
                 str(tmp_path / "w2.csv"), "--steps", "1", "--quiet"]) == 2
    assert "expected a finite number >= 0" in capsys.readouterr().err


def test_load_weights_maps_keys_and_defaults_to_one(tmp_path):
    """Listed keys get their weight, unlisted ones 1, in the order of ``keys``; the first
    two columns serve when 'key'/'weight' are not named; a NaN weight is refused by name."""
    from mmh_fast.cli.errors import UserError
    from mmh_fast.cli.train import load_weights

    (tmp_path / "w.csv").write_text("key,weight\nb.png,3\nc.png,0\nzz.png,7\n")
    np.testing.assert_array_equal(load_weights(str(tmp_path / "w.csv"), ["a.png", "b.png", "c.png"]), [1.0, 3.0, 0.0])
    (tmp_path / "w2.csv").write_text("name,w\na.png,2.5\n")
    np.testing.assert_array_equal(load_weights(str(tmp_path / "w2.csv"), ["b.png", "a.png"]), [1.0, 2.5])
    (tmp_path / "w3.csv").write_text("key,weight\na.png,nan\n")
    with pytest.raises(UserError, match=r"--weights .*expected a (finite )?number >= 0"):
        load_weights(str(tmp_path / "w3.csv"), ["a.png"])
