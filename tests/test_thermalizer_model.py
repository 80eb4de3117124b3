"""emu.models.thermalizer: shapes, the decoder-free classifier path, pinned counts, config round trip, errors.

All on CPU with the small preset at 32² and 64²; the paper preset is built once, on the meta device
(shapes only, no weights), for its parameter count.
"""

from __future__ import annotations

import json

import pytest
import torch

from emu.models import THERMALIZERS, ThermalizerUNet, count_parameters, make_model, model_config

# Measured counts, (preset, grid_size) -> {channels in = out: parameters}. A change here is a change of
# architecture: update the tables in thermalizer.py's and registry.py's docstrings with it.
PARAMETER_COUNTS = {
    ("paper", 64): {1: 53_286_817},
    ("small", 64): {1: 2_067_529, 2: 2_067_818},
    ("small", 32): {1: 1_281_097, 2: 1_281_386},
}


def _field(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _small(channels: int, grid_size: int, seed: int = 0) -> ThermalizerUNet:
    torch.manual_seed(seed)
    return make_model("thermalizer", "small", channels, channels, grid_size=grid_size).eval()


@pytest.mark.parametrize("grid_size", [32, 64])
@pytest.mark.parametrize("channels", [1, 2])
def test_forward_and_classify_shapes(channels, grid_size):
    model = _small(channels, grid_size)
    x = _field(2, channels, grid_size)
    with torch.no_grad():
        noise, logits = model(x)
        classified = model.classify(x)
    assert noise.shape == (2, channels, grid_size, grid_size)
    assert logits.shape == classified.shape == (2, 1000)
    assert torch.isfinite(noise).all() and torch.isfinite(logits).all()
    levels = model.predict_level(x)
    assert levels.dtype == torch.long and levels.shape == (2,)
    assert torch.equal(levels, logits.argmax(dim=-1))
    assert ((0 <= levels) & (levels < 1000)).all()


def test_classify_equals_the_full_networks_head_output():
    # Same weights, same bottleneck, same head: the classifier-only path is not an approximation.
    model = _small(2, 32)
    x = _field(3, 2, 32, seed=1)
    with torch.no_grad():
        assert torch.equal(model.classify(x), model(x)[1])


def test_classify_does_not_run_the_decoder():
    model = _small(1, 32)
    decoder_calls: list[str] = []
    decoder_modules = {"unet.decoder": model.unet.decoder, "unet.output": model.unet.output}
    handles = [module.register_forward_hook(lambda *_, name=name: decoder_calls.append(name))
               for prefix, root in decoder_modules.items()
               for name, module in root.named_modules(prefix=prefix)]
    x = _field(1, 1, 32)
    with torch.no_grad():
        model.classify(x)
        assert decoder_calls == []
        model(x)  # the hooks do fire on the full pass, so their silence above means something
        assert "unet.output" in decoder_calls and any(name.startswith("unet.decoder.") for name in decoder_calls)
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("preset,grid_size", sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_pinned(preset, grid_size):
    for channels, expected in PARAMETER_COUNTS[(preset, grid_size)].items():
        with torch.device("meta"):  # counts need shapes only
            model = make_model("thermalizer", preset, channels, channels, grid_size=grid_size)
        assert count_parameters(model) == expected


def test_paper_count_matches_the_paper_and_is_the_unet_plus_the_head():
    paper = PARAMETER_COUNTS[("paper", 64)][1]
    # The Thermalizer paper (appendix C) and methods.md: 53M in total.
    assert abs(paper - 53e6) / 53e6 < 0.05
    # The emulator UNet (tests/test_models.py) plus GELU, 3x3 conv 512->512, 1x1 512->16,
    # Linear 4096->1000, Linear 1000->1000.
    head = (512 * 512 * 9 + 512) + (512 * 16 + 16) + (4096 * 1000 + 1000) + (1000 * 1000 + 1000)
    assert paper == 45_820_801 + head


def test_paper_preset_has_the_papers_head():
    with torch.device("meta"):
        model = make_model("thermalizer", "paper", 1, 1, grid_size=64)
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 1000), (1000, 1000)]
    assert model.bottleneck_channels == 512 and model.downsampling_factor == 4


def test_config_round_trip_rebuilds_the_same_model():
    model = _small(2, 32)
    config = json.loads(json.dumps(model_config(model)))  # what a checkpoint would hold
    assert config["arch"] == "thermalizer" and config["preset"] == "small"
    assert config["grid_size"] == 32 and config["num_levels"] == 1000 and config["head_hidden"] == 256
    rebuilt = make_model(**config).eval()
    assert type(rebuilt) is ThermalizerUNet and rebuilt.config == config
    rebuilt.load_state_dict(model.state_dict())
    x = _field(2, 2, 32, seed=2)
    with torch.no_grad():
        for ours, theirs in zip(model(x), rebuilt(x)):
            assert torch.equal(ours, theirs)


def test_direct_construction_records_every_argument():
    model = ThermalizerUNet(1, 1, grid_size=16, num_levels=7, head_channels=2, hidden_channels=4,
                            channel_multipliers=(1, 2), middle_blocks=1, activation="silu")
    assert model.config == {
        "arch": "thermalizer", "preset": None, "in_channels": 1, "out_channels": 1, "grid_size": 16,
        "num_levels": 7, "head_hidden": None, "head_channels": 2, "hidden_channels": 4,
        "channel_multipliers": [1, 2], "blocks_per_level": 2, "middle_blocks": 1, "activation": "silu",
    }
    assert model.head[-1].out_features == 7 and model.head[-3].out_features == 7  # head_hidden None -> 7
    assert model.classify(_field(2, 1, 16)).shape == (2, 7)
    assert set(THERMALIZERS) == {"thermalizer"}


@pytest.mark.parametrize("grid_size", [30, 2, 0])
def test_grid_size_must_be_a_multiple_of_the_downsampling_factor(grid_size):
    with pytest.raises(ValueError, match=rf"grid_size must be a positive multiple of .* factor 4.*got {grid_size}"):
        make_model("thermalizer", "small", 1, 1, grid_size=grid_size)


def test_wrong_input_grid_names_both_sizes():
    model = _small(1, 32)
    x = _field(1, 1, 64)
    for call in (model, model.classify, model.predict_level):
        with pytest.raises(ValueError, match=r"input grid \(64, 64\) differs from grid_size \(32, 32\)"):
            call(x)
    with pytest.raises(ValueError, match=r"expected input \(batch, 1, 32, 32\), got \(1, 2, 32, 32\)"):
        model(_field(1, 2, 32))


def test_make_model_requires_grid_size():
    with pytest.raises(ValueError, match=r"'thermalizer' needs grid_size"):
        make_model("thermalizer", "small", 1, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_levels": 0}, r"num_levels must be an integer >= 1, got 0"),
    ({"head_hidden": 0}, r"head_hidden must be an integer >= 1, got 0"),
    ({"head_channels": 1.5}, r"head_channels must be an integer >= 1, got 1.5"),
    ({"grid_sise": 32}, r"unknown 'thermalizer' arguments \['grid_sise'\]; allowed: .*grid_size"),
])
def test_bad_head_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model("thermalizer", "small", 1, 1, **({"grid_size": 32} | kwargs))
