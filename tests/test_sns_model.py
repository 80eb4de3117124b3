"""emu.models.sns (and the UNet's attention and decoder biases): counts, shapes, heads, conditioning, errors.

All on CPU with the small preset at 32² (or smaller networks built directly at 16²); the paper preset
is built on the meta device (shapes only, no weights) for its parameter count. The paper preset has
74,814,610 parameters against the SNS paper's 73,727,522 (1.5% more; emu.models.sns says where
the readings differ).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from emu.models import (SNS_NETWORKS, ResidualBlock, SelfAttention2d, SNSOutput, SNSUNet, UNet, count_parameters,
                        make_model, model_config)

# Measured counts, (preset, grid_size, channels, anchor) -> parameters. A change here is a change of
# architecture: update the tables in sns.py's and registry.py's docstrings with it.
PARAMETER_COUNTS = {
    ("paper", 64, 1, True): 74_814_610,
    ("small", 32, 1, True): 2_669_874,
    ("small", 32, 2, True): 2_670_596,
    ("small", 32, 2, False): 2_670_308,
}
PAPER_COUNT = 73_727_522  # the SNS paper's appendix


def _field(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _small(channels: int = 1, anchor: bool = True, seed: int = 0) -> SNSUNet:
    torch.manual_seed(seed)
    return make_model("sns", "small", channels, channels, grid_size=32, anchor=anchor).eval()


def _tiny(seed: int = 0, **kwargs) -> SNSUNet:
    """Two levels of width 8 and 16 at 16², num_levels 5: for the gradient and bias tests."""
    torch.manual_seed(seed)
    arguments = dict(grid_size=16, num_levels=5, head_channels=2, condition_hidden=6, hidden_channels=8,
                     channel_multipliers=(1, 2), blocks_per_level=1, middle_blocks=1) | kwargs
    return SNSUNet(1, **arguments)


@pytest.mark.parametrize("key", sorted(PARAMETER_COUNTS))
def test_parameter_counts_are_pinned(key):
    preset, grid_size, channels, anchor = key
    with torch.device("meta"):  # counts need shapes only
        model = make_model("sns", preset, channels, channels, grid_size=grid_size, anchor=anchor)
    assert count_parameters(model) == PARAMETER_COUNTS[key]


def test_paper_count_is_near_the_papers_and_decomposes_into_its_parts():
    paper = PARAMETER_COUNTS[("paper", 64, 1, True)]
    assert abs(paper - PAPER_COUNT) / PAPER_COUNT < 0.02
    with torch.device("meta"):
        model = make_model("sns", "paper", 1, 1, grid_size=64)
        backbone = UNet(3, 2, attention=True, attention_heads=4)
    # The backbone: the paper UNet with 3 -> 2 channels plus 4C² + 6C per attended 16² block.
    assert count_parameters(model.unet) == count_parameters(backbone) == count_parameters(UNet(3, 2)) + 6_573_568
    assert 6_573_568 == 6 * (4 * 512**2 + 6 * 512) + (4 * 256**2 + 6 * 256)
    # Two Thermalizer heads (tests/test_thermalizer_model.py: the same arithmetic for one).
    head = (512 * 512 * 9 + 512) + (512 * 16 + 16) + (4096 * 1000 + 1000) + (1000 * 1000 + 1000)
    # MLP over both softmaxes, then one Linear(1000 -> 2w) per decoder block.
    widths = [512, 512, 256, 256, 256, 128, 128, 128, 64]
    assert model.unet.decoder_block_widths() == widths
    condition = (2000 * 1000 + 1000) + (1000 * 1000 + 1000) + sum(1000 * 2 * w + 2 * w for w in widths)
    assert paper == count_parameters(backbone) + 2 * head + condition


def test_attention_sits_at_the_coarsest_level_only():
    with torch.device("meta"):
        unet = UNet(1, 1, attention=True)
    attended = [module for module in unet.modules() if isinstance(module, ResidualBlock) and module.attention is not None]
    # 2 encoder blocks of the last level, 2 middle blocks, 3 decoder blocks of the 16² level.
    assert len(attended) == 7
    assert [block.attention.channels for block in attended] == [512] * 6 + [256]
    assert unet.config["attention"] is True and unet.config["attention_heads"] == 4
    assert all(block.attention is None for block in UNet(1, 1, hidden_channels=4).modules()
               if isinstance(block, ResidualBlock))


def test_self_attention_is_the_textbook_formula():
    torch.manual_seed(0)
    attention = SelfAttention2d(8, heads=2)
    x = _field(2, 8, 4)
    with torch.no_grad():
        q, k, v = attention.qkv(attention.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, H*W) each
        heads = lambda t: t.reshape(2, 2, 4, 16)  # (B, heads, C / heads, positions)
        q, k, v = heads(q), heads(k), heads(v)
        weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 2.0, dim=-1)  # √(C / heads) = 2
        attended = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 8, 4, 4)
        assert torch.allclose(attention(x), x + attention.proj(attended), rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels,anchor", [(1, True), (2, True), (2, False)])
def test_forward_classify_and_predict_levels(channels, anchor):
    model = _small(channels, anchor)
    frames = [_field(2, channels, 32, seed) for seed in range(3)]
    x = model.stack_inputs(frames[0] if anchor else None, frames[1], frames[2])
    assert x.shape == (2, (3 if anchor else 2) * channels, 32, 32)
    with torch.no_grad():
        output = model(x)
        classified = model.classify(x)
    assert isinstance(output, SNSOutput)
    assert output.previous_noise.shape == output.current_noise.shape == (2, channels, 32, 32)
    assert output.previous_logits.shape == output.current_logits.shape == (2, 1000)
    assert all(torch.isfinite(tensor).all() for tensor in output)
    # Same bottleneck, same heads: the decoder-free path is exact, not an approximation.
    assert torch.equal(classified[0], output.previous_logits) and torch.equal(classified[1], output.current_logits)
    previous_level, current_level = model.predict_levels(x)
    assert previous_level.dtype == current_level.dtype == torch.long
    assert torch.equal(previous_level, output.previous_logits.argmax(dim=-1))
    assert torch.equal(current_level, output.current_logits.argmax(dim=-1))


def test_classify_does_not_run_the_decoder():
    model = _tiny()
    calls: list[str] = []
    roots = {"unet.decoder": model.unet.decoder, "unet.output": model.unet.output,
             "condition": model.condition, "decoder_biases": model.decoder_biases}
    handles = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
               for prefix, root in roots.items() for name, module in root.named_modules(prefix=prefix)]
    x = _field(1, 3, 16)
    with torch.no_grad():
        model.classify(x)
        assert calls == []
        model(x)  # the hooks do fire on the full pass
        assert "unet.output" in calls and "condition" in calls
    for handle in handles:
        handle.remove()


def test_the_noise_loss_alone_trains_the_heads():
    # The conditioning reads the heads' softmax undetached, so MSE on the noise reaches every head weight.
    model = _tiny()
    output = model(_field(2, 3, 16))
    target = _field(2, 1, 16, seed=1)
    (F.mse_loss(output.previous_noise, target) + F.mse_loss(output.current_noise, target)).backward()
    for head in (model.previous_head, model.current_head):
        for name, parameter in head.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_decoder_biases_condition_the_output_and_vanish_with_zero_weights():
    model = _tiny()
    x = _field(2, 3, 16)
    with torch.no_grad():
        bottleneck, skips = model.unet.encode(x)
        unconditioned = model.unet.decode(bottleneck, skips)
        conditioned = torch.cat(model(x)[:2], dim=1)
        assert (conditioned - unconditioned).abs().max() > 1e-4
        for linear in model.decoder_biases:
            linear.weight.zero_()
            linear.bias.zero_()
        assert torch.equal(torch.cat(model(x)[:2], dim=1), unconditioned)


def test_decoder_biases_follow_the_block_formula():
    torch.manual_seed(0)
    block = ResidualBlock(3, 4)
    x, b1, b2 = _field(2, 3, 8), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        h = block.conv1(F.gelu(x)) + b1[..., None, None]
        h = block.conv2(F.gelu(h)) + b2[..., None, None]
        assert torch.allclose(block(x, (b1, b2)), h + block.shortcut(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [(8, 16), (4, -12)])
def test_translation_commutes_with_the_attention_unet(shift):
    # Attention without positional encoding keeps the UNet's equivariance under shifts by multiples of
    # 2**2 = 4; so does the SNS decoder with its biases held fixed (the heads themselves are not
    # equivariant: a Linear layer reads the flattened bottleneck).
    torch.manual_seed(0)
    unet = make_model("unet", "small", 1, 1, attention=True)
    model = _small()
    x, frames = _field(2, 1, 32), _field(2, 3, 32, seed=1)
    roll = lambda t: torch.roll(t, shift, dims=(-2, -1))
    with torch.no_grad():
        rolled_out = roll(unet(x))
        assert rolled_out.abs().max() > 1e-2
        assert torch.allclose(unet(roll(x)), rolled_out, rtol=0, atol=1e-5)
        biases = model.decoder_biases_from_logits(*model.classify(frames))
        rolled_out = roll(model.unet.decode(*model.unet.encode(frames), biases=biases))
        assert torch.allclose(model.unet.decode(*model.unet.encode(roll(frames)), biases=biases), rolled_out,
                              rtol=0, atol=1e-5)


@pytest.mark.parametrize("anchor", [True, False])
def test_config_round_trip_rebuilds_the_same_model(anchor):
    model = _small(2, anchor)
    config = json.loads(json.dumps(model_config(model)))  # what a checkpoint would hold
    assert config["arch"] == "sns" and config["preset"] == "small" and config["anchor"] is anchor
    assert config["in_channels"] == config["out_channels"] == 2 and config["grid_size"] == 32
    assert config["attention"] is True and config["condition_hidden"] == 256
    rebuilt = make_model(**config).eval()
    assert type(rebuilt) is SNSUNet and rebuilt.config == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = _field(1, (3 if anchor else 2) * 2, 32, seed=2)
    with torch.no_grad():
        for ours, theirs in zip(model(x), rebuilt(x)):
            assert torch.equal(ours, theirs)


def test_direct_construction_records_every_argument():
    model = _tiny(anchor=False, activation="silu")
    assert model.config == {
        "arch": "sns", "preset": None, "in_channels": 1, "out_channels": 1, "grid_size": 16, "anchor": False,
        "num_levels": 5, "head_hidden": None, "head_channels": 2, "condition_hidden": 6, "hidden_channels": 8,
        "channel_multipliers": [1, 2], "blocks_per_level": 1, "middle_blocks": 1, "activation": "silu",
        "attention": True, "attention_heads": 4,
    }
    assert set(SNS_NETWORKS) == {"sns"}


def test_stack_inputs_needs_the_anchor_exactly_when_built_with_one():
    frame = _field(1, 1, 16)
    with pytest.raises(ValueError, match=r"built with anchor=True and needs an anchor frame"):
        _tiny().stack_inputs(None, frame, frame)
    with pytest.raises(ValueError, match=r"built with anchor=False; pass anchor=None"):
        _tiny(anchor=False).stack_inputs(frame, frame, frame)
    with pytest.raises(ValueError, match=r"the frames must share one shape"):
        _tiny().stack_inputs(frame, frame, _field(1, 2, 16))


def test_wrong_inputs_name_the_expected_shape():
    model = _tiny()
    for call in (model, model.classify, model.predict_levels):
        with pytest.raises(ValueError, match=r"input grid \(32, 32\) differs from grid_size \(16, 16\)"):
            call(_field(1, 3, 32))
    with pytest.raises(ValueError, match=r"expected input \(batch, 3, 16, 16\); channels \[anchor, previous, "
                                         r"current\] x 1, got \(1, 2, 16, 16\)"):
        model(_field(1, 2, 16))


@pytest.mark.parametrize("call,match", [
    (lambda: make_model("sns", "small", 1, 2, grid_size=32), r"'sns' needs out_channels == in_channels.*got 1 and 2"),
    (lambda: make_model("sns", "small", 1, 1), r"'sns' needs grid_size"),
    (lambda: make_model("sns", "small", 1, 1, grid_size=30), r"grid_size must be a positive multiple of .* 4"),
    (lambda: make_model("sns", "small", 1, 1, grid_size=32, attention_heads=3), r"heads \(3\) must divide .* \(64\)"),
    (lambda: make_model("sns", "small", 1, 1, grid_size=32, condition_hidden=0), r"condition_hidden must be .* >= 1"),
    (lambda: UNet(1, 1, hidden_channels=4).decode(torch.empty(0), [], biases=[]), r"one \(b1, b2\) pair per decoder block \(9\), got 0"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
