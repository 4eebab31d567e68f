"""Fused SyncBatchNorm under DDP on 2 CPU processes (gloo, loopback only, bounded in time) (issue 13):
the joint batch normalized across processes equals one process with BatchNorm over the joint batch:
outputs, every parameter gradient, the input gradient and the BatchNorm buffers, on every backend
the harness offers (Triton through its interpreter)."""
import copy

import pytest
import torch
import torch.distributed as dist

from convmixer_kernels import ConvMixer, SyncBatchNorm, convert_sync_batchnorm, fuse_convmixer
from harness import model_backends
from test_distributed import _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _syncbn_equals_joint_batch(rank, world, port, backend):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        ref = ConvMixer(8, 2, 3, 2, n_classes=5)
        for m in ref.modules():  # buffers that are not the defaults
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model = convert_sync_batchnorm(fuse_convmixer(copy.deepcopy(ref), backend=backend))
        assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 5
        ddp = DDP(model)
        for step in range(2):
            joint = torch.randn(2 * world, 3, 10, 10, generator=torch.Generator().manual_seed(step))
            x = joint[2 * rank:2 * rank + 2].clone().requires_grad_(True)
            xr = joint.clone().requires_grad_(True)
            for p in list(model.parameters()) + list(ref.parameters()):
                p.grad = None
            out = ddp(x)
            (out.square().sum() * world / joint.shape[0]).backward()  # DDP averages: the joint batch's mean
            out_ref = ref(xr)
            (out_ref.square().sum() / joint.shape[0]).backward()
            torch.testing.assert_close(out, out_ref[2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-5)
            # the input gradient holds every rank's loss (the statistics are shared), each scaled by world
            # for DDP's average: world times the joint batch's, as with nn.SyncBatchNorm
            torch.testing.assert_close(x.grad / world, xr.grad[2 * rank:2 * rank + 2], rtol=1e-4, atol=1e-7)
            for (n, a), b in zip(ref.named_parameters(), model.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
        for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        assert {m.last_backend for m in model.modules() if hasattr(m, "last_backend")} == {backend}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", model_backends())
def test_fused_syncbn_ddp_equals_batchnorm_on_the_joint_batch(backend):
    _spawn(_syncbn_equals_joint_batch, 2, backend)


def test_syncbn_without_a_process_group_is_batchnorm():
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm2d(4)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    assert type(sync) is SyncBatchNorm and sync.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_torchrun_trainer_with_sync_bn_equals_one_process_on_the_joint_batch(tmp_path):
    """``train --sync-bn`` on 2 ranks takes the same steps as one process on the joint batch (within rounding)."""
    import sys

    from test_distributed import _free_port, _loopback_env, run_command

    args = ["train", "--synthetic", "--synthetic-samples", "32", "--image-size", "8", "--batch-size", "8",
            "--dim", "16", "--depth", "2", "--kernel-size", "3", "--no-progress", "--device", "cpu", "--steps", "3"]
    env = dict(_loopback_env(), CONVMIXER_KERNELS_DIST_TIMEOUT="60")
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port()), "-m", "convmixer_kernels", *args, "--sync-bn",
                    "--save", str(tmp_path / "two.pt")],
            "one": [sys.executable, "-m", "convmixer_kernels", *args, "--save", str(tmp_path / "one.pt")]}
    for cmd in runs.values():
        run_command(cmd, tmp_path, env)
    two = torch.load(tmp_path / "two.pt", weights_only=True)["state_dict"]
    one = torch.load(tmp_path / "one.pt", weights_only=True)["state_dict"]
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
