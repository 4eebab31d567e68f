"""The whole model: the builder's layout, checkpoints in both layouts, the converter, and
training steps of fused against reference on every backend that implements both blocks."""
import copy
import logging

import pytest
import torch
from torch import nn

from convmixer_kernels import (ConvMixer, FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock,
                               fuse_convmixer, plan_fusion, to_official_layout, to_timm_layout, unfuse_convmixer)
from convmixer_kernels.verify import compare_steps, compare_train_then_eval, format_rows, three_copies
from harness import DEVICE, make_inputs, model_backends, randomize_
from reference_impls import OfficialResidual, TimmStyleConvMixer, official_convmixer

SMALL = dict(dim=8, depth=2, kernel_size=3, patch_size=2, n_classes=5)


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, FusedConvMixerLayer)]


def test_official_keys_and_shapes():
    model = ConvMixer(16, 3, 9, 7, n_classes=10)
    keys = list(model.state_dict())
    assert keys[:2] == ["0.weight", "0.bias"]
    for k in ["3.0.fn.0.weight", "3.0.fn.2.running_var", "3.1.weight", "3.3.num_batches_tracked", "8.weight"]:
        assert k in keys, k
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # the patch embedding floors: 32x32 with p=7 gives a 4x4 grid (design.md 5.11)
    assert model[:3](torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("activation,module", [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU(approximate="tanh")),
                                               ("relu", nn.ReLU())])
def test_activation_option(activation, module):
    model = ConvMixer(8, 1, activation=activation, fused=True)
    acts = [m for m in model.modules() if isinstance(m, (nn.GELU, nn.ReLU))]
    assert len(acts) == 3 and all(repr(a) == repr(module) for a in acts)
    with pytest.raises(ValueError, match="activation"):
        ConvMixer(8, 1, activation="swish")


def test_fused_builder_same_keys_same_init_same_function():
    torch.manual_seed(0)
    ref = ConvMixer(**SMALL)
    torch.manual_seed(0)
    fused = ConvMixer(**SMALL, fused=True)
    assert list(fused.state_dict()) == list(ref.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(_fused_layers(fused)) == 2
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fused(x), ref(x))


def test_official_checkpoint_loads_strict_into_fused_and_converted():
    torch.manual_seed(1)
    official = randomize_(official_convmixer(**{k: v for k, v in SMALL.items()}))
    sd = official.state_dict()
    fused = ConvMixer(**SMALL, fused=True)
    fused.load_state_dict(sd, strict=True)
    converted = fuse_convmixer(copy.deepcopy(official))
    converted.load_state_dict(sd, strict=True)
    assert len(_fused_layers(converted)) == 2
    for m in (official, fused, converted):
        m.eval()
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fused(x), official(x))
    torch.testing.assert_close(converted(x), official(x))
    # and back: a fused model's state_dict is an official checkpoint
    again = official_convmixer(**SMALL)
    again.load_state_dict(fused.state_dict(), strict=True)


def test_timm_layout_state_dict_loads_into_fused():
    torch.manual_seed(2)
    timm_like = randomize_(TimmStyleConvMixer(8, 2, 3, 2, num_classes=5)).eval()
    sd = timm_like.state_dict()
    fused = ConvMixer(**SMALL, fused=True).eval()
    fused.load_state_dict(to_official_layout(sd), strict=True)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fused(x), timm_like(x))
    assert list(to_timm_layout(fused.state_dict())) == list(sd)
    with pytest.raises(ValueError, match="neither"):
        to_official_layout({"foo.weight": torch.zeros(1)})


def test_fuse_timm_style_model_in_place_and_unfuse():
    torch.manual_seed(3)
    model = randomize_(TimmStyleConvMixer(8, 2, 3, 2, num_classes=5))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    params_before = [p for p in model.parameters()]
    out = fuse_convmixer(model)
    assert out is model and list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # shared, not copied
    assert isinstance(model.blocks[0], FusedConvMixerLayer) and isinstance(model.blocks[0][0], FusedDepthwiseBlock)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(model(x), ref(x))
    unfuse_convmixer(model)
    assert not any(isinstance(m, (FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock))
                   for m in model.modules())
    assert type(model.blocks[0][0]).__name__ == "Residual" and type(model.blocks[0][0]).__module__ == "reference_impls"
    assert list(model.state_dict()) == keys


def test_real_timm_if_installed():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convmixer_768_32", pretrained=False, num_classes=10).eval()
    ref = copy.deepcopy(model)
    fuse_convmixer(model)
    assert len(_fused_layers(model)) == 32
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_optimizer_built_before_fusing_still_trains_the_model():
    torch.manual_seed(4)
    model = official_convmixer(**SMALL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fuse_convmixer(model)
    w = model[3][1].weight.detach().clone()
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    assert not torch.equal(w, model[3][1].weight)


def test_unfusable_blocks_left_alone_and_reported(caplog):
    model = official_convmixer(**SMALL)
    model[3][0].fn[0] = nn.Conv2d(8, 8, 3, groups=8, padding="same", dilation=2)
    model[4][1] = nn.Conv2d(8, 8, 1, stride=2)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        fuse_convmixer(model)
    assert isinstance(model[3], FusedConvMixerLayer) and isinstance(model[3][0], OfficialResidual)
    assert isinstance(model[4], nn.Sequential) and not isinstance(model[4], FusedConvMixerLayer)
    assert isinstance(model[4][0], FusedDepthwiseBlock)  # the layer's residual block still fuses
    assert "dilation" in caplog.text and "stride" in caplog.text
    plan = {c.path: c for c in plan_fusion(official_convmixer(**SMALL))}
    assert set(plan) == {"3", "3.0", "4", "4.0"} and all(c.fusable for c in plan.values())


def test_standalone_pointwise_sequence_is_fused():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.BatchNorm2d(6)), nn.Flatten())
    fuse_convmixer(model)
    assert isinstance(model[0], FusedPointwiseBlock)
    assert isinstance(unfuse_convmixer(model)[0], nn.Sequential)


def test_fusing_twice_is_harmless_and_sets_backend():
    model = ConvMixer(**SMALL, fused=True)
    fuse_convmixer(model, backend="torch")
    assert all(m.backend == "torch" for m in model.modules() if hasattr(m, "backend"))
    assert len(_fused_layers(model)) == 2


@pytest.mark.parametrize("backend", model_backends())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_model_training_steps_match_reference(backend, layout):
    torch.manual_seed(5)
    ref = randomize_(ConvMixer(**SMALL))
    fused, ref_d, ref64 = three_copies(ref, lambda m: fuse_convmixer(m, backend=backend), torch.float32, DEVICE)
    if layout == "channels_last":
        for m in (fused, ref_d, ref64):
            m.to(memory_format=torch.channels_last)
    xs = make_inputs((2, 3, 10, 10), 3, layout)
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:2], xs[2:], torch.float32)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    ran = {m.last_backend for m in fused.modules() if isinstance(m, (FusedConvMixerLayer, FusedDepthwiseBlock))}
    assert ran == {backend}


@pytest.mark.parametrize("backend", model_backends())
def test_model_under_autocast(backend):
    torch.manual_seed(6)
    ref = randomize_(ConvMixer(**SMALL))
    fused, ref_d, ref64 = three_copies(ref, lambda m: fuse_convmixer(m, backend=backend), torch.float32, DEVICE)
    rows = compare_steps(fused, ref_d, ref64, make_inputs((2, 3, 10, 10), 2), torch.float32, torch.bfloat16)
    assert all(r.ok for r in rows), format_rows(rows, only_failures=True)
    # parameters' gradients arrive in the parameters' dtype; BN buffers stay float32 (design.md 5.13)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fused(make_inputs((2, 3, 10, 10), 1)[0])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in fused.buffers())


@pytest.mark.parametrize("backend", model_backends())
def test_torch_compile_fullgraph(backend):
    """The fused model traces without graph breaks (aot_eager: no code generation needed on CPU)."""
    torch.manual_seed(7)
    model = randomize_(ConvMixer(**SMALL, fused=True, backend=backend)).to(DEVICE)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = make_inputs((2, 3, 10, 10), 1)[0]
    for train in (True, False):
        model.train(train), ref.train(train)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
