"""The paper's von Mises experiment (Fig. 4): DD-Mem at the point mass,
OD-Mem at the isolated training point, LID 1 along the circle."""
import importlib.util
import pathlib

import pytest
import torch

from mmh_fast.models.sampling import ddim_sample

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "von_mises.py"


def _example():
    spec = importlib.util.spec_from_file_location("von_mises_example", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny networks: see conftest


def _check(res, vm, *, n_iso_min: int):
    lid, lab = res["flipd"], res["sample_labels"]
    origin, circle, iso = lid[lab == vm.ORIGIN], lid[lab == vm.CIRCLE], lid[lab == vm.ISOLATED]
    assert origin.numel() > 20 and circle.numel() > 100 and iso.numel() >= n_iso_min
    med = lambda v: float(v.median())  # noqa: E731
    assert abs(med(origin)) < 0.5, med(origin)                       # DD-Mem: LID_* = LID_theta = 0
    assert 0.7 < med(circle) < 1.3, med(circle)                      # LID 1 on the circle
    # OD-Mem: the isolated training point (LID_* = 1) is learned as a point mass
    iso_train = float(res["flipd_train"][res["labels"] == vm.ISOLATED][0])
    assert iso_train < 0.5 and iso_train < med(circle) - 0.5, iso_train
    if iso.numel():
        assert med(iso) < 0.5 and med(iso) < med(circle) - 0.5, med(iso)


def test_von_mises_ordering_short_training():
    vm = _example()
    X, labels, iso = vm.make_data()
    assert X.shape == (100, 2) and int((labels == vm.ISOLATED).sum()) == 1
    assert torch.allclose(X[labels == vm.CIRCLE].norm(dim=1), torch.ones(1), atol=1e-6)
    res = vm.run(steps=800, lr=3e-3, n_samples=600, num_steps=50, verbose=False)
    _check(res, vm, n_iso_min=0)
    # the samples do not depend on how many are drawn (per-sample noise keys)
    again = ddim_sample(res["model"], 5, sample_shape=(2,), scheduler=res["scheduler"], num_steps=50, seed=0)
    torch.testing.assert_close(again, res["samples"][:5])


@pytest.mark.slow
def test_von_mises_script_full(tmp_path):
    vm = _example()
    out = tmp_path / "vm.png"
    res = vm.run(n_samples=1000, verbose=False)  # the script's defaults
    _check(res, vm, n_iso_min=1)
    vm.plot(res, str(out))
    assert out.stat().st_size > 10_000
