"""DDAD's autoencoder stage: one training step of its 2K autoencoders (NDM on the normal
batch, UDM on the normal batch + as many unlabeled slices), at the ``small`` preset's
sizes, batched vs one autoencoder at a time.

* ``batched``: what the method does (:class:`~medad_fast.models.ensemble.AutoencoderEnsemble`):
  two grouped-convolution passes (NDM, UDM), the members' MSEs summed, one backward, one
  Adam over all the weights;
* ``sequential``: 2K :class:`~medad_fast.models.ConvAutoencoder` s (the same weights), each
  its own forward, backward and Adam step.

Both in the trainer's memory format (channels_last, weights and activations); the
``(contiguous)`` variants keep the default layout. ratio = sequential / batched.

On a CPU the two do the same convolution work, so the batched step is not much faster there
(measured on a busy 2-core machine, one thread, fastest of 10: channels_last 645 ms batched
vs 583 ms sequential, contiguous 1121 vs 1221 ms). What was tried per convolution (one
thread, fwd + bwd): K slice-wise ``conv2d`` calls instead of the grouped one (within the
noise of the grouped conv), a dense block-diagonal conv (1.5-2.4x slower: K times the
FLOPs). A profile shows grouped ``convolution_backward`` as the larger cost (1.84 s vs
1.45 s over 3 steps). Fewer, larger kernels pay off where launches or thread hand-offs
cost: with two threads on the same busy machine the batched step took 8.6 s, the
sequential 15.1 s.
"""

from __future__ import annotations

import pytest
import torch

from conftest import measure
from medad_fast.methods import resolve_config
from medad_fast.models import AutoencoderEnsemble

PRESET = "small"


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def _jobs(channels_last: bool, device: torch.device):
    config = resolve_config("ddad", PRESET)
    m, run = config.method, config.run
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    ensembles = [AutoencoderEnsemble(m.members, run.image_size, m.ae_width, m.ae_hidden, m.latent_size)
                 .to(device=device, memory_format=fmt) for _ in range(2)]
    singles = [e.member(k).to(memory_format=fmt) for e in ensembles for k in range(m.members)]
    normal = _images(run.batch_size, run.image_size, 1).to(device).contiguous(memory_format=fmt)
    mixed = torch.cat([normal, _images(run.batch_size, run.image_size, 2).to(device)]).contiguous(memory_format=fmt)
    batches = [normal, mixed]
    batched_adam = torch.optim.Adam([p for e in ensembles for p in e.parameters()], lr=run.lr)
    single_adams = [torch.optim.Adam(s.parameters(), lr=run.lr) for s in singles]

    def batched() -> None:
        batched_adam.zero_grad(set_to_none=True)
        loss = sum((e(x) - x).square().flatten(1).mean(dim=1).sum() for e, x in zip(ensembles, batches))
        loss.backward()
        batched_adam.step()

    def sequential() -> None:
        for index, (single, adam) in enumerate(zip(singles, single_adams)):
            x = batches[index // m.members]
            adam.zero_grad(set_to_none=True)
            (single(x) - x).square().mean().backward()
            adam.step()

    name = (f"ddad step of {2 * m.members} autoencoders ({PRESET}: w={m.ae_width} latent={m.latent_channels} "
            f"depth={m.ae_depth}) B={run.batch_size}+{2 * run.batch_size} {run.image_size}x{run.image_size}")
    return name, {"batched": batched, "sequential": sequential}, 3 * run.batch_size


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("impl", ["batched", "sequential"])
def test_ddad_autoencoder_step(benchmark, device, impl, layout):
    # on a GPU the sequential step is 2K times the kernel launches of one (small) autoencoder;
    # scripts/gpu_check.sh runs the cuda rows with the other CUDA benchmarks
    name, jobs, images = _jobs(layout == "channels_last", device)
    label = impl if layout == "channels_last" else f"{impl} (contiguous)"
    other = jobs["sequential" if impl == "batched" else "batched"]
    # interleaved pairs: every timed step follows an untimed step of the other implementation
    measure(benchmark, jobs[impl], device, group=f"{name} {device.type}", impl=label, images=images,
            min_rounds=5, warmup_calls=2, setup=other)
