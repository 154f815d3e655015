"""Loading a pipeline directory prints neither diffusers' loading bars nor
library notices, and leaves both libraries' settings as they were."""
import diffusers.utils.logging as dlog
import torch
import transformers.utils.logging as tlog

from mmh_fast.cli.loader import load_model


def test_loading_a_pipeline_directory_is_quiet_and_restores_the_settings(tmp_path, capfd):
    load_model("toy-ddpm", device=torch.device("cpu"), dtype=torch.float32).pipeline.save_pretrained(tmp_path / "p")
    capfd.readouterr()
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    assert before[0][1]  # bars on by default: the check below could otherwise not fail
    load_model(str(tmp_path / "p"), device=torch.device("cpu"), dtype=torch.float32)
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "it/s" not in err, err
    assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)] == before
