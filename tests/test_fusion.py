"""Fusion with any classifier by layer name (forward hooks), the rejector's stems, the
features-only rejector and FLOP counts. CPU, tiny networks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import randomize

from dsr_lightning.models.features import default_feature_layers
from dsr_lightning.models.flops import count_flops, format_gflops
from dsr_lightning.models.normalize import Classifier
from dsr_lightning.models.rejector import STEMS, FeatureRejector, Rejector, resolve_stem
from dsr_lightning.models.resnet import ResNet


class TwoConv(nn.Module):
    """A custom classifier: body = conv-ReLU-conv-ReLU, then pool and a linear head; `pair` returns
    a tuple (map, its mean) as some blocks do."""

    def __init__(self, k: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.ReLU())
        self.pair = Pair()
        self.head = nn.Linear(7, k)

    def forward(self, x):
        x, _ = self.pair(self.body(x))
        return self.head(x.mean((2, 3)))


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, x.mean()


class Tokens(nn.Module):
    """ViT-like: patches to tokens (B, N, C), one token block, mean token -> logits."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, 6)
        return self.head(self.block(t).mean(1))


# ---- fusion by forward hooks ---------------------------------------------------------------------

def test_torchvision_resnet_fusion_trains_the_rejector_only():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3, weights=None)
    clf = Classifier(net).eval()  # parameters still require grad: detaching must protect them
    assert clf.feature_layers == ["layer1", "layer2", "layer3", "layer4"]
    assert clf.feature_channels == [64, 128, 256, 512] and clf.num_classes == 3
    assert list(clf.state_dict()) == ["1." + k for k in net.state_dict()]  # layout unchanged
    rej = Rejector(3, clf.feature_channels, width=4, blocks=(1, 1, 1, 1), fc_hidden=(8,))
    z = torch.rand(2, 3, 32, 32)
    logits, feats = clf.forward_features(z)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2),
                                               (2, 512, 1, 1)]
    assert torch.equal(logits, clf(z))
    head = rej(z, feats)  # (2, 3)
    F.binary_cross_entropy_with_logits(head, torch.tensor([[1., 0, 1], [0, 1, 0]])).backward()
    proj = list(rej.projections.parameters())
    assert len(proj) == 4 * 3 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)
    assert all(p.grad is None for p in clf.parameters())


def test_cohen_resnet_features_are_todays_and_hooks_hold_nothing():
    net = randomize(ResNet(8, num_classes=5))
    clf = Classifier(net).eval()
    assert clf.feature_layers == default_feature_layers(net) == ["layer1", "layer2", "layer3"]
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = clf.forward_features(x)
        ref_logits, ref_feats = net.forward_features(clf[0](x))
    assert torch.equal(logits, ref_logits) and len(feats) == 3
    assert all(torch.equal(a, b) for a, b in zip(feats, ref_feats))
    assert clf.feature_channels == [16, 32, 64] and clf.num_classes == 5
    assert not any(k.startswith("0.") for k in clf.state_dict())
    assert len(list(clf.buffers())) == len(list(net.buffers())) + 2  # mean, std: non-persistent
    # nothing kept after the call, nothing captured by a plain forward
    assert all(h.out is None and not h.armed for h in clf._hooks)
    with torch.no_grad():
        clf(x)
    assert all(h.out is None for h in clf._hooks)
    # a deep copy captures into its own hooks (not the original's)
    twin = copy.deepcopy(clf)
    with torch.no_grad():
        twin_logits, twin_feats = twin.forward_features(x)
    assert torch.equal(twin_logits, logits) and all(torch.equal(a, b)
                                                    for a, b in zip(twin_feats, feats))


def test_num_classes_cheap_path_runs_nothing():
    class Refuses(nn.Module):
        num_classes = 7

        def forward(self, x):
            raise AssertionError("the probe ran")

    assert Classifier(Refuses()).num_classes == 7
    assert Classifier(Refuses()).feature_channels == []


def test_custom_module_with_explicit_feature_layers_and_probe():
    torch.manual_seed(0)
    net = TwoConv(k=4).train()
    clf = Classifier(net, mean=(0.5,) * 3, std=(0.25,) * 3, feature_layers=["body.1", "pair"])
    assert default_feature_layers(net) == [] and Classifier(net).feature_channels == []
    assert clf.num_classes == 4 and clf.feature_channels == [5, 7]  # from the probe
    assert net.training and all(m.training for m in net.modules())  # train mode restored
    x = torch.rand(2, 3, 12, 12)
    logits, feats = clf.forward_features(x)
    h = net.body[1](net.body[0]((x - 0.5) / 0.25))
    assert torch.equal(feats[0], h) and torch.equal(feats[1], 2 * net.body[3](net.body[2](h)))
    assert torch.equal(logits, clf(x)) and feats[1].shape == (2, 7, 6, 6)

    class Flat(nn.Module):  # needs 8x8 inputs: the default probe (32x32) cannot run it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.out = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            return self.out(self.conv(x).flatten(1))

    flat = Classifier(Flat(), mean=(0.5,), std=(0.5,), feature_layers=["conv"])
    assert flat.input_shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"probe input of shape \(1, 1, 32, 32\).*input_shape"):
        _ = flat.feature_channels
    assert flat.probe((1, 8, 8)) == (3, [2]) and flat.num_classes == 3
    assert Classifier(Flat(), (0.5,), (0.5,), ["conv"], input_shape=(1, 8, 8)).feature_channels == [2]


def test_compiled_forward_features_match_eager():
    torch.manual_seed(0)
    clf = Classifier(TwoConv(), feature_layers=["body.1", "body.3"]).eval()
    x = torch.rand(2, 3, 8, 8)
    compiled = torch.compile(clf.forward_features, backend="eager", fullgraph=True)
    with torch.no_grad():
        (a, fa), (b, fb) = compiled(x), clf.forward_features(x)
        (a2, fa2) = compiled(x + 1)  # a second call: hooks re-armed, fresh maps
        ref2 = clf.forward_features(x + 1)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(fa, fb))
    assert torch.equal(a2, ref2[0]) and all(torch.equal(p, q) for p, q in zip(fa2, ref2[1]))
    assert all(h.out is None for h in clf._hooks)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_bad_feature_layers_are_refused():
    net = TwoConv()
    with pytest.raises(ValueError, match=r"no layer 'body\.9'.*body, pair, head"):
        Classifier(net, feature_layers=["body.9"])
    with pytest.raises(ValueError, match="listed twice"):
        Classifier(net, feature_layers=["body", "body"])
    tokens = Classifier(Tokens(), feature_layers=["block"])
    with pytest.raises(ValueError, match=r"token map of shape \(1, 64, 6\).*convolutional layer"):
        _ = tokens.feature_channels
    assert Classifier(Tokens(), feature_layers=["patch"]).feature_channels == [6]
    with pytest.raises(ValueError, match=r"shape \(1, 2\), not a feature map"):
        _ = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)),
                       feature_layers=["1"]).feature_channels

    class Named(nn.Module):  # a block that returns a dict
        def forward(self, x):
            return {"x": x}

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Named()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.block(x)["x"].mean((2, 3)))

    with pytest.raises(ValueError, match="'block' returns dict, not a tensor"):
        _ = Classifier(DictNet(), feature_layers=["block"]).feature_channels
    # a conv whose output a ReLU(inplace=True) overwrites: its captured values would be wrong
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' is modified in place.*\(e\.g\. by a ReLU"):
        _ = Classifier(inplace, feature_layers=["0"]).feature_channels
    assert Classifier(inplace, feature_layers=["1"]).feature_channels == [4]
    # a module that runs twice per forward (Cohen's blocks reuse their ReLU)
    with pytest.raises(ValueError, match="runs more than once"):
        _ = Classifier(ResNet(8), feature_layers=["layer1.0.relu"]).feature_channels
    # TorchScript: submodules cannot be hooked; unfused works
    scripted = torch.jit.script(TwoConv().eval())
    with pytest.raises(ValueError, match="TorchScript"):
        Classifier(scripted, feature_layers=["body"])
    plain = Classifier(scripted)
    assert plain.feature_layers == [] and plain.forward_features(torch.rand(1, 3, 8, 8))[1] == []


# ---- rejector stems ------------------------------------------------------------------------------

def test_stem_choice():
    assert STEMS == ("cifar", "strided", "auto")
    assert [resolve_stem("auto", s) for s in (None, 32, 64, 65, 224)] == \
        ["cifar", "cifar", "cifar", "strided", "strided"]
    assert resolve_stem("strided", 32) == "strided" and resolve_stem("cifar", 224) == "cifar"
    with pytest.raises(ValueError, match="cifar, strided, auto.*'imagenet'"):
        Rejector(3, [], stem="imagenet")
    old = Rejector(3, [4, 8], width=4, blocks=(1, 1), fc_hidden=(8,))  # today's default: cifar
    strided = Rejector(3, [4, 8], width=4, blocks=(1, 1), fc_hidden=(8,), stem="auto",
                       image_size=224)
    assert old.stem_kind == "cifar" and strided.stem_kind == "strided"
    assert list(old.state_dict()) == list(strided.state_dict())  # same keys: old files load
    assert old.stem[0].weight.shape == (4, 3, 3, 3) and strided.stem[0].weight.shape == (4, 3, 7, 7)


def test_strided_stem_is_cheaper_at_224_with_the_same_output():
    torch.manual_seed(0)
    kw = dict(num_classes=3, feature_channels=[5, 6], width=4, blocks=(1, 1, 1, 1), fc_hidden=(8,))
    cifar, strided = Rejector(**kw, stem="cifar"), Rejector(**kw, stem="strided").train()
    z = torch.rand(1, 3, 224, 224)
    feats = [torch.rand(1, 5, 56, 56), torch.rand(1, 6, 28, 28)]
    c_flops, s_flops = count_flops(cifar, z, feats), count_flops(strided, z, feats)
    # every stage sees 1/16 of the pixels; the 7x7 stem conv (at 1/2) takes back some of it
    assert 0 < 4 * s_flops < c_flops
    assert strided.training and all(m.training for m in strided.modules())  # mode restored
    with torch.no_grad():
        assert cifar.eval()(z, feats).shape == strided.eval()(z, feats).shape == (1, 3)


def test_count_flops_and_format():
    lin = nn.Linear(10, 5)
    assert count_flops(lin, torch.rand(3, 10)) == 2 * 10 * 5 * 3  # a multiply-add is two FLOPs
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    assert count_flops(conv, torch.rand(1, 2, 6, 6)) == 2 * (2 * 9) * 4 * 36
    assert format_gflops(4_130_000_000) == "4.13 GFLOP"
    assert format_gflops(2.5e8, digits=1) == "0.2 GFLOP"


# ---- features-only rejector ----------------------------------------------------------------------

def test_feature_rejector_shapes_gradient_and_errors():
    torch.manual_seed(0)
    rej = FeatureRejector(4, [5, 7], hidden=(16, 8), image_size=32)
    assert [m.out_features for m in rej.mlp if isinstance(m, nn.Linear)] == [16, 8, 4]
    assert rej.mlp[0].in_features == 12
    feats = [torch.rand(3, 5, 8, 8, requires_grad=True), torch.rand(3, 7, 4, 4, requires_grad=True)]
    out = rej(torch.rand(3, 3, 32, 32), feats)
    assert out.shape == (3, 4)
    out.sum().backward()
    assert all(f.grad is None for f in feats)  # detached: the classifier never gets gradient
    assert all(p.grad is not None for p in rej.parameters())
    # only each map's global mean enters: shifting a map changes the output, flipping it does not
    with torch.no_grad():
        a = rej(None, feats)
        b = rej(None, [feats[0], feats[1] + 1.0])
        c = rej(None, [feats[0].flip(-1), feats[1].flip(-2)])
    assert not torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6)
    with pytest.raises(ValueError, match=r"unfused.*set classifier\.feature_layers=\[\.\.\.\]"):
        FeatureRejector(4, [])
    with pytest.raises(ValueError, match=r"channels \[5\], built for \[5, 7\]"):
        rej(None, feats[:1])
