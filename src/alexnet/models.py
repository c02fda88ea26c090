"""AlexNet models: torchvision's variant (same module names, so its weights load) and the 2012 paper's.

Pure torch: nothing here knows about devices, files or configuration.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MIN_INPUT_SIZE = 63


class _AlexNetShape(nn.Module):
    """`features`, `avgpool`, `classifier`, and the forward that joins them."""

    features: nn.Sequential
    avgpool: nn.Module
    classifier: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNet(_AlexNetShape):
    """torchvision's AlexNet (the 2014 "one weird trick" variant), with a configurable hidden width."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, fc_width: int = 4096,
                 init: str = "fan-out", init_bias: float = 1.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, fc_width),
            nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),
        )
        init_weights(self, init, init_bias)


class PaperLRN(nn.LocalResponseNorm):
    """Local response normalisation as written in the 2012 paper (section 3.3):

        b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2) ^ beta

    `nn.LocalResponseNorm` divides alpha by the window size n, so it is given n * alpha.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__(size=size, alpha=alpha * size, beta=beta, k=k)


class AlexNet2012(_AlexNetShape):
    """The network of Krizhevsky, Sutskever and Hinton (2012): 96-256-384-384-256 convolutions, two
    groups on conv2, conv4 and conv5 (the two GPU towers), LRN after conv1 and conv2, overlapping
    max-pooling, dropout on the two hidden fully connected layers, and the paper's initialisation."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, fc_width: int = 4096,
                 init: str = "paper", init_bias: float = 1.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),  # conv1
            nn.ReLU(inplace=True),
            PaperLRN(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),  # conv2
            nn.ReLU(inplace=True),
            PaperLRN(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3: connected to both towers
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),  # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),  # conv5
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, fc_width),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, fc_width),  # fc7
            nn.ReLU(inplace=True),
            nn.Linear(fc_width, num_classes),  # fc8
        )
        init_weights(self, init, init_bias)


INIT_SCHEMES = ("fan-out", "fan-in", "pytorch", "paper")


def init_weights(model: nn.Module, scheme: str, paper_bias: float = 1.0) -> None:
    """Initialise the convolutions and fully connected layers of an AlexNet-shaped model.

    - fan-out: He normal (fan-out, as torchvision does for VGG) for convolutions, N(0, 0.01) for the
      fully connected layers, zero biases. Starts near chance loss and trains at the paper's lr 0.01.
    - fan-in: He normal (fan-in) everywhere but the last layer, N(0, 0.01) there, zero biases. Larger
      activations: quicker to leave the initial plateau, but needs a smaller learning rate at 224.
    - pytorch: PyTorch's default layer initialisation, which torchvision's AlexNet keeps.
    - paper: section 5 of the 2012 paper: N(0, 0.01) weights; biases 1 (`paper_bias`) on conv2, conv4,
      conv5 and the hidden fully connected layers (to give the ReLUs positive inputs early on), 0 elsewhere.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown initialisation {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in convs + linears:
        if scheme == "pytorch":
            m.reset_parameters()
            continue
        nn.init.zeros_(m.bias)
        if scheme == "paper" or isinstance(m, nn.Linear) and scheme == "fan-out":
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
        else:
            nn.init.kaiming_normal_(m.weight, mode=scheme.replace("-", "_"), nonlinearity="relu")
    if scheme == "fan-in":
        nn.init.normal_(linears[-1].weight, mean=0.0, std=0.01)
    if scheme == "paper":
        for m in (convs[1], convs[3], convs[4], linears[0], linears[1]):
            nn.init.constant_(m.bias, paper_bias)


BN_EPS = 1e-5


class ConvBN(nn.Module):
    """A convolution and a BatchNorm over its output channels: the training form of `add_batchnorm`."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def add_batchnorm(model: nn.Module) -> nn.Module:
    """Follow every convolution of `model.features` by a BatchNorm, in place (a re-parametrisation for
    training: `folded_state_dict` turns the result back into the plain model's weights). Returns `model`."""
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            model.features[i] = ConvBN(m)
    return model


def folded_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of the plain model (no BatchNorm: its own keys and shapes) that computes in evaluation
    what the model of `add_batchnorm` computes in evaluation, from that model's state dict: each
    BatchNorm's running statistics and affine map folded into its convolution's weight and bias."""
    convs = {k[:-len(".conv.weight")] for k in state if k.endswith(".conv.weight")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = key.rsplit(".", 2)[0]
        if prefix not in convs:
            out[key] = value
        elif key == f"{prefix}.conv.weight":
            w, b = value.double(), state[f"{prefix}.conv.bias"].double()
            gamma, beta = state[f"{prefix}.bn.weight"].double(), state[f"{prefix}.bn.bias"].double()
            mean, var = state[f"{prefix}.bn.running_mean"].double(), state[f"{prefix}.bn.running_var"].double()
            scale = gamma / torch.sqrt(var + BN_EPS)
            out[f"{prefix}.weight"] = (w * scale.view(-1, 1, 1, 1)).to(value.dtype)
            out[f"{prefix}.bias"] = ((b - mean) * scale + beta).to(value.dtype)
    return out


_REGISTRY: dict[str, Callable[..., nn.Module]] = {"alexnet": AlexNet, "alexnet2012": AlexNet2012}
ARCHITECTURES = tuple(_REGISTRY)


def create_model(arch: str, num_classes: int, dropout: float = 0.5, fc_width: int = 4096,
                 init: str = "auto", init_bias: float = 1.0) -> nn.Module:
    """`init` "auto" keeps the architecture's own: fan-out for alexnet, paper for alexnet2012; `init_bias`
    is the paper initialisation's bias constant."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    kw = {} if init == "auto" else {"init": init}
    if init_bias != 1.0:
        kw["init_bias"] = init_bias
    return _REGISTRY[arch](num_classes=num_classes, dropout=dropout, fc_width=fc_width, **kw)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load `state` into `model`; when the head's shape differs (another number of classes, for
    fine-tuning), keep the model's fresh head. Returns the names of the keys that were not loaded."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError("the weights do not fit this architecture: "
                         + (f"missing {', '.join(missing[:4])}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {', '.join(unexpected[:4])}" if unexpected else ""))
    head_keys = {k for k in own if k.startswith("classifier.6.")}
    skipped = []
    for k, v in state.items():
        if own[k].shape != v.shape:
            if k not in head_keys:
                raise ValueError(f"the weights do not fit this model: {k} has shape {tuple(v.shape)}, "
                                 f"the model needs {tuple(own[k].shape)} (check --arch and --fc-width)")
            skipped.append(k)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped
