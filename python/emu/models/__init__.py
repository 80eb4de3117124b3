"""Networks (the learning layer): torch.nn only, no physics, data or solvers imported here.

    from emu.models import make_model
    emulator = make_model("drn", "paper", in_channels=1, out_channels=1)

`UNet` is PDEArena's modern UNet made periodic (emu.models.unet); `DilatedResNet` the
Stachenfeld et al. dilated ResNet (emu.models.drn). Both map (B, C_in, H, W) to (B, C_out, H, W)
with circular padding throughout; `registry` names them and their presets. `ThermalizerUNet`
(emu.models.thermalizer) is the UNet as a denoiser with a noise-level classifier head:
(B, C, N, N) -> (predicted noise, logits over noise levels), built for one grid_size.
"""

from emu.models.drn import DilatedResNet, DilatedStack
from emu.models.registry import (ARCHITECTURES, MODELS, PRESETS, THERMALIZERS, count_parameters, make_model,
                                 model_config)
from emu.models.thermalizer import ThermalizerUNet
from emu.models.unet import CircularDownsample, CircularUpsample, ResidualBlock, UNet

__all__ = [
    "ARCHITECTURES",
    "MODELS",
    "PRESETS",
    "THERMALIZERS",
    "CircularDownsample",
    "CircularUpsample",
    "DilatedResNet",
    "DilatedStack",
    "ResidualBlock",
    "ThermalizerUNet",
    "UNet",
    "count_parameters",
    "make_model",
    "model_config",
]
