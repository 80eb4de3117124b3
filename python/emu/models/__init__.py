"""Networks (the learning layer): torch.nn only, no physics, data or solvers imported here.

    from emu.models import make_model
    emulator = make_model("drn", "paper", in_channels=1, out_channels=1)

`UNet` is PDEArena's modern UNet made periodic (emu.models.unet); `DilatedResNet` the
Stachenfeld et al. dilated ResNet (emu.models.drn). Both map (B, C_in, H, W) to (B, C_out, H, W)
with circular padding throughout; `registry` names them and their presets.
"""

from emu.models.drn import DilatedResNet, DilatedStack
from emu.models.registry import MODELS, PRESETS, count_parameters, make_model, model_config
from emu.models.unet import CircularDownsample, CircularUpsample, ResidualBlock, UNet

__all__ = [
    "MODELS",
    "PRESETS",
    "CircularDownsample",
    "CircularUpsample",
    "DilatedResNet",
    "DilatedStack",
    "ResidualBlock",
    "UNet",
    "count_parameters",
    "make_model",
    "model_config",
]
