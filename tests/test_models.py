"""emu.models: shapes over the whole registry, pinned parameter counts, periodicity, config round trip.

All on CPU at 64², the paper UNet only for one batch-1 forward (about a second); counts and shapes of
the large model are otherwise taken on the meta device, which builds no weights.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from emu.models import (MODELS, PRESETS, CircularUpsample, DilatedResNet, UNet, count_parameters, make_model,
                        model_config)

REGISTRY = [(arch, preset) for arch in sorted(MODELS) for preset in sorted(PRESETS[arch])]

# Measured counts, (arch, preset) -> {channels in = out: parameters}. A change here is a change of
# architecture: update registry.py's table and the module docstrings with it.
PARAMETER_COUNTS = {
    ("unet", "paper"): {1: 45_820_801, 2: 45_821_954},
    ("unet", "small"): {1: 723_729, 2: 724_018},
    ("drn", "paper"): {1: 520_097, 2: 520_162},
    ("drn", "small"): {1: 131_681, 2: 131_746},
}


def _field(batch: int, channels: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("arch,preset", REGISTRY)
def test_every_registered_model_keeps_the_grid_and_gives_finite_output(arch, preset, channels):
    torch.manual_seed(0)
    model = make_model(arch, preset, channels, channels).eval()
    batch = 1 if (arch, preset) == ("unet", "paper") else 2  # the 46M model: one sample is enough
    with torch.no_grad():
        out = model(_field(batch, channels))
    assert out.shape == (batch, channels, 64, 64)
    assert torch.isfinite(out).all()


def test_in_and_out_channels_may_differ():
    for arch in MODELS:
        with torch.no_grad():
            out = make_model(arch, "small", 3, 1)(_field(2, 3, size=32))
        assert out.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("arch,preset", REGISTRY)
def test_parameter_counts_are_pinned(arch, preset):
    for channels, expected in PARAMETER_COUNTS[(arch, preset)].items():
        with torch.device("meta"):  # counts need shapes only
            model = make_model(arch, preset, channels, channels)
        assert count_parameters(model) == expected


def test_paper_counts_match_the_papers():
    unet = PARAMETER_COUNTS[("unet", "paper")][1]
    drn = PARAMETER_COUNTS[("drn", "paper")][1]
    # methods.md: ≈46M (the Thermalizer paper says 48M); within 1% of 46M and inside [40M, 55M].
    assert 40e6 <= unet <= 55e6 and abs(unet - 46e6) / 46e6 < 0.01
    # The Thermalizer paper: "about 0.5M"; within 5% of 0.5M.
    assert abs(drn - 0.5e6) / 0.5e6 < 0.05
    # The authors' code variant of the DRN (6 single-stack blocks): methods.md's ≈0.39M.
    with torch.device("meta"):
        code_drn = make_model("drn", "paper", 1, 1, num_blocks=6, stacks_per_block=1)
    assert abs(count_parameters(code_drn) - 0.39e6) / 0.39e6 < 0.01


def test_paper_unet_bottleneck_is_512_channels_at_16_squared():
    # What the Thermalizer's noise-level head expects: 512 x 16² (1x1 conv to 16 -> 4096 features).
    with torch.device("meta"):
        model = make_model("unet", "paper", 1, 1)
        bottleneck, skips = model.encode(torch.empty(3, 1, 64, 64))
    assert bottleneck.shape == (3, 512, 16, 16)
    assert model.bottleneck_channels == 512 and model.downsampling_factor == 4
    assert len(skips) == 1 + 3 * 2 + 2  # projection, 2 blocks per level, 2 downsamplings


def test_encode_then_decode_is_forward_and_leaves_skips_alone():
    torch.manual_seed(0)
    model = make_model("unet", "small", 2, 2)
    x = _field(2, 2)
    with torch.no_grad():
        bottleneck, skips = model.encode(x)
        count = len(skips)
        out = model.decode(bottleneck, skips)
        assert len(skips) == count
        assert torch.equal(out, model(x))
    assert bottleneck.shape == (2, 64, 16, 16)


@pytest.mark.parametrize("arch,shift", [("unet", (8, 16)), ("unet", (4, -12)), ("drn", (3, 5)), ("drn", (-7, 30))])
def test_translation_commutes_with_the_network(arch, shift):
    # Circular padding everywhere (upsampling included) makes the network periodic: rolling the input
    # rolls the output. The UNet's stride-2 convs allow only shifts that are multiples of 2**2 = 4.
    torch.manual_seed(0)
    model = make_model(arch, "small", 1, 1)
    x = _field(2, 1)
    with torch.no_grad():
        rolled_in = model(torch.roll(x, shift, dims=(-2, -1)))
        rolled_out = torch.roll(model(x), shift, dims=(-2, -1))
    assert rolled_out.abs().max() > 1e-2  # not a trivially small output
    assert torch.allclose(rolled_in, rolled_out, rtol=0, atol=1e-5)


def test_circular_upsample_equals_the_periodically_folded_transposed_conv():
    # Reference: the transposed conv without padding (18 x 18 from 8 x 8), its output position p
    # lands on fine cell (p - 1) mod 16 of the periodic grid (PDEArena's padding 1 crops one cell).
    torch.manual_seed(0)
    upsample = CircularUpsample(3)
    x = _field(2, 3, size=8)
    weight, bias = upsample.conv.weight, upsample.conv.bias
    with torch.no_grad():
        full = torch.nn.functional.conv_transpose2d(x, weight, stride=2)
        n = 16
        index = (torch.arange(full.shape[-1]) - 1) % n
        folded = torch.zeros(2, 3, full.shape[-2], n).index_add_(-1, index, full)
        folded = torch.zeros(2, 3, n, n).index_add_(-2, index, folded) + bias.view(1, -1, 1, 1)
        assert torch.allclose(upsample(x), folded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "resnet", "preset": "small"}, r"arch must be one of \['drn', 'unet'\]"),
    ({"arch": "unet", "preset": "huge"}, r"preset for 'unet' must be one of \['paper', 'small'\]"),
    ({"arch": "drn", "preset": "small", "widht": 3}, r"unknown 'drn' arguments \['widht'\]; allowed: .*hidden_channels"),
    ({"arch": "unet", "preset": "small", "activation": "tanh"}, r"activation must be one of \['gelu', 'relu', 'silu'\]"),
    ({"arch": "unet", "preset": "small", "channel_multipliers": ()}, r"channel_multipliers"),
    ({"arch": "drn", "preset": None, "num_blocks": 0}, r"num_blocks must be an integer >= 1"),
])
def test_bad_names_and_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(in_channels=1, out_channels=1, **kwargs)


def test_unet_refuses_a_grid_its_downsampling_cannot_halve():
    with pytest.raises(ValueError, match="multiples of 4"):
        make_model("unet", "small", 1, 1)(_field(1, 1, size=30))


@pytest.mark.parametrize("build", [
    lambda: make_model("unet", "small", 2, 2),
    lambda: make_model("drn", "small", 1, 1, dilations=(1, 3, 1)),
    lambda: UNet(1, 2, hidden_channels=8, channel_multipliers=(2, 2)),
    lambda: DilatedResNet(2, 1, hidden_channels=8, num_blocks=1, activation="silu"),
])
def test_config_round_trip_rebuilds_the_same_model(build):
    torch.manual_seed(0)
    model = build()
    config = json.loads(json.dumps(model_config(model)))  # what a checkpoint would hold
    rebuilt = make_model(**config)
    assert type(rebuilt) is type(model) and rebuilt.config == config
    assert count_parameters(rebuilt) == count_parameters(model)
    rebuilt.load_state_dict(model.state_dict())
    x = _field(2, model.in_channels, size=32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_config_records_arch_and_preset():
    assert make_model("drn", "paper", 1, 1).config["preset"] == "paper"
    assert UNet(1, 1, hidden_channels=4).config["arch"] == "unet"
    assert UNet(1, 1, hidden_channels=4).config["preset"] is None


def test_models_import_only_torch_and_themselves():
    # The learning layer never reaches into physics or data (style.md, bullet 1).
    package = Path(__file__).resolve().parents[1] / "python" / "emu" / "models"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("emu"):
                    assert name.startswith("emu.models"), f"{path.name} imports {name}"
