"""How a method plugs into training and the command line: TrainingHooks called by the engine, and method options
made from the fields of its config."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mlae.adapters.base import Phase, TrainingHooks, option
from mlae.adapters.lora import LoRAConfig
from mlae.recipes import METHODS, config_options
from mlae.utils import parse_bool, parse_list


# --- options from config fields ----------------------------------------------------------------------------------

def test_a_config_field_declared_with_option_is_a_method_option():
    @dataclasses.dataclass
    class Wider(LoRAConfig):  # no `method`: not registered as a config
        width: int = option(3, "how wide")
        on: bool = option(True, "switch it off")
        names: list[str] = option(["a"], "some names")
        internal: int = 5  # a plain field stays out of the options

    from mlae.adapters.base import CONFIGS

    assert CONFIGS["lora"] is LoRAConfig  # inheriting `method` does not re-register it
    options = {o.name: o for o in config_options(Wider)}
    # The class's own fields first (LoRA's, then Wider's), those of every config (target_modules) last.
    assert list(options) == ["rank", "alpha", "lora_dropout", "width", "on", "names", "target_modules"]
    width, on, names = options["width"], options["on"], options["names"]
    assert (width.type, width.default, width.help, width.cli_flag, width.flag) == (int, 3, "how wide", "--width", None)
    assert on.cli_flag == "--no-on" and on.type("off") is False  # a True default is switched off by its flag
    assert names.type("x, y z") == ["x", "y", "z"] and Wider().names == ["a"] and Wider().names is not Wider().names
    assert "width" not in {o.name for o in config_options(Wider, exclude=("width",))}
    assert {o.name: o.default for o in config_options(Wider, width=9)}["width"] == 9
    with pytest.raises(ValueError, match="no option"):
        config_options(Wider, depth=2)


def test_registered_options_keep_their_config_defaults():
    """Every option generated from a field has the field's default, except lora-dropout's documented 0.1."""
    assert METHODS["lora-dropout"].defaults()["lora_dropout"] == 0.1 and "lora_dropout" not in METHODS["lora"].defaults()
    assert METHODS["dmlora"].defaults()["alpha"] == 16.0 and METHODS["lora"].defaults()["alpha"] == 8.0
    mole = [o.name for o in METHODS["mole"].options]
    assert mole == ["experts_from", "granularity", "temperature", "balance_weight"]


def test_parsers():
    assert parse_bool("Yes") is True and parse_bool("0") is False and parse_bool(True) is True
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe")
    assert parse_list("qkv,proj") == ["qkv", "proj"] and parse_list(("a",)) == ["a"]


# --- hooks in the training loop ----------------------------------------------------------------------------------

class Recording(TrainingHooks):
    """A second phase at a quarter of the lr from the middle on, a zero weight for MLAE's KL term, a results entry
    and a figure."""

    files = ("hooked.png",)
    begun: list[int] = []

    def phases(self, total_steps, lr):
        return [Phase(total_steps // 2, lr / 4, lambda: self.begun.append(total_steps))]

    def aux_loss_weights(self):
        return {"dropout_kl": 0.0}

    def results(self):
        return {"hooked": sorted(self.options)}

    def figures(self, results):
        def draw(plt):
            fig, ax = plt.subplots()
            ax.plot([0, 1], [0, len(results["hooked"])])
            return fig

        return {"hooked.png": draw}


def test_the_engine_calls_a_methods_hooks(tmp_path, monkeypatch):
    pytest.importorskip("mlae.backbones")
    testing = pytest.importorskip("mlae.data.testing")
    from mlae.engine import TrainConfig, lr_at, train

    monkeypatch.setitem(METHODS, "hooked", dataclasses.replace(METHODS["mlae"], name="hooked", hooks=Recording))
    monkeypatch.setattr(Recording, "begun", [])
    root = tmp_path / "vtab"
    testing.make_vtab_folder(root, name="cifar", n_train=32, n_test=16, size=32)
    out = tmp_path / "run"
    results = train(TrainConfig(dataset="vtab:cifar", data_root=str(root), method="hooked", backbone="test_vit",
                                pretrained=False, img_size=32, patch_size=4, epochs=4, batch_size=16, warmup_epochs=0,
                                lr=1e-2, threads=1, progress=False, out=str(out),
                                method_options={"dropout": "auto", "dropout_learner": "variational"}))
    (total,) = Recording.begun  # the second phase began once
    per_epoch, half = total // 4, total // 2
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The lr of each epoch's last step: the first phase's cosine from 1e-2 over half the steps, then a new one from
    # 2.5e-3 over the rest.
    ends = [e * per_epoch - 1 for e in range(1, 5)]
    assert lrs == [lr_at(s, half, 0, 1e-2) if s < half else lr_at(s - half, total - half, 0, 2.5e-3) for s in ends]
    # The KL term is there (learned dropout) but weighted 0: the aux loss is exactly 0 and still recorded.
    assert all(json.loads(line)["aux_loss"] == 0.0 for line in (out / "metrics.jsonl").read_text().splitlines())
    assert results["hooked"] == sorted(METHODS["mlae"].defaults())
    assert json.loads((out / "results.json").read_text())["hooked"] == results["hooked"]
    assert (out / "hooked.png").read_bytes()[:4] == b"\x89PNG"


def test_default_hooks_do_nothing():
    hooks = TrainingHooks(torch.nn.Linear(2, 2), {})
    assert (hooks.param_groups(), hooks.phases(10, 1.0), hooks.aux_loss_weights(), hooks.distributions(),
            hooks.results(), hooks.figures({}), hooks.files) == ([], [], {}, {}, {}, {}, ())
