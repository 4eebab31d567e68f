"""Distributed training on 2 CPU processes (gloo, loopback only, bounded in time) (issue 13): plain DDP
of the fused model equals DDP of the reference; the trainer's loss scaling makes DDP's gradient the
joint batch's; ``convmixer-kernels train`` under torchrun end to end, resumed on one process."""
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convmixer_kernels import ConvMixer, fuse_convmixer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")
LIMIT_S = 120  # per multi-process test; a hang fails instead of blocking CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_env():
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo" if sys.platform.startswith("linux") else "",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    if not env["GLOO_SOCKET_IFNAME"]:
        del env["GLOO_SOCKET_IFNAME"]
    return env


def _spawn(fn, world: int, *args):
    """Run fn(rank, world, port, *args) in ``world`` processes; fail (not hang) after LIMIT_S."""
    port = _free_port()
    os.environ.update({k: v for k, v in _loopback_env().items() if k in ("GLOO_SOCKET_IFNAME",)})
    ctx = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + LIMIT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} processes did not finish within {LIMIT_S} s")


def run_command(cmd, cwd, env) -> str:
    """Run a (torchrun) command in its own process group; its stdout. Fails, killing the group, after LIMIT_S."""
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]} did not finish within {LIMIT_S} s:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    return out


def _init(rank, world, port):
    import datetime
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _ddp_fused_equals_unfused(rank, world, port):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        ref = ConvMixer(8, 2, 3, 2, n_classes=5)
        fused = fuse_convmixer(copy.deepcopy(ref), backend="torch")
        models = [DDP(ref), DDP(fused)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        for step in range(2):
            x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(100 * step + rank))
            outs = []
            for m, o in zip(models, opts):
                o.zero_grad()
                out = m(x)
                out.square().mean().backward()
                outs.append(out.detach())
                o.step()
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
            for (n, a), (_, b) in zip(models[0].module.named_parameters(), models[1].module.named_parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        for (n, a), (_, b) in zip(models[0].module.state_dict().items(), models[1].module.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        # the gradients are averaged over the ranks: every rank holds the same parameters
        w = models[1].module[0].weight.detach().clone()
        dist.broadcast(w, 0)
        assert torch.equal(w, models[1].module[0].weight.detach())
        _trainer_loss_gives_the_joint_batch_gradient(rank, world)
    finally:
        dist.destroy_process_group()


def _trainer_loss_gives_the_joint_batch_gradient(rank, world):
    """With BatchNorm in eval mode (no batch statistics), DDP over shares of a joint batch with the
    trainer's loss scaling gives exactly the single-process gradient of the joint batch, also for
    uneven shares (5 images: 3 and 2)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from convmixer_kernels.commands.train import _loss

    torch.manual_seed(1)
    model = ConvMixer(8, 1, 3, 2, n_classes=5, fused=True, backend="torch").eval()
    single = copy.deepcopy(model)
    ddp = DDP(model)
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 5, (5,), generator=g)
    opts = {"amp": False, "mixup": 0.0, "seed": 0}
    loss, _ = _loss(ddp, x[rank::world], y[rank::world], 5, opts, 0, torch.device("cpu"), world)
    loss.backward()
    torch.nn.functional.cross_entropy(single(x), y).backward()
    for (n, a), (_, b) in zip(single.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_ddp_fused_equals_unfused_and_joint_batch_gradient():
    _spawn(_ddp_fused_equals_unfused, 2)


def test_torchrun_trainer_end_to_end_and_resume_on_one_process(tmp_path, capsys):
    """2 ranks under torchrun (python -m torch.distributed.run): rank 0 alone prints and saves; the
    checkpoint resumes on one process at the same step with the same options."""
    ckpt = tmp_path / "ddp-{epoch}.pt"
    args = ["train", "--synthetic", "--synthetic-samples", "48", "--image-size", "8", "--batch-size", "8",
            "--dim", "16", "--depth", "1", "--kernel-size", "3", "--no-progress", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "convmixer_kernels", *args, "--steps", "4",
           "--save", str(ckpt)]
    env = _loopback_env()
    env["CONVMIXER_KERNELS_DIST_TIMEOUT"] = "60"
    out = run_command(cmd, tmp_path, env)
    lines = out.splitlines()
    assert sum(line.startswith("data: ") for line in lines) == 1 and out.count("final loss") == 1, out  # rank 0 only
    assert "x 2 ranks (4 each)" in out and "6 per epoch" in out, out
    saved = torch.load(tmp_path / "ddp-step4.pt", weights_only=True)
    assert saved["step"] == 4 and saved["config"]["train"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in saved["state_dict"])  # the plain model's keys
    loss_ddp = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    assert 0 < loss_ddp < 10

    from convmixer_kernels.cli import main

    assert main(args + ["--steps", "6", "--resume", str(tmp_path / "ddp-step4.pt"),
                        "--save", str(tmp_path / "one.pt")]) == 0
    resumed_out = capsys.readouterr().out
    assert "at step 4" in resumed_out and "batch 8 (" in resumed_out
    assert torch.load(tmp_path / "one.pt", weights_only=True)["step"] == 6


def test_sync_bn_on_cpu_is_a_clear_error_and_batch_must_split():
    import argparse

    import convmixer_kernels
    from convmixer_kernels.commands import train as train_cmd

    model = ConvMixer(8, 1, 3, 2, n_classes=5)
    if getattr(convmixer_kernels, "convert_sync_batchnorm", None) is None:
        with pytest.raises(train_cmd.TrainError, match="--sync-bn on CPU"):
            train_cmd._sync_bn(model, train_cmd.Dist(2, 0, 0), torch.device("cpu"))
    assert train_cmd._sync_bn(model, train_cmd.Dist(), torch.device("cpu")) is model  # one process: nothing to do
    p = argparse.ArgumentParser()
    train_cmd.add_arguments(p)
    a = p.parse_args(["--batch-size", "9"])
    m, t, _ = train_cmd.resolve_options(a, None)
    with pytest.raises(train_cmd.TrainError, match="does not split evenly over 2 ranks"):
        train_cmd._check_options(a, m, t, train_cmd.Dist(2, 0, 0))
