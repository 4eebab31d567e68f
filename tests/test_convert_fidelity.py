"""fuse_convmixer fuses only what it can reproduce exactly (issue 13): residual wrappers verified
to compute fn(x) + x, and blocks without hooks or parametrizations; everything else is left alone,
logged, with the state_dict and the output unchanged."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from convmixer_kernels import (ConvMixer, FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock,
                               fuse_convmixer, plan_fusion)
from convmixer_kernels.convert import residual_wrapper_problem
from reference_impls import OfficialResidual, Residual as TimmResidual, official_convmixer

SMALL = dict(dim=8, depth=2, kernel_size=3, patch_size=2, n_classes=5)


def _fn(dim=8, k=3):
    return nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), nn.GELU(), nn.BatchNorm2d(dim))


class LayerScaleResidual(nn.Module):  # x + g * fn(x): the name says Residual, the math does not
    def __init__(self, fn, dim=8):
        super().__init__()
        self.fn = fn
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.1))

    def forward(self, x):
        return x + self.gamma * self.fn(x)


class ScaledResidual(nn.Module):  # only fn as a child, but a constant factor in forward
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return 0.5 * self.fn(x) + x


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class DropPathResidual(nn.Module):
    def __init__(self, fn, p=0.5):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(p)

    def forward(self, x):
        return self.drop_path(self.fn(x)) + x


class StochasticResidual(nn.Module):  # drop path with no child of its own: reads self.training and self.p
    def __init__(self, fn, p=0.5):
        super().__init__()
        self.fn, self.p = fn, p

    def forward(self, x):
        if self.training and torch.rand(()) < self.p:
            return x
        return self.fn(x) + x


class Skip(nn.Module):  # exactly fn(x) + x under another name: fused (not decided by name)
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _layer_model(wrapper):
    torch.manual_seed(0)
    model = official_convmixer(**SMALL)
    for i in (3, 4):
        model[i][0] = wrapper(model[i][0].fn)
    return model


@pytest.mark.parametrize("wrapper", [OfficialResidual, TimmResidual, Skip,
                                     pytest.param(lambda fn: __import__("convmixer_kernels").Residual(fn),
                                                  id="package")])
def test_plain_residual_wrappers_are_verified_and_fused(wrapper):
    block = wrapper(_fn())
    assert residual_wrapper_problem(block) is None
    model = _layer_model(wrapper)
    fuse_convmixer(model, backend="torch")
    assert isinstance(model[3], FusedConvMixerLayer) and isinstance(model[3][0], FusedDepthwiseBlock)


@pytest.mark.parametrize("wrapper", [LayerScaleResidual, ScaledResidual, DropPathResidual, StochasticResidual])
def test_variant_residuals_are_left_alone_and_logged(wrapper, caplog):
    model = _layer_model(wrapper)
    ref = copy.deepcopy(model)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        fuse_convmixer(model, backend="torch")
    assert "residual block '3.0'" in caplog.text and "fn(x) + x" in caplog.text
    assert type(model[3][0]) is wrapper and type(model[4][0]) is wrapper  # not replaced
    assert isinstance(model[3], FusedConvMixerLayer)  # the pointwise half still fuses
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    for k, v in sd_before.items():
        assert torch.equal(sd[k], v), k
    plan = {c.path: c for c in plan_fusion(model)}
    assert not plan["3.0"].fusable and "fn(x) + x" in plan["3.0"].problem
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_standalone_variant_residual_is_returned_as_is():
    block = LayerScaleResidual(_fn())
    assert fuse_convmixer(block, backend="torch") is block
    assert "gamma" in dict(block.named_parameters())


def test_residual_overriding_call_is_refused():
    class Weird(Skip):
        def __call__(self, x):
            return 2 * super().__call__(x)

    assert "__call__" in residual_wrapper_problem(Weird(_fn()))


# ------------------------------------------------------------------ hooks and parametrizations


def _hooked(where):
    torch.manual_seed(1)
    model = ConvMixer(**SMALL)
    calls = []
    target = {"conv": model[3][0].fn[0], "bn": model[3][0].fn[2], "wrapper": model[3][0],
              "pointwise-bn": model[3][3], "layer": model[3]}[where]
    return model, target, calls


@pytest.mark.parametrize("where", ["conv", "bn", "wrapper", "pointwise-bn", "layer"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_blocks_with_hooks_stay_unfused_and_hooks_run(where, kind, caplog):
    model, target, calls = _hooked(where)
    if kind == "forward":
        target.register_forward_hook(lambda m, i, o: calls.append(m))
    else:
        target.register_forward_pre_hook(lambda m, i: calls.append(m))
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        fuse_convmixer(model, backend="torch")
    assert "hook" in caplog.text
    assert isinstance(model[4], FusedConvMixerLayer)  # the other layer is fused
    model(torch.randn(2, 3, 8, 8))
    assert calls == [target]  # the hook still runs, once per forward


def test_backward_hook_blocks_fusion(caplog):
    model, target, calls = _hooked("conv")
    target.register_full_backward_hook(lambda m, gi, go: calls.append(m))
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        fuse_convmixer(model, backend="torch")
    assert "backward hook" in caplog.text and not isinstance(model[3][0], FusedDepthwiseBlock)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert calls == [target]


def test_parametrized_conv_stays_unfused(caplog):
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(2)
    model = ConvMixer(**SMALL)
    parametrize.register_parametrization(model[3][1], "weight", Double())
    ref = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        fuse_convmixer(model, backend="torch")
    assert "parametrization" in caplog.text
    assert not isinstance(model[3], FusedConvMixerLayer) and isinstance(model[3][0], FusedDepthwiseBlock)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize("tool", ["prune", "weight_norm"])
def test_prune_and_legacy_weight_norm_stay_unfused_and_train(tool):
    torch.manual_seed(3)
    model = ConvMixer(**SMALL)
    conv = model[3][0].fn[0]
    if tool == "prune":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    else:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(conv)
    fuse_convmixer(model, backend="torch")
    assert not isinstance(model[3][0], FusedDepthwiseBlock)
    assert isinstance(model[3], FusedConvMixerLayer)
    for _ in range(2):  # the issue: the second backward failed
        model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_standalone_pointwise_with_hook_stays():
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
    block[0].register_forward_hook(lambda *a: None)
    assert not isinstance(fuse_convmixer(block, backend="torch"), FusedPointwiseBlock)


# ------------------------------------------------------------------ state_dict layouts (DDP, headless timm)


def test_to_official_layout_accepts_ddp_prefixed_state_dicts():
    from convmixer_kernels import to_official_layout, to_timm_layout
    from reference_impls import TimmStyleConvMixer

    torch.manual_seed(6)
    model = ConvMixer(**SMALL)
    sd = model.state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    assert list(to_official_layout(ddp)) == list(sd)
    compiled_ddp = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    assert list(to_official_layout(compiled_ddp)) == list(sd)
    timm_sd = TimmStyleConvMixer(8, 2, 3, 2, num_classes=5).state_dict()
    timm_ddp = {f"module.{k}": v for k, v in timm_sd.items()}
    assert list(to_official_layout(timm_ddp)) == list(to_official_layout(timm_sd))
    assert list(to_timm_layout(ddp)) == list(to_timm_layout(sd))
    ConvMixer(**SMALL).load_state_dict(to_official_layout(ddp), strict=True)


def test_to_official_layout_accepts_headless_timm():
    from convmixer_kernels import to_official_layout
    from reference_impls import TimmStyleConvMixer

    timm_model = TimmStyleConvMixer(8, 2, 3, 2, num_classes=5)
    timm_model.head = nn.Identity()  # what timm builds for num_classes=0
    sd = to_official_layout(timm_model.state_dict())
    model = ConvMixer(**SMALL)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["7.bias", "7.weight"] and unexpected == []
    torch.testing.assert_close(sd["3.0.fn.0.weight"], timm_model.blocks[0][0].fn[0].weight)
