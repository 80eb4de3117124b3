"""Networks (the learning layer): torch.nn only, no physics, data or solvers imported here.

    from emu.models import make_model
    emulator = make_model("drn", "paper", in_channels=1, out_channels=1)

`UNet` is PDEArena's modern UNet made periodic (emu.models.unet); `DilatedResNet` the
Stachenfeld et al. dilated ResNet (emu.models.drn). Both map (B, C_in, H, W) to (B, C_out, H, W)
with circular padding throughout; `registry` names them and their presets. `ThermalizerUNet`
(emu.models.thermalizer) is the UNet as a denoiser with a noise-level classifier head:
(B, C, N, N) -> (predicted noise, logits over noise levels), built for one grid_size. `SNSUNet`
(emu.models.sns) is SNS's denoiser: stacked frames [anchor, previous, current] -> the noise of the
two noised frames and both their noise levels, the decoder conditioned on the levels it reads.
"""

from emu.models.drn import DilatedResNet, DilatedStack
from emu.models.registry import (ARCHITECTURES, MODELS, PRESETS, SNS_NETWORKS, THERMALIZERS, count_parameters,
                                 make_model, model_config)
from emu.models.sns import SNSOutput, SNSUNet
from emu.models.thermalizer import ThermalizerUNet, level_head
from emu.models.unet import CircularDownsample, CircularUpsample, ResidualBlock, SelfAttention2d, UNet

__all__ = [
    "ARCHITECTURES",
    "MODELS",
    "PRESETS",
    "SNS_NETWORKS",
    "THERMALIZERS",
    "CircularDownsample",
    "CircularUpsample",
    "DilatedResNet",
    "DilatedStack",
    "ResidualBlock",
    "SNSOutput",
    "SNSUNet",
    "SelfAttention2d",
    "ThermalizerUNet",
    "UNet",
    "count_parameters",
    "level_head",
    "make_model",
    "model_config",
]
