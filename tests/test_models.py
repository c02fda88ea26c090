import pytest
import torch
import torchvision
from torch import nn

from alexnet.models import (AlexNet, AlexNet2012, ConvBN, PaperLRN, add_batchnorm, create_model, folded_state_dict,
                            load_pretrained)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_torchvision_variant_parameter_count():
    assert n_params(AlexNet(num_classes=1000)) == 61_100_840


def test_paper_network_parameter_count_from_its_layers():
    # conv1 96x3x11x11, conv2 256x48x5x5 (two groups), conv3 384x256x3x3, conv4 384x192x3x3 and
    # conv5 256x192x3x3 (two groups), fc6 9216->4096, fc7 4096->4096, fc8 4096->1000, with biases.
    expected = (96 * 3 * 121 + 96) + (256 * 48 * 25 + 256) + (384 * 256 * 9 + 384) + (384 * 192 * 9 + 384) \
        + (256 * 192 * 9 + 256) + (9216 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert n_params(AlexNet2012(num_classes=1000)) == expected == 60_965_224


def test_groups_on_conv2_conv4_conv5_only():
    convs = [m for m in AlexNet2012().features if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [2 if i in (1, 3, 4) else 1 for i in range(5)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.kernel_size[0] for c in convs] == [11, 5, 3, 3, 3]
    assert convs[0].stride == (4, 4)


@pytest.mark.parametrize("arch", ["alexnet", "alexnet2012"])
@pytest.mark.parametrize("size", [63, 64, 224])
def test_output_shapes(arch, size):
    model = create_model(arch, num_classes=7, fc_width=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["alexnet", "alexnet2012"])
def test_fc_width(arch):
    model = create_model(arch, num_classes=5, fc_width=32)
    assert model.classifier[1].out_features == 32 and model.classifier[4].in_features == 32
    assert model.classifier[-1].out_features == 5


def test_too_small_input_fails():
    with pytest.raises(RuntimeError):
        create_model("alexnet", 3, fc_width=8)(torch.randn(1, 3, 40, 40))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*alexnet2012"):
        create_model("vgg", 10)


def test_torchvision_state_dict_loads_strictly():
    tv = torchvision.models.alexnet(weights=None)
    ours = AlexNet(num_classes=1000)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    tv.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(tv(x), ours(x))


def test_fine_tuning_replaces_the_head_and_keeps_the_rest():
    tv = torchvision.models.alexnet(weights=None).state_dict()
    model = AlexNet(num_classes=10)
    head_before = model.classifier[6].weight.clone()
    skipped = load_pretrained(model, tv)
    assert sorted(skipped) == ["classifier.6.bias", "classifier.6.weight"]
    assert torch.equal(model.features[0].weight, tv["features.0.weight"])
    assert torch.equal(model.classifier[4].weight, tv["classifier.4.weight"])
    assert torch.equal(model.classifier[6].weight, head_before)
    assert model.classifier[6].out_features == 10


def test_weights_of_another_architecture_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        load_pretrained(AlexNet2012(num_classes=10), torchvision.models.alexnet(weights=None).state_dict())


@pytest.mark.parametrize("arch", ["alexnet", "alexnet2012"])
def test_folded_batchnorm_gives_the_plain_model_that_computes_the_same(arch):
    torch.manual_seed(0)
    model = add_batchnorm(create_model(arch, num_classes=5, dropout=0.0, fc_width=32, init="fan-in"))
    bns = [m.bn for m in model.features if isinstance(m, ConvBN)]
    assert len(bns) == 5
    for bn in bns:  # statistics and affine maps far from the identity, so that folding has work to do
        nn.init.uniform_(bn.weight, 0.5, 2.0)
        nn.init.normal_(bn.bias, 0.0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(3 * torch.randn(8, 3, 80, 80) + 1)
    model.eval()
    plain = create_model(arch, num_classes=5, dropout=0.0, fc_width=32).eval()
    plain.load_state_dict(folded_state_dict(model.state_dict()), strict=True)
    x = torch.randn(4, 3, 80, 80)
    with torch.no_grad():
        expected, got = model(x), plain(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        # the control: the convolutions' own weights, without the BatchNorms, compute something else
        unfolded = {k.replace(".conv.", "."): v for k, v in model.state_dict().items() if ".bn." not in k}
        plain.load_state_dict(unfolded)
        assert not torch.allclose(plain(x), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def test_folded_batchnorm_weights_have_torchvisions_keys_and_shapes():
    folded = folded_state_dict(add_batchnorm(AlexNet(num_classes=1000)).state_dict())
    tv = torchvision.models.alexnet(weights=None).state_dict()
    assert list(folded) == list(tv)
    assert all(folded[k].shape == tv[k].shape for k in tv)


def lrn_direct(a: torch.Tensor, n=5, k=2.0, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """The paper's formula, written out with loops over channels."""
    N = a.shape[1]
    out = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo:hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def test_lrn_matches_the_paper_formula():
    torch.manual_seed(0)
    a = torch.randn(2, 12, 5, 5, dtype=torch.float64) * 30  # large enough for alpha to matter
    got = PaperLRN()(a)
    assert torch.allclose(got, lrn_direct(a), rtol=1e-10, atol=1e-12)
    # A plain nn.LocalResponseNorm with the paper's alpha divides it by n and so differs.
    plain = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a)
    assert (plain - lrn_direct(a)).abs().max() > 1e-3


def test_lrn_sits_after_conv1_and_conv2():
    f = list(AlexNet2012().features)
    assert isinstance(f[2], PaperLRN) and isinstance(f[6], PaperLRN)
    assert sum(isinstance(m, PaperLRN) for m in f) == 2
    pools = [m for m in f if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)


def test_paper_initialisation():
    torch.manual_seed(0)
    m = AlexNet2012(num_classes=1000)
    convs = [x for x in m.features if isinstance(x, nn.Conv2d)]
    fcs = [x for x in m.classifier if isinstance(x, nn.Linear)]
    for layer in convs + fcs:
        assert abs(layer.weight.std().item() - 0.01) < 0.001
        assert abs(layer.weight.mean().item()) < 0.001
    ones = [convs[1], convs[3], convs[4], fcs[0], fcs[1]]
    zeros = [convs[0], convs[2], fcs[2]]
    assert all(torch.all(layer.bias == 1) for layer in ones)
    assert all(torch.all(layer.bias == 0) for layer in zeros)
    drops = [x for x in m.classifier if isinstance(x, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    tenth = create_model("alexnet2012", 10, init_bias=0.1)  # the paper2012 recipe's
    biased = [m for i, m in enumerate(x for x in tenth.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
              if i in (1, 3, 4, 5, 6)]
    assert all(torch.all(layer.bias == 0.1) for layer in biased)


def test_initialisation_schemes():
    torch.manual_seed(0)
    fan_out = AlexNet(num_classes=10)  # the default
    conv1 = fan_out.features[0]
    assert abs(conv1.weight.std().item() - (2 / (64 * 11 * 11)) ** 0.5) < 0.002
    assert all(abs(m.weight.std().item() - 0.01) < 0.001 for m in fan_out.classifier if isinstance(m, nn.Linear))
    fan_in = AlexNet(num_classes=10, init="fan-in")
    assert abs(fan_in.features[0].weight.std().item() - (2 / (3 * 11 * 11)) ** 0.5) < 0.005
    assert abs(fan_in.classifier[1].weight.std().item() - (2 / 9216) ** 0.5) < 0.001
    assert abs(fan_in.classifier[6].weight.std().item() - 0.01) < 0.001
    for m in (fan_out, fan_in):
        assert all(torch.all(layer.bias == 0) for layer in m.modules() if isinstance(layer, (nn.Conv2d, nn.Linear)))
    # "pytorch" is torchvision's own: the same draws as torchvision.models.alexnet under the same seed
    torch.manual_seed(3)
    ours = AlexNet(num_classes=1000, init="pytorch")
    torch.manual_seed(3)
    tv = torchvision.models.alexnet(weights=None)
    ours_sd, tv_sd = ours.state_dict(), tv.state_dict()
    assert abs(ours_sd["features.0.weight"].std() - tv_sd["features.0.weight"].std()) < 1e-3
    with pytest.raises(ValueError, match="unknown initialisation"):
        AlexNet(init="zeros")


def test_default_initialisation_starts_near_chance_loss_at_224():
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, fc_width=1024).eval()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
    assert abs(loss.item() - torch.log(torch.tensor(10.0)).item()) < 0.3
