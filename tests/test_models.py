"""Networks, published state-dict layouts, checkpoint import/export, rejector and f_R."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize

from dsr_lightning.models import (
    ARCHS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CheckpointError,
    Classifier,
    DnCNN,
    MemNet,
    NormalizeLayer,
    Rejector,
    ResNet,
    SmoothingSystem,
    build_arch,
    freeze,
    load_checkpoint,
    save_checkpoint,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---- expected published layouts, written out independently of the model code ---------------------

def bn_keys(prefix: str, c: int) -> dict:
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (c,)) for n in BN}


def expected_resnet(depth: int, k: int = 10) -> dict:
    n = (depth - 2) // 6
    out = {"1.conv1.weight": (16, 3, 3, 3), **bn_keys("1.bn1", 16)}
    cin = 16
    for layer, c in ((1, 16), (2, 32), (3, 64)):
        for b in range(n):
            p = f"1.layer{layer}.{b}"
            out[f"{p}.conv1.weight"] = (c, cin if b == 0 else c, 3, 3)
            out.update(bn_keys(f"{p}.bn1", c))
            out[f"{p}.conv2.weight"] = (c, c, 3, 3)
            out.update(bn_keys(f"{p}.bn2", c))
            if b == 0 and layer > 1:
                out[f"{p}.downsample.0.weight"] = (c, cin, 1, 1)
                out.update(bn_keys(f"{p}.downsample.1", c))
        cin = c
    out["1.fc.weight"], out["1.fc.bias"] = (k, 64), (k,)
    return out


def expected_dncnn(depth: int = 17, c: int = 64) -> dict:
    out = {"dncnn.0.weight": (c, 3, 3, 3), "dncnn.0.bias": (c,)}
    for i in range(depth - 2):
        out[f"dncnn.{2 + 3 * i}.weight"] = (c, c, 3, 3)
        out.update(bn_keys(f"dncnn.{3 + 3 * i}", c))
    out[f"dncnn.{3 * depth - 4}.weight"] = (3, c, 3, 3)
    return out


def expected_memnet(c: int = 64, n_mem: int = 3, n_res: int = 6) -> dict:
    def unit(p, cin, cout, k):
        return {**bn_keys(f"{p}.bn", cin), f"{p}.conv.weight": (cout, cin, k, k)}

    out = {**unit("feature_extractor", 3, c, 3), **unit("reconstructor", c, 3, 3)}
    for m in range(n_mem):
        for r in range(n_res):
            for j in (1, 2):
                out.update(unit(f"dense_memory.{m}.recursive_unit.{r}.relu_conv{j}", c, c, 3))
        out.update(unit(f"dense_memory.{m}.gate_unit", (n_res + m + 1) * c, c, 1))
    return out


def shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,expected,count", [
    ("cifar_resnet20", expected_resnet(20), 128),
    ("cifar_resnet110", expected_resnet(110), 668),
    ("cifar_dncnn", expected_dncnn(17, 64), 93),
    ("cifar_dncnn_wide", expected_dncnn(17, 128), 93),
    ("memnet", expected_memnet(), 246),
])
def test_published_state_dict_layout(arch, expected, count):
    model = build_arch(arch)
    assert len(expected) == count and shapes(model) == expected


def test_distinctive_keys_and_numerics():
    r = shapes(build_arch("cifar_resnet20"))
    assert r["1.conv1.weight"] == (16, 3, 3, 3) and r["1.layer1.0.conv1.weight"] == (16, 16, 3, 3)
    assert r["1.layer2.0.downsample.0.weight"] == (32, 16, 1, 1)
    assert r["1.layer3.0.downsample.1.running_var"] == (64,) and r["1.fc.bias"] == (10,)
    assert "1.layer1.0.downsample.0.weight" not in r and not any(k.startswith("0.") for k in r)
    d = build_arch("cifar_dncnn")
    assert "dncnn.0.bias" in d.state_dict() and "dncnn.2.bias" not in d.state_dict()
    assert "dncnn.47.bias" not in d.state_dict()
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 15 and all(m.eps == 1e-4 and m.momentum == 0.95 for m in bns)
    m = shapes(build_arch("memnet"))
    assert m["dense_memory.0.recursive_unit.0.relu_conv1.bn.weight"] == (64,)
    assert m["dense_memory.0.gate_unit.conv.weight"] == (64, 7 * 64, 1, 1)
    assert m["dense_memory.2.gate_unit.conv.weight"] == (64, 9 * 64, 1, 1)
    mem_bns = [x for x in build_arch("memnet").modules() if isinstance(x, nn.BatchNorm2d)]
    assert all(x.eps == 1e-5 and x.momentum == 0.1 for x in mem_bns)
    assert set(ARCHS) >= {"cifar_resnet20", "cifar_resnet110", "cifar_dncnn", "cifar_dncnn_wide",
                          "memnet"}
    assert len(build_arch("cifar_resnet8").state_dict()) == len(expected_resnet(8))
    with pytest.raises(ValueError, match="6n\\+2"):
        build_arch("cifar_resnet21")


# ---- forward shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [20, 110])
def test_resnet_shapes_and_features(depth):
    torch.manual_seed(0)
    clf = build_arch(f"cifar_resnet{depth}").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = clf.forward_features(x)
        assert torch.equal(logits, clf(x))
    assert logits.shape == (2, 10) and clf.num_classes == 10
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert clf.feature_channels == [16, 32, 64]


def test_resnet_pool_is_bit_identical_to_reference_avgpool8():
    torch.manual_seed(0)
    net = randomize(ResNet(8))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = net.forward_features(x)
        ref = net.fc(nn.AvgPool2d(8)(feats[2]).view(3, -1))
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("arch,size", [("cifar_dncnn", 32), ("cifar_dncnn_wide", 32),
                                       ("memnet", 16)])
def test_denoiser_shapes(arch, size):
    torch.manual_seed(0)
    d = randomize(build_arch(arch))
    x = torch.rand(1 if arch == "memnet" else 2, 3, size, size)
    with torch.no_grad():
        y = d(x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_dncnn_fresh_is_identity_and_residual_form():
    d = DnCNN(depth=5, n_channels=16).eval()  # last conv zero-initialised
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(d(x), x)
    randomize(d)
    with torch.no_grad():
        assert torch.equal(d(x), x - d.dncnn(x))
    m = randomize(MemNet(channels=8, num_memblock=2, num_resblock=2))
    with torch.no_grad():
        assert not torch.equal(m(x), x)
        m.reconstructor.conv.weight.zero_()
        assert torch.equal(m(x), x)  # output = reconstructor(...) + x


# ---- normalisation wrapper -----------------------------------------------------------------------

def test_normalize_buffers_not_persistent_and_follow_to():
    layer = NormalizeLayer()
    assert layer.state_dict() == {} and dict(layer.named_buffers()).keys() == {"mean", "std"}
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    assert torch.equal(layer(x), (x - mean[:, None, None]) / std[:, None, None])
    layer64 = NormalizeLayer().to(torch.float64)
    assert layer64.mean.dtype == torch.float64 and layer64(x.double()).dtype == torch.float64
    assert NormalizeLayer().to("meta").std.device.type == "meta"
    clf = Classifier(ResNet(8)).to(torch.float64)
    assert clf(x.double()).dtype == torch.float64
    assert not any(k.startswith("0.") for k in clf.state_dict())


def test_classifier_wrapper_without_features():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    clf = Classifier(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 2, 2)
    logits, feats = clf.forward_features(x)
    assert feats == [] and torch.equal(logits, net((x - 0.5) / 0.25))
    assert clf.feature_channels == [] and list(clf.state_dict()) == ["1.1.weight", "1.1.bias"]


# ---- checkpoints ---------------------------------------------------------------------------------

def roundtrip(tmp_path, arch, sd, x, expected, name="ck.pth.tar"):
    path = tmp_path / name
    torch.save({"arch": arch, "state_dict": sd, "epoch": 90}, path)
    model = load_checkpoint(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    return model


@pytest.mark.parametrize("prefix", ["", "module.", "1.module.", "module.1.module."])
def test_load_published_classifier(tmp_path, prefix):
    src = randomize(build_arch("cifar_resnet20"), seed=1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = src(x)

    def rename(k):  # "1.conv1.weight" with the DataParallel variants as published
        return {"": k, "module.": "module." + k, "1.module.": "1.module." + k[2:],
                "module.1.module.": "module.1.module." + k[2:]}[prefix]

    sd = {rename(k): v for k, v in src.state_dict().items()}
    roundtrip(tmp_path, "cifar_resnet20", sd, x, expected)


def test_load_published_denoisers_and_old_pytorch_files(tmp_path):
    x = torch.rand(2, 3, 16, 16)
    for arch, kw in (("cifar_dncnn", {}), ("memnet", dict(channels=8, num_resblock=2))):
        src = randomize(build_arch(arch, **kw), seed=2)
        with torch.no_grad():
            expected = src(x)
        sd = {"module." + k: v for k, v in src.state_dict().items()}
        if arch == "cifar_dncnn":
            roundtrip(tmp_path, arch, sd, x, expected)
            old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
            roundtrip(tmp_path, arch, old, x, expected, name="old.pth.tar")  # PyTorch < 0.4.1
        else:  # non-standard sizes travel in arch_kwargs
            path = save_checkpoint(tmp_path / "m" / "checkpoint.pth.tar", src, arch, kw)
            with torch.no_grad():
                assert torch.equal(load_checkpoint(path)(x), expected)


def test_save_checkpoint_published_form(tmp_path):
    kw = dict(depth=5, n_channels=16)
    src = randomize(build_arch("cifar_dncnn", **kw), seed=3)
    path = save_checkpoint(tmp_path / "d.pth.tar", src, "cifar_dncnn", kw, epoch=4, sigma=0.25)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"arch", "state_dict", "arch_kwargs", "epoch", "sigma"}
    assert raw["arch"] == "cifar_dncnn" and raw["arch_kwargs"] == kw
    assert len(raw["state_dict"]) == 2 + 3 * 6 + 1
    ref = DnCNN(3, **kw)
    ref.load_state_dict(raw["state_dict"])  # the published loaders' way: plain strict load
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(x), src(x)) and torch.equal(ref.eval()(x), src(x))
    clf = randomize(build_arch("cifar_resnet8"))
    raw = torch.load(save_checkpoint(tmp_path / "c.pth.tar", nn.DataParallel(clf), "cifar_resnet8"),
                     weights_only=True)
    assert "arch_kwargs" not in raw and next(iter(raw["state_dict"])) == "1.conv1.weight"
    rej_kw = dict(num_classes=4, feature_channels=(16, 32, 64), width=8, blocks=(1, 1, 1, 1),
                  fc_hidden=(32, 16))
    rej = randomize(Rejector(**rej_kw))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "r.pth.tar", rej, "rejector", rej_kw))
    assert all(torch.equal(a, b) for a, b in zip(rej.state_dict().values(),
                                                 loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="missing keys"):  # bare net saved as classifier
        save_checkpoint(tmp_path / "bad.pth.tar", clf[1], "cifar_resnet8")
    assert not (tmp_path / "bad.pth.tar").exists()
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "bad.pth.tar", clf, "cifar_resnet8", state_dict={})


def test_checkpoint_errors(tmp_path):
    good = build_arch("cifar_resnet20").state_dict()
    missing = tmp_path / "nope.pth.tar"
    with pytest.raises(CheckpointError, match="not found.*nope.pth.tar"):
        load_checkpoint(missing)

    def write(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    cases = [
        (write("arch.pth", {"arch": "cifar_vgg", "state_dict": good}),
         ["arch.pth", "cifar_vgg", "cifar_resnet110", "memnet", "cifar_dncnn_wide"]),
        (write("tensor.pth", torch.zeros(3)), ["tensor.pth", "expected a dict", "Tensor"]),
        (write("nosd.pth", {"arch": "memnet", "model": {}}), ["nosd.pth", "state_dict", "model"]),
        (write("noarch.pth", {"state_dict": good}), ["noarch.pth", "no 'arch'"]),
        (write("miss.pth", {"arch": "cifar_resnet20",
                            "state_dict": {k: v for k, v in good.items() if "fc" not in k}}),
         ["miss.pth", "missing keys (2)", "1.fc.weight", "1.fc.bias"]),
        (write("extra.pth", {"arch": "cifar_resnet20",
                             "state_dict": {**good, "1.head.weight": torch.zeros(2)}}),
         ["extra.pth", "unexpected keys (1)", "1.head.weight"]),
        (write("shape.pth", {"arch": "cifar_resnet20", "state_dict": {
            **good, "1.fc.weight": torch.zeros(100, 64), "1.fc.bias": torch.zeros(100)}}),
         ["shape.pth", "shape mismatches (2)", "1.fc.weight: file (100, 64) vs model (10, 64)"]),
        (write("depth.pth", {"arch": "cifar_resnet110", "state_dict": good}),
         # 540 absent entries, less the 90 num_batches_tracked that are tolerated
         ["depth.pth", "cifar_resnet110", "missing keys (450)", "1.layer1.3.conv1.weight",
          "(445 more)"]),
    ]
    for path, parts in cases:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert isinstance(info.value, ValueError)
        assert all(p in str(info.value) for p in parts), (str(info.value), parts)
    with pytest.raises(CheckpointError, match="holds arch 'cifar_resnet20'"):
        load_checkpoint(write("ok.pth", {"arch": "cifar_resnet20", "state_dict": good}),
                        arch="cifar_dncnn")


# ---- rejector ------------------------------------------------------------------------------------

def tiny_rejector(**kw):
    return Rejector(num_classes=10, feature_channels=[16, 32, 64], width=8, blocks=(1, 1, 1, 1),
                    fc_hidden=(32, 16), **kw)


def test_rejector_stage_channels():
    for proj, ins, out in ((None, [8, 8 + 16, 16 + 32, 32 + 64], 64),
                           (4, [8, 12, 20, 36], 64), ([2, 3, 5], [8, 10, 19, 37], 64)):
        rej = tiny_rejector(proj_channels=proj)
        assert [s[0].conv1.in_channels for s in rej.stages] == ins == rej.stage_in_channels
        assert rej.fc[0].in_features == out and rej.fc[-1].out_features == 10
        assert [m.out_features for m in rej.fc if isinstance(m, nn.Linear)] == [32, 16, 10]
    four = Rejector(3, [4, 4, 4, 4], width=8, blocks=(1, 1, 1, 1), fc_hidden=(8, 8))
    assert four.fc[0].in_features == 64 + 4  # a 4th feature map enters before the pool


def test_rejector_uses_every_feature_map_and_z():
    torch.manual_seed(0)
    clf = randomize(build_arch("cifar_resnet8"))
    rej = tiny_rejector().eval()  # default init: no dead units
    z = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = clf.forward_features(z)
        base = rej(z, feats)
        assert base.shape == (2, 10)
        for k in range(3):
            bumped = list(feats)
            bumped[k] = feats[k] + torch.randn_like(feats[k])
            assert not torch.allclose(rej(z, bumped), base), f"feature {k} ignored"
        assert not torch.allclose(rej(z + 0.1 * torch.randn_like(z), feats), base)
        half = [F.avg_pool2d(f, 2) for f in feats]  # other spatial sizes are resized
        assert rej(z, half).shape == (2, 10)
    with pytest.raises(ValueError, match="3 feature maps"):
        rej(z, feats[:2])
    leaves = [f.clone().requires_grad_(True) for f in feats]
    rej(z, leaves).sum().backward()  # the classifier's features are detached inside
    assert all(f.grad is None for f in leaves) and rej.stem[0].weight.grad is not None


# ---- f_R -----------------------------------------------------------------------------------------

def test_only_rejector_gets_gradient():
    torch.manual_seed(0)
    clf = build_arch("cifar_resnet8")  # deliberately not frozen: the system must isolate it
    den = DnCNN(depth=4, n_channels=8)
    rej = tiny_rejector()
    system = SmoothingSystem(clf, den, rej).train()
    assert not clf.training and not den.training and rej.training
    out = system.outputs(torch.rand(4, 3, 32, 32))
    pred = out["pred"]
    head = out["head_logits"].gather(1, pred[:, None]).squeeze(1)
    F.binary_cross_entropy_with_logits(head, torch.tensor([0.0, 1.0, 1.0, 0.0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rej.fc.parameters())
    assert all(p.grad is not None for p in rej.parameters())
    assert all(p.grad is None for p in [*clf.parameters(), *den.parameters()])


class StubClassifier(nn.Module):
    """logits = the first K pixels of z; no features."""

    num_classes = 4

    def forward(self, z):
        return z.flatten(1)[:, :4]

    def forward_features(self, z):
        return self(z), []


class StubRejector(nn.Module):
    """head logits = pixels K..2K-1 of z."""

    num_classes = 4

    def forward(self, z, feats):
        return z.flatten(1)[:, 4:8]


def test_smoothing_system_labels():
    torch.manual_seed(0)
    x = torch.randn(500, 1, 1, 8)
    x[:50, 0, 0, 4:8] = 0.3  # exactly at the threshold below: not rejected
    for thr in (0.0, 0.3):
        system = SmoothingSystem(StubClassifier(), None, StubRejector(), threshold=thr)
        with torch.inference_mode():
            out = system.outputs(x)
            labels = system(x)
        assert system.num_classes == 4 and labels.dtype == torch.long
        flat = x.flatten(1)
        for i in range(len(x)):
            p = int(flat[i, :4].argmax())
            want = 4 if flat[i, 4 + p] > thr else p
            assert int(labels[i]) == want and int(out["pred"][i]) == p
        assert torch.equal(out["reject"], labels == 4) and torch.equal(out["denoised"], x)
        assert 0 < int(out["reject"].sum()) < len(x)
    plain = SmoothingSystem(StubClassifier(), denoiser=nn.Identity())
    out = plain.outputs(x)
    assert out["head_logits"] is None and not out["reject"].any()
    assert torch.equal(out["label"], x.flatten(1)[:, :4].argmax(1)) and (out["label"] < 4).all()


def test_smoothing_system_real_models_under_inference_mode():
    torch.manual_seed(0)
    clf = freeze(randomize(build_arch("cifar_resnet8")))
    den = freeze(randomize(DnCNN(depth=4, n_channels=8)))
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    noisy = torch.rand(6, 3, 32, 32)
    for rej in (None, randomize(tiny_rejector())):
        system = SmoothingSystem(clf, den, rej).eval()
        with torch.inference_mode():
            out = system.outputs(noisy)
            assert torch.equal(out["denoised"], den(noisy))
            assert torch.equal(out["logits"], clf(den(noisy)))
        hi = 10 if rej is not None else 9
        assert out["label"].shape == (6,) and ((out["label"] >= 0) & (out["label"] <= hi)).all()
