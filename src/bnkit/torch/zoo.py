"""Small reference models with BatchNorm in every place real architectures put it.

torchvision cannot be imported beside the pinned torch, so the few shapes bnkit
is tested on are written here, sized for 8x8 single-channel digits:

* ``MLP``: Linear -> BatchNorm1d -> ReLU blocks (BN after a Linear).
* ``SmallResNet``: basic blocks with 1x1-conv + BN projection shortcuts (after torchvision's resnet.py).
* ``MobileNetV2Tiny``: inverted residuals, BN after expand / depthwise / project convs (mobilenetv2.py).
* ``VGGBN``: conv-BN-ReLU stacks and a BatchNorm1d classifier (vgg.py, ``batch_norm=True``).
* ``ConvTransposeDecoder``: BN after Linear and after ConvTranspose2d.
* ``SharedConvNet``: one Conv2d used twice, each use followed by its own BN (not foldable into the conv).
* ``PreActNet``: a pre-activation block whose BN follows an addition (no conv to fold into).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "MLP",
    "SmallResNet",
    "MobileNetV2Tiny",
    "VGGBN",
    "ConvTransposeDecoder",
    "SharedConvNet",
    "PreActNet",
    "ZOO",
    "example_input",
]


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class MLP(nn.Sequential):
    """``in -> [Linear -> BatchNorm1d -> ReLU (-> Dropout)]* -> Linear``."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut, projected by 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        blocks = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, kernel=1),
            _conv_bn(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            _conv_bn(hidden, cout, kernel=1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Tiny(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 8),
            InvertedResidual(8, 8),
            InvertedResidual(8, 16, stride=2),
            InvertedResidual(16, 16),
            _conv_bn(16, 32, kernel=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class VGGBN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 16), _conv_bn(16, 16), nn.MaxPool2d(2),
            _conv_bn(16, 32), _conv_bn(32, 32), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvTransposeDecoder(nn.Module):
    """``(N, latent) -> (N, out_channels, 8, 8)``."""

    def __init__(self, latent: int = 16, out_channels: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(latent, 32 * 2 * 2)
        self.bn0 = nn.BatchNorm1d(32 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, out_channels, 4, stride=2, padding=1)
        self.relu = nn.ReLU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn0(self.fc(z))).view(-1, 32, 2, 2)
        return self.up2(self.relu(self.bn1(self.up1(h))))


class SharedConvNet(nn.Module):
    """One conv applied twice; folding either BN into it would corrupt the other path."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.relu(self.bn_a(self.shared(h)))
        h = self.relu(self.bn_b(self.shared(h)))
        return self.fc(h.mean(dim=(2, 3)))


class PreActNet(nn.Module):
    """``x + conv(relu(bn(x)))`` blocks: each BN reads a sum, not a conv output."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv1(self.relu(self.bn1(h)))
        h = h + self.conv2(self.relu(self.bn2(h)))
        return self.fc(self.relu(self.bn_out(h)).mean(dim=(2, 3)))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "resnet": SmallResNet,
    "mobilenet": MobileNetV2Tiny,
    "vgg": VGGBN,
    "decoder": ConvTransposeDecoder,
    "shared_conv": SharedConvNet,
    "preact": PreActNet,
}


def example_input(name: str, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """A random input of the shape the zoo model ``name`` expects."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {sorted(ZOO)}")
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, 64, generator=g)
    if name == "decoder":
        return torch.randn(batch, 16, generator=g)
    return torch.randn(batch, 1, 8, 8, generator=g)
