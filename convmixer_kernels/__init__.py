"""convmixer-kernels: fused Triton and CUDA kernels for ConvMixer.

Public API:
    ConvMixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, *, in_chans=3,
              activation="gelu", fused=False, backend="auto", memory="normal")
    FusedDepthwiseBlock, FusedPointwiseBlock, FusedConvMixerLayer  (each with .from_module)
    FusedSequential  (consecutive fused layers trained as one fused stack)
    fuse_convmixer(model, backend="auto", *, stack=True, memory="normal"), unfuse_convmixer(model),
    plan_fusion(model)
    to_official_layout(state_dict), to_timm_layout(state_dict)
    available_backends(device=None), explain_backends(device=None), BackendUnavailableError
    SyncBatchNorm, convert_sync_batchnorm(model, process_group=None)  (multi-process training, any device)
"""
from ._version import __version__
from .checkpoints import to_official_layout, to_timm_layout
from .backends import BackendUnavailableError, available_backends, explain_backends
from .convert import fuse_convmixer, plan_fusion, unfuse_convmixer
from .model import ConvMixer
from .modules import FusedConvMixerLayer, FusedDepthwiseBlock, FusedPointwiseBlock, Residual
from .stack import FusedSequential
from .syncbn import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "__version__", "ConvMixer", "FusedDepthwiseBlock", "FusedPointwiseBlock", "FusedConvMixerLayer", "FusedSequential", "Residual",
    "fuse_convmixer", "unfuse_convmixer", "plan_fusion", "available_backends", "explain_backends",
    "BackendUnavailableError", "to_official_layout", "to_timm_layout", "SyncBatchNorm", "convert_sync_batchnorm",
]
