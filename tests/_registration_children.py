"""Child processes for tests/test_registration.py: run with an environment's interpreter.

``dataloader``: DataLoader workers started with the spawn method look EPSANet up in timm.
``ddp``: two spawned gloo ranks on the CPU each create ``epsanet50`` by name and compute a DDP gradient,
which must be the mean of the ranks' own gradients.

Nothing here imports timm_epsa: in every process the models must come from the start-up hook.
torch is imported only where it is used, so that a process importing this file for its
definitions (spawn does) pays nothing for it. Each mode prints one JSON line for the test.
"""
import copy
import json
import multiprocessing
import sys
import tempfile


class ListEpsanets:
    """Map-style dataset: each item is the EPSANet names timm knows in the worker that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> str:
        import timm  # first imported here, in the worker
        return ','.join(timm.list_models('epsanet*'))


def dataloader() -> None:
    import torch

    loader = torch.utils.data.DataLoader(
        ListEpsanets(), batch_size=None, num_workers=1, multiprocessing_context='spawn')
    print(json.dumps({'worker_models': list(loader)}))


def _ddp_rank(rank: int, world_size: int, init_file: str) -> None:
    import timm
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)  # as torchrun does: two ranks each running a thread per core thrash
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # different weights and data per rank: DDP must make them agree
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=4)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    local_model = copy.deepcopy(model)  # the same weights, outside DDP: this rank's own gradient
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    F.cross_entropy(ddp_model(x), y).backward()
    F.cross_entropy(local_model(x), y).backward()

    def flat_grads(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    ddp_grads, local_grads = flat_grads(model), flat_grads(local_model)
    gathered_ddp = [torch.empty_like(ddp_grads) for _ in range(world_size)]
    gathered_local = [torch.empty_like(local_grads) for _ in range(world_size)]
    dist.all_gather(gathered_ddp, ddp_grads)
    dist.all_gather(gathered_local, local_grads)
    if rank == 0:
        mean_local = torch.stack(gathered_local).mean(0)
        print(json.dumps({
            'ranks_agree': all(torch.equal(gathered_ddp[0], g) for g in gathered_ddp[1:]),
            'ranks_differ_locally': not torch.allclose(gathered_local[0], gathered_local[1]),
            'mean_error': (gathered_ddp[0] - mean_local).abs().max().item() / mean_local.abs().max().item(),
            'block': type(model.layer1[0]).__module__,
        }), flush=True)
    dist.destroy_process_group()


def ddp(world_size: int = 2) -> None:
    context = multiprocessing.get_context('spawn')
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [context.Process(target=_ddp_rank, args=(rank, world_size, f'{tmp}/init'))
                 for rank in range(world_size)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
    if any(process.exitcode for process in ranks):
        sys.exit(f'DDP ranks failed, exit codes {[process.exitcode for process in ranks]}')


if __name__ == '__main__':
    {'dataloader': dataloader, 'ddp': ddp}[sys.argv[1]]()
