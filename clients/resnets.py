"""The CIFAR ResNets of the continual-learning literature, as encoders (He et al., CVPR 2016, "Deep Residual
Learning for Image Recognition").

- ``resnet18``: ResNet-18 for 32x32 images as GEM, ER and GLFC's code build it: a 3x3 stride-1 stem of 64
  channels and no max-pool, four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from the
  second), 1x1-conv shortcuts where the shape changes; 512 features after global average pooling.
- ``resnet32``: the CIFAR ResNet of He et al.'s section 4.2 with n = 5 (three stages of five basic blocks,
  16, 32, 64 channels) as iCaRL, PyCIL and TARGET build it: parameter-free shortcuts (option A: stride-2
  subsampling, zero channels appended); 64 features.

Both take (channels, height, width) inputs of any channel count and size (global pooling) above 8x8
(``resnet18``) or 4x4 (``resnet32``), have batch norm after every convolution and
end in a ReLU, so features are non-negative as the MLP's and CNN's are. ``model.feature_dim`` null keeps the
architecture's width; a number adds a linear layer and ReLU to that width (a projection, not in the papers).
Batch norm's running statistics are averaged beside the strategy: simulator/running_statistics.py.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from simulator.config import ConfigError, ModelConfig


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; ``zero_pad_shortcut`` picks option A over a 1x1 conv."""

    def __init__(self, in_channels: int, channels: int, stride: int, zero_pad_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.reshapes = stride != 1 or in_channels != channels
        self.zero_pad_shortcut = zero_pad_shortcut
        if self.reshapes and not zero_pad_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.stride, self.extra_channels = stride, channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))

    def _shortcut(self, x: Tensor) -> Tensor:
        if not self.reshapes:
            return x
        if not self.zero_pad_shortcut:
            return self.shortcut(x)
        subsampled = x[:, :, :: self.stride, :: self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, 0, self.extra_channels))


class CifarResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks, global average pooling: features of the last stage's width."""

    def __init__(self, in_channels: int, stem: int, stages: list[tuple[int, int]], zero_pad_shortcut: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem))
        blocks, width = [], stem
        for index, (channels, depth) in enumerate(stages):
            for block in range(depth):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(width, channels, stride, zero_pad_shortcut))
                width = channels
        self.blocks = nn.Sequential(*blocks)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.stem(x)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _big_enough(input_shape: tuple[int, ...], name: str) -> None:
    """Refuse images its strides take to 1x1: the last batch norm would then normalise one value per channel
    on a client's one-sample batch, which it cannot (a client with ``n % batch_size == 1`` samples has one)."""
    if max(input_shape[1:]) <= DOWNSAMPLING[name]:
        raise ConfigError(
            f"model.name = {name!r} halves images {DOWNSAMPLING[name].bit_length() - 1} times, so the dataset's "
            f"{input_shape[1]}x{input_shape[2]} images reach its last batch norm as 1x1, which cannot train on a "
            f"one-sample batch; it needs images larger than {DOWNSAMPLING[name]}x{DOWNSAMPLING[name]}: use "
            f"{'resnet32 or ' if name == 'resnet18' else ''}model.name=cnn"
        )


def _with_width(network: CifarResNet, config: ModelConfig) -> nn.Module:
    if config.feature_dim is None or config.feature_dim == network.width:
        return network
    return nn.Sequential(network, nn.Linear(network.width, config.feature_dim), nn.ReLU())


def resnet18(input_shape: tuple[int, ...], config: ModelConfig) -> nn.Module:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool): 11.2M parameters, 512 features."""
    _big_enough(input_shape, "resnet18")
    network = CifarResNet(input_shape[0], 64, [(64, 2), (128, 2), (256, 2), (512, 2)], zero_pad_shortcut=False)
    return _with_width(network, config)


def resnet32(input_shape: tuple[int, ...], config: ModelConfig) -> nn.Module:
    """ResNet-32 of iCaRL and TARGET (option-A shortcuts): 0.46M parameters, 64 features."""
    _big_enough(input_shape, "resnet32")
    network = CifarResNet(input_shape[0], 16, [(16, 5), (32, 5), (64, 5)], zero_pad_shortcut=True)
    return _with_width(network, config)


NATURAL_WIDTH = {"resnet18": 512, "resnet32": 64}  # the features each gives with model.feature_dim null
DOWNSAMPLING = {"resnet18": 8, "resnet32": 4}  # how many times smaller its last stage's images are
