"""Workloads and providers for ``pytest bench/`` and ``convmixer-kernels profile``.

A *workload* is one thing to time (the depthwise conv alone, the depthwise block, the
pointwise block, or the whole ConvMixer) in one mode ("fwd", "fwd+bwd", "train",
"infer") at one shape and dtype. A *provider* is one way to run it:

* ``eager``                    the reference modules in NCHW
* ``eager-cl``                 the same in channels_last (cuDNN for every conv)
* ``compile``, ``compile-max-autotune``   ``torch.compile`` of the reference
* ``fused-<backend>``          this package's fused modules on that backend
* a ``-cl`` suffix on any of them runs it in channels_last.

``run_case`` checks a provider against the float64 reference with the precision
rule of ``convmixer_kernels.verify`` *before* timing it, then times it on the GPU.

The depthwise conv alone ("dwconv") has no fused conv-only kernel. Its fused
provider is the closest one there is: the fused depthwise block in eval mode without
grad, which by the op contract (``ops/depthwise_block.py``) is ONE kernel computing
conv + bias + activation + BatchNorm affine (running statistics) + residual
(``EvalBlockAsConv``). It does strictly more than the conv, moves the same bytes (x
read, y written: design.md section 4), is checked against the unfused composition of
what it computes (not against the conv), and every record of it says so in
``computes``. It has forward only: the conv's backward is timed inside the
"dw_block" workload's fwd+bwd.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from convmixer_kernels import backends
from convmixer_kernels.convert import fuse_convmixer
from convmixer_kernels.model import ConvMixer
from convmixer_kernels.modules import FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock
from convmixer_kernels.ops.batchnorm import BatchNormCall
from convmixer_kernels.ops.depthwise_block import depthwise_block, depthwise_block_reference
from convmixer_kernels.verify import compare, format_rows

from .roofline import Cost, block_cost, convmixer_cost
from .timing import gpu_range, peak_memory_mb, rotation_count, time_cuda

PEERS = ("eager", "eager-cl", "compile", "compile-max-autotune")
REFERENCE = "eager"  # "reference_d" of the precision rule
CUDNN = "eager-cl"  # eager channels_last calls cuDNN for every conv (design.md section 2)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONV_ALONE_FUSED = "fused eval block: conv + affine + residual, one kernel"  # what "dwconv"'s fused provider times

# The paper's configurations (design.md section 1): name -> ConvMixer arguments and image size.
PAPER_CONFIGS = {
    "1536/20-k9-p7": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, activation="gelu", image_size=224),
    "768/32-k7-p7": dict(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu", image_size=224),
    "1024/20-k9-p14": dict(dim=1024, depth=20, kernel_size=9, patch_size=14, activation="gelu", image_size=224),
    "256/8-k5-p2": dict(dim=256, depth=8, kernel_size=5, patch_size=2, activation="gelu", image_size=32),
}


class NotApplicable(Exception):
    """This provider cannot run this workload (the reason says why); a skip, never a silent fallback."""


# ------------------------------------------------------------------ providers


@dataclass(frozen=True)
class Provider:
    name: str
    base: str  # "eager", "compile" or "fused"
    channels_last: bool
    compile_mode: Optional[str] = None
    backend: Optional[str] = None


def parse_provider(name: str) -> Provider:
    cl = name.endswith("-cl")
    base = name[:-3] if cl else name
    if base == "eager":
        return Provider(name, "eager", cl)
    if base == "compile":
        return Provider(name, "compile", cl, compile_mode="default")
    if base == "compile-max-autotune":
        return Provider(name, "compile", cl, compile_mode="max-autotune")
    if base.startswith("fused-") and base[len("fused-"):] in backends.BACKENDS:
        return Provider(name, "fused", cl, backend=base[len("fused-"):])
    raise ValueError(f"unknown provider {name!r}: use eager, compile, compile-max-autotune or fused-<backend> "
                     f"(backends: {', '.join(backends.BACKENDS)}), optionally with a '-cl' suffix")


def fused_providers(device="cuda", layouts=("", "-cl")) -> List[str]:
    """``fused-<backend>`` for every backend "auto" may use on ``device``, except the torch reference."""
    return [f"fused-{b}{suffix}" for b in backends.available_backends(device) if b != "torch" for suffix in layouts]


def bench_providers(device="cuda") -> List[str]:
    return list(PEERS) + fused_providers(device)


# ------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    op: str  # "dwconv", "dw_block", "pw_block" or "model"
    mode: str  # "fwd", "fwd+bwd" (ops); "train", "infer" (model)
    dim: int
    batch: int
    size: int  # H = W of the feature map (ops) or of the input image (model)
    kernel_size: int = 9
    activation: str = "gelu"
    depth: int = 0
    patch_size: int = 0
    dtype: str = "bf16"  # "bf16"/"fp16": autocast to it, float32 parameters; "fp32": no autocast
    config: str = ""  # a paper configuration's name, for the tables

    def __post_init__(self):
        ok = {"dwconv": ("fwd", "fwd+bwd"), "dw_block": ("fwd", "fwd+bwd"), "pw_block": ("fwd", "fwd+bwd"),
              "model": ("train", "infer")}
        if self.mode not in ok.get(self.op, ()):
            raise ValueError(f"workload {self.op!r} has no mode {self.mode!r} (modes: {ok.get(self.op)})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {list(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def autocast(self) -> Optional[torch.dtype]:
        return None if self.dtype == "fp32" else self.torch_dtype

    @property
    def elem_bytes(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    @property
    def backward(self) -> bool:
        return self.mode in ("fwd+bwd", "train")

    @property
    def training(self) -> bool:
        return self.mode != "infer"

    @property
    def shape(self) -> str:
        if self.op == "model":
            return f"{self.batch}x3x{self.size}x{self.size}"
        return f"{self.batch}x{self.dim}x{self.size}x{self.size}"

    def describe(self) -> str:
        what = {"dwconv": f"depthwise conv k{self.kernel_size}", "dw_block": f"depthwise block k{self.kernel_size}",
                "pw_block": "pointwise block",
                "model": f"ConvMixer-{self.dim}/{self.depth} k{self.kernel_size} p{self.patch_size}"}[self.op]
        prec = f"{self.dtype} autocast" if self.autocast else "fp32"
        return f"{what} {self.mode}, {self.shape}, {prec}"

    def cost(self, n_params: int = 0) -> Cost:
        if self.op == "model":
            return convmixer_cost(self.dim, self.depth, self.kernel_size, self.patch_size, self.size, self.batch,
                                  self.elem_bytes, n_params, training=self.training, n_classes=1000)
        return block_cost(self.op, self.batch, self.dim, self.size, self.size, self.kernel_size, self.elem_bytes,
                          training=self.training, backward=self.backward)

    def build_reference(self, seed: int = 0) -> nn.Module:
        """The reference module in float32 on the CPU, with random parameters and BatchNorm buffers."""
        torch.manual_seed(seed)
        c, k = self.dim, self.kernel_size
        if self.op == "dwconv":
            m = nn.Conv2d(c, c, k, groups=c, padding="same")
        elif self.op == "dw_block":  # the blocks as the package defines their references
            m = FusedDepthwiseBlock(c, k, self.activation, backend="torch").to_reference()
        elif self.op == "pw_block":
            m = FusedPointwiseBlock(c, activation=self.activation, backend="torch").to_reference()
        else:
            m = ConvMixer(c, self.depth, k, self.patch_size, n_classes=1000, activation=self.activation)
        gen = torch.Generator().manual_seed(seed + 1)
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            randomize_batchnorm_(bn, gen)
        return m.train(self.training)

    def make_inputs(self, device, batch: Optional[int] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random inputs (never zeros): x, and dy (fwd+bwd) or labels (train)."""
        gen = torch.Generator().manual_seed(seed)
        n = batch or self.batch
        if self.op == "model":
            x = torch.randn(n, 3, self.size, self.size, generator=gen)
            out = {"x": x.to(device)}
            if self.mode == "train":
                out["labels"] = torch.randint(0, 1000, (n,), generator=gen).to(device)
            return out
        act_dtype = self.torch_dtype  # a block's input is the previous layer's output, in the autocast dtype
        x = torch.randn(n, self.dim, self.size, self.size, generator=gen)
        out = {"x": x.to(device=device, dtype=act_dtype)}
        if self.backward:
            out["dy"] = torch.randn(n, self.dim, self.size, self.size, generator=gen).to(device=device, dtype=act_dtype)
        return out

    def input_bytes(self, inputs: Dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in inputs.values())


def randomize_batchnorm_(bn: nn.BatchNorm2d, gen: torch.Generator) -> nn.BatchNorm2d:
    """BatchNorm parameters and buffers away from their defaults (1, 0, 0, 1), so eval mode checks something."""
    with torch.no_grad():
        bn.weight.copy_(1 + 0.2 * torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
        bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
    return bn


def paper_workloads(op: str, modes, batch: int = 64, dtype: str = "bf16", configs=None) -> List[Workload]:
    """``op`` at every paper configuration (ops run at the layer's grid: image // patch)."""
    out = []
    for name, cfg in PAPER_CONFIGS.items():
        if configs and name not in configs:
            continue
        for mode in modes:
            if op == "model":
                out.append(Workload("model", mode, cfg["dim"], batch, cfg["image_size"], cfg["kernel_size"],
                                    cfg["activation"], cfg["depth"], cfg["patch_size"], dtype, name))
            else:
                grid = cfg["image_size"] // cfg["patch_size"]
                out.append(Workload(op, mode, cfg["dim"], batch, grid, cfg["kernel_size"], cfg["activation"],
                                    dtype=dtype, config=name))
    return out


# ------------------------------------------------------------------ preparing a provider


class EvalBlockAsConv(nn.Module):
    """The conv-alone workload's fused provider: the fused depthwise block in eval mode, without grad.

    By the op contract that is one kernel: ``y = x + scale * act(dwconv(x) + b) + shift``
    with ``scale``/``shift`` from fixed random BatchNorm running statistics (CONV_ALONE_FUSED).
    ``backend=None`` computes the same with the unfused reference composition, op for
    op: the module the precision rule checks this provider against.
    """

    def __init__(self, conv: nn.Conv2d, activation: str, backend: Optional[str], seed: int = 0):
        super().__init__()
        self.conv, self.activation, self.backend = conv, activation, backend
        bn = randomize_batchnorm_(nn.BatchNorm2d(conv.out_channels), torch.Generator().manual_seed(seed + 11))
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(f"bn_{name}", getattr(bn, name).detach().clone().to(conv.weight.device))
        self.last_backend: Optional[str] = None
        self._verdicts: dict = {}

    def forward(self, x):
        args = (self.bn_weight, self.bn_bias, self.bn_running_mean, self.bn_running_var)
        if self.backend is None:
            return depthwise_block_reference(x, self.conv.weight, self.conv.bias, *args, False, 0.0, self.eps,
                                             activation=self.activation, padding=self.conv.padding)
        with torch.no_grad():  # eval, no grad: the contract's one-kernel path (nothing kept for a backward)
            y, self.last_backend = depthwise_block(x, self.conv.weight, self.conv.bias,
                                                   BatchNormCall(*args, False, 0.0, self.eps),
                                                   activation=self.activation, padding=self.conv.padding,
                                                   backend=self.backend, verdicts=self._verdicts)
        return y


def conv_alone_provider(conv: nn.Conv2d, workload: "Workload", backend: str) -> Tuple[nn.Module, nn.Module]:
    """(the fused eval block on ``backend``, the eager module computing the same) for the conv-alone workload."""
    if workload.mode != "fwd":
        raise NotApplicable("the depthwise conv alone has no fused backward (its backward is timed inside the "
                            "dw_block workload's fwd+bwd)")
    if backend not in backends.implemented_backends("depthwise_block"):
        raise NotApplicable(f"backend {backend!r} implements no depthwise_block (whose eval kernel is the "
                            "conv-alone workload's fused provider)")
    fused = EvalBlockAsConv(conv, workload.activation, backend)
    twin = copy.deepcopy(fused)
    twin.backend = None
    return fused, twin


def _op_of(module: nn.Module) -> Optional[str]:
    if isinstance(module, FusedDepthwiseBlock):
        return "depthwise_block"
    if isinstance(module, (FusedPointwiseBlock, FusedConvMixerLayer)):
        return "pointwise_block"
    return None


def fuse_for_backend(module: nn.Module, backend: str) -> Tuple[nn.Module, Dict[str, str]]:
    """Fuse ``module`` for ``backend``; blocks whose op that backend does not implement yet run on "torch".

    Returns the module and {op: backend it runs on}; NotApplicable when no block would
    run on ``backend`` (timing that would only time the reference again).
    """
    fused = fuse_convmixer(module, backend=backend)
    used: Dict[str, str] = {}
    for m in fused.modules():
        op = _op_of(m)
        if op is None:
            continue
        m.backend = backend if backend in backends.implemented_backends(op) else "torch"
        used[op] = m.backend
    if not used:
        raise NotApplicable(f"nothing in {type(module).__name__} was fused")
    if backend not in used.values():
        raise NotApplicable(f"backend {backend!r} implements none of {sorted(used)} yet")
    return fused, used


@dataclass
class Prepared:
    provider: Provider
    workload: Workload
    call: Callable  # the module, or its compiled version
    module: nn.Module  # the underlying module (parameter names as in the reference)
    optimizer: Optional[torch.optim.Optimizer] = None
    backends_used: Dict[str, str] = field(default_factory=dict)
    # what the provider computes, when it is not the workload itself, and the eager module checked against it
    computes: str = ""
    check_reference: Optional[nn.Module] = None


def prepare(workload: Workload, provider_name: str, reference: nn.Module, device) -> Prepared:
    """A copy of ``reference`` set up as ``provider_name`` runs it (NotApplicable if it cannot)."""
    provider = parse_provider(provider_name)
    module = copy.deepcopy(reference).to(device)
    if provider.channels_last:
        module = module.to(memory_format=torch.channels_last)
    used: Dict[str, str] = {}
    computes, check_reference = "", None
    if provider.base == "fused" and workload.op == "dwconv":
        module, check_reference = conv_alone_provider(module, workload, provider.backend)
        used, computes = {"depthwise_block": provider.backend}, CONV_ALONE_FUSED
    elif provider.base == "fused":
        module, used = fuse_for_backend(module, provider.backend)
    module.train(workload.training)
    call: Callable = module
    if provider.base == "compile":
        torch._dynamo.reset()  # a fresh cache: never hit the recompile limit and silently run eager
        # dynamic=False: a second batch size (the check's) recompiles static kernels, as a fixed-shape user gets
        call = torch.compile(module, mode=None if provider.compile_mode == "default" else provider.compile_mode,
                             dynamic=False)
    optimizer = None
    if workload.mode == "train":
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=torch.device(device).type == "cuda")
    return Prepared(provider, workload, call, module, optimizer, used, computes, check_reference)


# ------------------------------------------------------------------ running


def _autocast(workload: Workload, device_type: str):
    if workload.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=workload.autocast)


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _begin_step(p: Prepared) -> None:
    if p.provider.base == "compile":  # CUDA-graph trees (max-autotune) reuse their output buffers per step
        torch.compiler.cudagraph_mark_step_begin()


def make_step(p: Prepared, input_sets: List[Dict[str, torch.Tensor]]) -> Callable[[int], None]:
    """``step(i)``: one timed call on input set ``i % len(input_sets)``."""
    w = p.workload
    device_type = input_sets[0]["x"].device.type
    sets = [{k: _layout(v, p.provider.channels_last) for k, v in s.items()} for s in input_sets]
    if w.mode == "fwd+bwd":  # the block's backward includes dx, as inside a model
        for s in sets:
            s["x"] = s["x"].detach().requires_grad_(True)
    params = list(p.module.parameters())
    label = f"{p.provider.name}: {w.op} {w.mode}"

    def step(i: int) -> None:
        s = sets[i % len(sets)]
        _begin_step(p)
        with gpu_range(label):
            if w.mode == "infer":
                with torch.no_grad(), _autocast(w, device_type):
                    p.call(s["x"])
                return
            for t in params:
                t.grad = None
            s["x"].grad = None
            with _autocast(w, device_type):
                out = p.call(s["x"])
                loss = F.cross_entropy(out, s["labels"]) if w.mode == "train" else None
            if w.mode == "fwd+bwd":
                out.backward(s["dy"])
            elif w.mode == "train":
                loss.backward()
                p.optimizer.step()

    return step


def capture(p: Prepared, inputs: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
            autocast: bool = True) -> Dict[str, torch.Tensor]:
    """Outputs, input gradient, parameter gradients and BatchNorm buffers after one call (no optimizer step).

    ``dtype`` casts the module and inputs (float64 for the reference); ``autocast=False`` runs without it.
    """
    w = p.workload
    if dtype is not None:
        p.module.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    x = _layout(inputs["x"], p.provider.channels_last).detach()
    if w.mode == "fwd+bwd":
        x.requires_grad_(True)
    device_type = x.device.type
    ctx = _autocast(w, device_type) if autocast else contextlib.nullcontext()
    _begin_step(p)
    for t in p.module.parameters():
        t.grad = None
    grad_ctx = torch.no_grad() if w.mode == "infer" else contextlib.nullcontext()
    with grad_ctx, ctx:
        out = p.call(x)
        loss = F.cross_entropy(out.float(), inputs["labels"]) if w.mode == "train" else None
    snap = {"output": out.detach().clone()}
    if w.mode == "fwd+bwd":
        out.backward(_layout(inputs["dy"], p.provider.channels_last))
        snap["grad_input"] = x.grad.detach().clone()
    elif w.mode == "train":
        loss.backward()
        snap["loss"] = loss.detach().reshape(1)
    if w.backward:
        for name, t in p.module.named_parameters():
            snap[f"grad {name}"] = t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t)
            t.grad = None
    if w.training:
        for name, b in p.module.named_buffers():
            if b.is_floating_point():
                snap[f"buffer {name}"] = b.detach().clone()
    return snap


def reference_snapshots(workload: Workload, reference: nn.Module, inputs, device) -> Tuple[dict, dict]:
    """(reference in the workload's precision = eager NCHW, reference in float64): the precision rule's two."""
    ref_d = capture(prepare(workload, REFERENCE, reference, device), inputs)
    ref64 = capture(prepare(workload, REFERENCE, reference, device), inputs, dtype=torch.float64, autocast=False)
    return ref_d, ref64


def check(p: Prepared, inputs, ref_d: dict, ref64: dict) -> Tuple[bool, float, str]:
    """The precision rule (design.md section 6) on every captured quantity: (ok, worst err/bound, table)."""
    got = capture(p, inputs)
    rule_dtype = p.workload.autocast or p.workload.torch_dtype
    rows = []
    for key, r64 in ref64.items():
        if key not in got:
            raise AssertionError(f"{p.provider.name}: produced no {key!r} (has {sorted(got)})")
        rows.append(compare(key, got[key], ref_d[key], r64, rule_dtype))
    worst = max((r.err_fused / r.bound if r.bound > 0 else float("inf")) for r in rows)
    return all(r.ok for r in rows), worst, format_rows(rows, only_failures=True)


@dataclass
class CaseResult:
    record: dict  # one row of the results file
    step: Callable[[], None]  # one more synchronized call (for host-side timers)


def run_case(workload: Workload, provider_name: str, device="cuda", *, check_batch: Optional[int] = None,
             rep_ms: float = 300.0, refs: Optional[dict] = None, seed: int = 0) -> CaseResult:
    """Check ``provider_name`` on ``workload`` (precision rule vs float64), then time it on the GPU.

    ``refs`` caches the reference snapshots between providers of one workload (a dict
    the caller keeps). ``check_batch`` checks on a smaller batch (float64 whole-model
    references at batch 64 do not fit). A provider that computes more than the workload
    (``Prepared.computes``) is checked against its own eager twin. Raises NotApplicable
    or AssertionError.
    """
    reference = workload.build_reference(seed)
    prepared = prepare(workload, provider_name, reference, device)
    check_inputs = workload.make_inputs(device, batch=check_batch, seed=seed + 7)
    key = (workload, check_batch, seed, prepared.computes)
    if refs is None or refs.get("key") != key:
        checked_against = prepared.check_reference if prepared.check_reference is not None else reference
        snaps = reference_snapshots(workload, checked_against, check_inputs, device)
        if refs is not None:
            refs.clear()
            refs.update(key=key, snaps=snaps)
    else:
        snaps = refs["snaps"]
    ok, worst, table = check(prepared, check_inputs, *snaps)
    if not ok:
        raise AssertionError(f"{provider_name} on {workload.describe()} fails the precision rule "
                             f"(design.md section 6) before timing:\n{table}")
    base = workload.make_inputs(device, seed=seed)
    rotated = rotation_count(workload.input_bytes(base), device)
    sets = [base] + [workload.make_inputs(device, seed=seed + 100 + j) for j in range(rotated - 1)]
    step = make_step(prepared, sets)
    timing = time_cuda(step, rotated=rotated, rep_ms=rep_ms)
    peak = peak_memory_mb(lambda: step(0))
    n_params = sum(t.numel() for t in prepared.module.parameters())
    ran = getattr(prepared.module, "last_backend", None)  # what ran, where the provider's module says
    if ran is not None and prepared.computes:
        prepared.backends_used = {op: ran for op in prepared.backends_used}
    metrics = workload.cost(n_params).metrics(timing.median_ms / 1e3)
    record = {
        "workload": workload.op, "mode": workload.mode, "config": workload.config, "shape": workload.shape,
        "dim": workload.dim, "batch": workload.batch, "size": workload.size, "kernel_size": workload.kernel_size,
        "activation": workload.activation, "dtype": workload.dtype, "precision": workload.describe().split(", ")[-1],
        "provider": provider_name, "layout": "channels_last" if prepared.provider.channels_last else "nchw",
        "backends": prepared.backends_used, **({"computes": prepared.computes} if prepared.computes else {}),
        **timing.as_dict(),
        "images_per_s": workload.batch / (timing.median_ms / 1e3), **metrics, "peak_mem_mb": peak,
        "check": {"rule": "design.md section 6", "worst_err_over_bound": worst,
                  "batch": check_batch or workload.batch},
    }

    def synced() -> None:
        step(0)
        torch.cuda.synchronize()

    return CaseResult(record, synced)
