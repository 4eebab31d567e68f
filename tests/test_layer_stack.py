"""The fused layer stack (ops/layer_stack.py, stack.py): whole ConvMixer models (depth >= 3, so the
cross-layer algebra — BatchNorm's apply folded into the next layer's depthwise conv and into the GEMM's
operand — is exercised) against the float64 reference under the precision rule: outputs, the input
gradient, every parameter gradient and every BatchNorm buffer, training then eval.

``TorchAlgebra`` runs the stack's algebra and hand-written backward on the torch launchers
(ops/torch), so every configuration is checked quickly on CPU; the Triton stack runs the same tests
under the interpreter on smaller grids. Saved-for-backward bytes are measured with
saved_tensors_hooks, not asserted from constants.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from convmixer_kernels import ConvMixer, FusedSequential, fuse_convmixer, unfuse_convmixer
from convmixer_kernels import backends
from convmixer_kernels.verify import compare_train_then_eval, format_rows

from harness import ACTIVATIONS, DEVICE, make_inputs, randomize_

TRITON = backends.environment_reason("triton", DEVICE) is None


class TorchAlgebra(FusedSequential):
    """A FusedSequential whose stacks run on the torch launchers (the module's own torch backend runs
    the layers' reference composition instead)."""

    def _choose(self, x, specs, cdtype):
        name, why = super()._choose(x, specs, cdtype)
        return ("torch", "") if name is None and why == "the torch backend" else (name, why)


def _stack_backends():
    out = ["torch-algebra"]
    if TRITON:
        out.append("triton")
    return out


def _model(dim=6, depth=3, k=3, activation="gelu", patch=1, n_classes=5, bn_kwargs=None):
    model = ConvMixer(dim, depth, k, patch, n_classes, activation=activation)
    if bn_kwargs:  # every BatchNorm rebuilt with these arguments (affine decides which parameters exist)
        for _, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(parent, name, nn.BatchNorm2d(child.num_features, **bn_kwargs))
    # seed 0: a well-conditioned model. With seed 3 PyTorch's own float32 error on the first layer's
    # BatchNorm gradients is ~1e-5 relative and varies 2-5x between its NCHW and channels_last runs, so
    # "within 2x of PyTorch's error" would depend on which layout PyTorch happened to run.
    return randomize_(model, seed=0)


def _fuse(backend: str, memory: str = "low"):
    def make(m):
        if backend == "torch-algebra":
            m = fuse_convmixer(m, "torch", stack=False)
            return TorchAlgebra.from_module(m, "torch", memory)
        return fuse_convmixer(m, backend, memory=memory)
    return make


def _check(backend, *, dtype=torch.float32, shape=(4, 3, 6, 6), layout="nchw", memory="low", steps=2,
           autocast=None, **model_kwargs):
    ref = _model(**model_kwargs)
    fused = _fuse(backend, memory)(copy.deepcopy(ref)).to(DEVICE, dtype)
    ref_d = copy.deepcopy(ref).to(DEVICE, dtype if autocast is None else torch.float32)
    ref64 = copy.deepcopy(ref).to(DEVICE, torch.float64)
    if autocast is not None:
        fused.float()
    if layout == "channels_last":
        for m in (fused, ref_d, ref64):
            m.to(memory_format=torch.channels_last)
    xs = make_inputs(shape, steps + 1, layout)
    rows = compare_train_then_eval(fused, ref_d, ref64, xs[:steps], xs[steps:], autocast or dtype, autocast)
    bad = [r for r in rows if not r.ok]
    assert not bad, "fused stack outside the precision rule:\n" + format_rows(rows, only_failures=True)
    fused.train()
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
        fused(xs[0].to(autocast or dtype))
    assert fused.last_stacked, "the layers did not run as one stack"
    return fused


@pytest.mark.parametrize("backend", _stack_backends())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stack_matches_float64_reference(backend, activation):
    _check(backend, activation=activation)


@pytest.mark.parametrize("backend", _stack_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stack_dtypes_and_layouts(backend, dtype, layout):
    _check(backend, dtype=dtype, layout=layout)


@pytest.mark.parametrize("backend", _stack_backends())
@pytest.mark.parametrize("memory", ["low", "lowest"])
def test_stack_even_kernel_odd_map_and_memory_modes(backend, memory):
    # k = 4 pads more at the bottom/right; a 5x7 map puts padding on every border of every layer
    _check(backend, k=4, shape=(2, 3, 5, 7), memory=memory)


def test_stack_kernel_larger_than_the_map():
    _check("torch-algebra", k=7, shape=(2, 3, 4, 4), depth=3)


@pytest.mark.parametrize("bn_kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)])
def test_stack_batchnorm_variants(bn_kwargs):
    _check("torch-algebra", bn_kwargs=bn_kwargs)


def test_stack_under_autocast_bf16():
    _check("torch-algebra", dtype=torch.float32, autocast=torch.bfloat16)


def test_state_dict_keys_and_strict_loads_both_ways():
    ref = _model()
    fused = fuse_convmixer(copy.deepcopy(ref), "torch")
    assert isinstance(fused, FusedSequential)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    back = unfuse_convmixer(fused)
    assert type(back) is nn.Sequential and list(back.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(back.eval()(x), ref.eval()(x))


def test_convmixer_fused_memory_modes():
    """fused=True gives a FusedSequential; memory="normal" (the default, the fastest by the static model)
    trains block by block, "low" / "lowest" as one stack."""
    model = TorchAlgebra.from_module(ConvMixer(6, 3, 3, 1, 5, fused=True, backend="torch"), "torch")
    assert isinstance(ConvMixer(6, 3, 3, 1, 5, fused=True), FusedSequential)
    assert ConvMixer(6, 3, 3, 1, 5, fused=True).memory == "normal"
    x = torch.randn(2, 3, 5, 5)
    model(x)
    assert not model.last_stacked
    for memory in ("low", "lowest"):
        model.memory = memory
        model(x)
        assert model.last_stacked
    assert ConvMixer(6, 3, 3, 1, 5, fused=True, memory="lowest").memory == "lowest"
    with pytest.raises(ValueError, match="memory"):
        ConvMixer(6, 3, 3, 1, 5, fused=True, memory="tiny")


def test_torch_backend_runs_the_layers_one_by_one_and_says_so(caplog):
    model = ConvMixer(6, 3, 3, 1, 5, fused=True, backend="torch", memory="low")
    with caplog.at_level(logging.DEBUG, logger="convmixer_kernels"):
        model(torch.randn(2, 3, 5, 5))
    assert not model.last_stacked
    assert "one by one (the torch backend)" in caplog.text


def test_eval_runs_the_layers_one_by_one():
    model = TorchAlgebra.from_module(fuse_convmixer(_model(), "torch", stack=False), "torch", "low")
    model.eval()
    model(torch.randn(2, 3, 5, 5))
    assert not model.last_stacked
    model.train()
    model(torch.randn(2, 3, 5, 5))
    assert model.last_stacked


def test_a_layer_with_a_hook_breaks_the_stack_and_the_hook_runs():
    model = TorchAlgebra.from_module(fuse_convmixer(_model(), "torch", stack=False), "torch", "low")
    seen = []
    model[4].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(2, 3, 5, 5))
    assert seen and not model.last_stacked


def test_num_batches_tracked_counts_once_per_step():
    model = TorchAlgebra.from_module(fuse_convmixer(_model(), "torch", stack=False), "torch", "low")
    ref = _model()
    for m in (model, ref):
        m(torch.randn(2, 3, 5, 5))
    for (n, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        if n.endswith("num_batches_tracked"):
            assert int(b) == int(r) == 1, n


def _saved_bytes(model, x):
    """Bytes of activation-sized tensors autograd keeps for the backward (measured, not assumed)."""
    sizes = {}
    big = x.numel() // x.shape[1] * 6 // 2  # anything at least half an activation of 6 channels

    def pack(t):
        if t.numel() >= big:  # a tensor saved by several ops is kept once
            sizes[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(sizes.values()), out


@pytest.mark.parametrize("memory, most_activations_per_layer", [("low", 2.5), ("lowest", 1.5)])
def test_saved_bytes_per_layer(memory, most_activations_per_layer):
    depth = 4
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    ref = _model(depth=depth)
    fused = _fuse("torch-algebra", memory)(copy.deepcopy(ref))
    act_bytes = 2 * 6 * 8 * 8 * 4
    ref_bytes, _ = _saved_bytes(ref, x)
    fused_bytes, out = _saved_bytes(fused, x)
    assert fused.last_stacked
    # the stem and head save the same in both; compare the layers' share
    stem_head, _ = _saved_bytes(_model(depth=0), x)
    per_layer_ref = (ref_bytes - stem_head) / depth / act_bytes
    per_layer_fused = (fused_bytes - stem_head) / depth / act_bytes
    assert per_layer_ref >= 6, per_layer_ref
    assert per_layer_fused <= most_activations_per_layer, per_layer_fused
    out.sum().backward()


def test_double_backward_is_refused_with_the_fix():
    model = _fuse("torch-algebra")(_model())
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)


def test_compile_fullgraph_through_the_stack():
    model = _fuse("torch-algebra")(_model())
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), eager(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize("backend", _stack_backends())
@pytest.mark.parametrize("fold", ["prologue", "apply"])
def test_every_fold_choice_computes_the_same_function(backend, fold, monkeypatch):
    """Both ways of applying a BatchNorm inside the stack (on load, or by an apply pass into a temporary)
    meet the rule, whichever ``fold_plan`` would choose on this backend."""
    monkeypatch.setenv("CONVMIXER_KERNELS_FOLD", fold)
    _check(backend, dtype=torch.bfloat16 if backend == "triton" else torch.float32, layout="channels_last",
           activation="gelu_tanh")


def test_fold_plan_is_chosen_in_one_place(monkeypatch):
    from convmixer_kernels.ops.layer_stack import Folds, fold_plan

    assert fold_plan("torch", [0], [0]) == Folds(True, True, True)
    assert fold_plan("triton", [0], [0]) == Folds(False, False, False)  # the static evidence (docstring)
    monkeypatch.setenv("CONVMIXER_KERNELS_FOLD", "prologue")
    assert fold_plan("triton", [0], [0]) == Folds(True, True, True)
    monkeypatch.setenv("CONVMIXER_KERNELS_FOLD", "sideways")
    with pytest.raises(ValueError, match="CONVMIXER_KERNELS_FOLD"):
        fold_plan("triton", [0], [0])


def test_timm_style_model_trains_as_a_stack_and_converts_back():
    from reference_impls import TimmStyleConvMixer

    ref = randomize_(TimmStyleConvMixer(6, 3, 3, 1, num_classes=5), seed=0)
    fused = fuse_convmixer(copy.deepcopy(ref), "torch")
    assert isinstance(fused.blocks, FusedSequential)
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.blocks = TorchAlgebra.from_module(fused.blocks, "torch", "low")
    x = torch.randn(4, 3, 6, 6)
    out, expect = fused(x), ref(x)
    assert fused.blocks.last_stacked
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
    back = unfuse_convmixer(fused)
    assert type(back.blocks) is nn.Sequential
    ref.load_state_dict(back.state_dict(), strict=True)
