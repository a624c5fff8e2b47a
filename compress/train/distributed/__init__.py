"""Data-parallel fine-tuning on ``torch.distributed`` (DQRM's sparse + INT8 gradient exchange).

One idea per module:

- :mod:`~compress.train.distributed.context`: which process this is (rank, world size, backend,
  device), read from the environment PyTorch's launcher sets; the process group.
- :mod:`~compress.train.distributed.launch`: ``--nproc N`` runs N workers through PyTorch's
  elastic agent and turns a failed worker into one line and an exit code.
- :mod:`~compress.train.distributed.worker`: what a worker process does differently (quiet ranks,
  its error line for the launcher).
- :mod:`~compress.train.distributed.failures`: the failure record a worker leaves, and the one line
  the launcher prints about the first cause.
- :mod:`~compress.train.distributed.comm`: the collectives, counting the bytes of every tensor
  handed to them and the seconds spent in them.
- :mod:`~compress.train.distributed.grad_codec`: INT8 codes for gradients (a scale per row, per
  table or per block) and coalesced sparse rows.
- :mod:`~compress.train.distributed.wire`: the layout of one step's embedding message (int32 ids,
  float32 scales, int8 codes or float32 values, as bytes).
- :mod:`~compress.train.distributed.grad_exchange`: one step's exchange of sparse embedding and
  dense (MLP) gradients, so that every rank holds the same summed gradient.
- :mod:`~compress.train.distributed.replicas`: a digest of the weights, compared across ranks.
- :mod:`~compress.train.distributed.accounting`: bytes per step against a dense all-reduce and the
  floor of the INT8 scheme; the ``distributed`` object of ``--json``.
- :mod:`~compress.train.distributed.capacity`: do every worker's replicas fit this machine (and
  why tables are replicated, not sharded with TorchRec's ``DistributedModelParallel``).
- :mod:`~compress.train.distributed.data_parallel`: the hooks the training loop calls (each
  rank's share of a batch, the loss scale, the exchange, rank 0's decisions applied everywhere,
  the saved state).

A single-process run imports only ``worker`` and ``failures`` (no torch: the command line's error
handling asks them whether this process is a worker).
"""
