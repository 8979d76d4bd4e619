"""The registry's weight loader (pathology.encoders.weights, DenseNet layouts in pathology.encoders.densenet):
every key of official-KimiaNet and torchvision (old and new style) files maps; wrong files fail in one line.

Loaded as `histo train --encoder NAME [--norm N] --init FILE` and `histo index --encoder NAME --weights FILE`
do: `load_weights` into the network of the entry (`encoder_entry`, with the norm when one is chosen).
Features from loaded files, poolings and the other refusals: tests/test_encoders.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from histo.errors import InputFileError
from pathology.encoders import load_weights
from pathology.kimianet import encoder_entry, random_init_checkpoint


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A DenseNet-121 backbone whose every tensor (running stats, counters included) is distinct."""
    torch.manual_seed(0)
    network = encoder_entry("kimianet").network()
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, v in network.state_dict().items():
        if v.is_floating_point():
            state[k] = torch.rand(v.shape, generator=g) + 0.1
        else:
            state[k] = torch.randint(1, 1000, v.shape, generator=g)
    return state


def _old_style(key: str) -> str:
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


def load(path, norm: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(network, weights record) of `path` loaded into the kimianet entry's network with `norm`, as
    `histo train --encoder kimianet --norm NORM --init FILE` does."""
    entry = encoder_entry("kimianet", norm)
    network = entry.network()
    return network, load_weights(network, path, entry)


def _load_and_compare(path, source, drop_counters=False):
    entry = encoder_entry("kimianet")
    network = entry.network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_weights(network, path, entry)
    after = network.state_dict()
    for k, v in source.items():
        if drop_counters and k.endswith("num_batches_tracked"):
            assert torch.equal(after[k], before[k])
        else:
            assert torch.equal(after[k], v), k
    return report


def test_kimianet_official_layout(tmp_path, source):
    state = {f"module.model.0.{k}": v for k, v in source.items()}
    state["module.fc_4.weight"] = torch.randn(30, 1024)
    state["module.fc_4.bias"] = torch.randn(30)
    torch.save(state, tmp_path / "KimiaNetPyTorchWeights.pth")
    report = _load_and_compare(tmp_path / "KimiaNetPyTorchWeights.pth", source)
    assert report["layout"] == "KimiaNet (official)" and report["tensors_loaded"] == len(source) == 725


def test_torchvision_new_style(tmp_path, source):
    state = {f"features.{k}": v for k, v in source.items()}
    state["classifier.weight"], state["classifier.bias"] = torch.randn(1000, 1024), torch.randn(1000)
    torch.save(state, tmp_path / "densenet121.pth")
    assert _load_and_compare(tmp_path / "densenet121.pth", source)["layout"] == "torchvision"


def test_torchvision_old_style_without_counters(tmp_path, source):
    state = {
        f"features.{_old_style(k)}": v for k, v in source.items() if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    state["classifier.weight"], state["classifier.bias"] = torch.randn(1000, 1024), torch.randn(1000)
    torch.save(state, tmp_path / "densenet121-a639ec97.pth")
    report = _load_and_compare(tmp_path / "densenet121-a639ec97.pth", source, drop_counters=True)
    assert report["tensors_loaded"] == 604  # torchvision's 606 minus the 1000-class head


def test_histo_checkpoint_of_another_arch_is_refused(tmp_path):
    path = random_init_checkpoint(tmp_path / "cbr.pt", arch="cbr-tiny")
    with pytest.raises(InputFileError, match=r"a histo checkpoint \(cbr-tiny, norm 'batch'\)") as e:
        load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_foreign_densenet169_lists_missing_and_unexpected(tmp_path, source):
    state = {f"features.{k}": v for k, v in source.items() if "denseblock3.denselayer24" not in k}
    state["features.denseblock3.denselayer25.conv1.weight"] = torch.randn(128, 1024, 1, 1)
    state["features.norm5.weight"] = torch.randn(1664)
    torch.save(state, tmp_path / "densenet169.pth")
    with pytest.raises(InputFileError) as e:
        load(tmp_path / "densenet169.pth")
    msg = str(e.value)
    assert "\n" not in msg and "densenet169.pth" in msg
    assert "missing (features." not in msg  # keys are shown relative to the backbone
    assert re.search(r"\d+ missing \(denseblock3\.denselayer24\.", msg)
    assert "1 unexpected (denseblock3.denselayer25.conv1.weight)" in msg
    assert "1 shape mismatches (norm5.weight (1664,))" in msg


def test_norm_mismatch_is_reported(tmp_path, source):
    torch.save({f"features.{k}": v for k, v in source.items()}, tmp_path / "bn.pth")
    with pytest.raises(InputFileError, match=r"missing \(denseblock1\.denselayer1\.norm1\.BN"):
        load(tmp_path / "bn.pth", norm="ibn_a")


def test_a_unet_checkpoint_is_refused_by_kind(tmp_path):
    from segmentation.infer import save_model
    from segmentation.unet import UNet3D

    save_model(tmp_path / "unet.pt", UNet3D(channels=(2, 4), blocks_per_level=1, expansion=1), {})
    with pytest.raises(InputFileError) as e:
        load(tmp_path / "unet.pt")
    assert str(e.value) == (
        f"{tmp_path / 'unet.pt'}: is a 3D U-Net segmentation model (histo segment train), "
        "expected a KimiaNet feature extractor (histo train)"
    )


def _ibn_net_densenet121_state() -> dict[str, torch.Tensor]:
    """The state dict of the authors' `densenet121_ibn_a()` (XingangPan/IBN-Net `ibnnet/densenet_ibn.py`),
    rebuilt from their construction rules: `IBN(C, 0.4)` (BN on the first int(C * 0.6) channels, IN on the
    rest) as `norm1` of every third dense layer of blocks 1-3, BatchNorm at every other norm."""
    g = torch.Generator().manual_seed(2)
    state: dict[str, torch.Tensor] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean"):
            state[f"{prefix}.{name}"] = torch.randn(c, generator=g)
        state[f"{prefix}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    state["features.conv0.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    bn("features.norm0", 64)
    c = 64
    for b, layers in enumerate((6, 12, 24, 16)):
        for i in range(layers):
            prefix, cin = f"features.denseblock{b + 1}.denselayer{i + 1}", c + 32 * i
            if b < 3 and i % 3 == 0:
                half = int(cin * (1 - 0.4))
                bn(f"{prefix}.norm1.BN", half)
                state[f"{prefix}.norm1.IN.weight"] = torch.randn(cin - half, generator=g)
                state[f"{prefix}.norm1.IN.bias"] = torch.randn(cin - half, generator=g)
            else:
                bn(f"{prefix}.norm1", cin)
            state[f"{prefix}.conv1.weight"] = torch.randn(128, cin, 1, 1, generator=g)
            bn(f"{prefix}.norm2", 128)
            state[f"{prefix}.conv2.weight"] = torch.randn(32, 128, 3, 3, generator=g)
        c += 32 * layers
        if b < 3:
            bn(f"features.transition{b + 1}.norm", c)
            state[f"features.transition{b + 1}.conv.weight"] = torch.randn(c // 2, c, 1, 1, generator=g)
            c //= 2
    bn("features.norm5", c)
    state["classifier.weight"], state["classifier.bias"] = torch.randn(1000, c), torch.randn(1000)
    return state


def test_ibn_net_densenet121_ibn_a_weights_load_and_split_as_the_authors(tmp_path):
    state = _ibn_net_densenet121_state()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "densenet121_ibn_a.pth"
    )
    network, report = load(tmp_path / "densenet121_ibn_a.pth", norm="ibn_a")
    loaded = network.state_dict()
    assert report["tensors_loaded"] == len(state) - 2 == len(loaded) and report["ignored"]["tensors"] == 2
    backbone = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    assert all(torch.equal(loaded[k], v) for k, v in backbone.items())
    block = network.denseblock1.denselayer1.norm1.eval()
    x = torch.randn(2, 64, 5, 5)
    prefix = "features.denseblock1.denselayer1.norm1"
    w, b = state[f"{prefix}.BN.weight"], state[f"{prefix}.BN.bias"]
    mean, var = state[f"{prefix}.BN.running_mean"], state[f"{prefix}.BN.running_var"]
    view = (1, -1, 1, 1)
    bn_ref = (x[:, :38] - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5) * w.view(view) + b.view(view)
    rest = x[:, 38:]
    z = (rest - rest.mean((2, 3), keepdim=True)) / torch.sqrt(
        rest.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    in_ref = z * state[f"{prefix}.IN.weight"].view(view) + state[f"{prefix}.IN.bias"].view(view)
    torch.testing.assert_close(block(x), torch.cat([bn_ref, in_ref], 1), rtol=1e-5, atol=1e-5)
