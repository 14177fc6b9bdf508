"""Layer activations exchanged between ranks: one flat buffer, batched asynchronous collectives, wait at use.

DistriFusion (Li et al., "DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion Models",
CVPR 2024, arXiv:2402.19481) hides communication behind computation. Every layer that exchanges something
registers a slot during the first, synchronous pass; afterwards all slots live in one flat send buffer and one
flat receive buffer, consecutive slots go out together in one asynchronous collective once the last of them is
written, and a layer waits on its batch only when it reads the data again, one step later.

Two collectives fill the receive buffer:
- :class:`AllGather` gives every rank every rank's slot (DistriFusion's full exchange);
- :class:`NeighbourSwap` sends a slot's head to the previous rank and its tail to the next, and receives the
  previous rank's tail and the next rank's head (conv halos; PCPP's partial K/V). A strip at the image edge
  receives nothing on that side: zeros, which is what a convolution's zero padding needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def all_gather_now(tensor: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    """A blocking all-gather outside the buffers: every rank's ``tensor``, in rank order."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


class AllGather:
    """Slot shape (1, *part) out; (world, *part) in: every rank's part, in rank order."""

    send_rows = 1

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.recv_rows = size

    def launch(self, send: list[torch.Tensor], recv: list[torch.Tensor]):
        """One contiguous row out, one row per rank in; returns the pending work."""
        return dist.all_gather(recv, send[0], group=self.group, async_op=True)

    def received_bytes(self, row_bytes: int) -> int:
        return (self.size - 1) * row_bytes


class NeighbourSwap:
    """Slot shape (2, *part) out: [head, tail]; (2, *part) in: [previous rank's tail, next rank's head]."""

    send_rows = recv_rows = 2

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.previous = dist.get_global_rank(group, rank - 1) if rank > 0 else None
        self.next = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None

    def launch(self, send: list[torch.Tensor], recv: list[torch.Tensor]):
        # On this group (peers are global ranks), so the exchanges wait at most as long as its timeout allows.
        ops = []
        for peer, out, into in ((self.previous, send[0], recv[0]), (self.next, send[1], recv[1])):
            if peer is not None:
                ops += [dist.P2POp(dist.isend, out, peer, self.group), dist.P2POp(dist.irecv, into, peer, self.group)]
        return _AllWork(dist.batch_isend_irecv(ops) if ops else [])

    def received_bytes(self, row_bytes: int) -> int:
        return ((self.previous is not None) + (self.next is not None)) * row_bytes


@dataclass
class _AllWork:
    works: list

    def wait(self) -> None:
        for work in self.works:
            work.wait()


@dataclass
class _Slot:
    offset: int
    numel: int  # per row
    part: torch.Size
    batch: int = -1


@dataclass
class CommBuffer:
    """Registered slots over one collective; see the module docstring for the protocol.

    ``exchange_now`` is the blocking path (synchronous steps, and the first pass that registers slots);
    ``get`` then ``put`` is the displaced path: read last step's data, then hand in this step's.
    """

    collective: AllGather | NeighbourSwap
    batch_bytes: int
    slots: dict[str, _Slot] = field(default_factory=dict)
    send: torch.Tensor | None = None  # (send_rows, total) once finalised
    recv: torch.Tensor | None = None  # (recv_rows, total)
    batches: list[list[str]] = field(default_factory=list)
    pending: dict[int, object] = field(default_factory=dict)  # batch index -> work in flight
    written: dict[int, int] = field(default_factory=dict)  # batch index -> slots written this step
    first_pass: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bytes_received: int = 0

    @property
    def finalised(self) -> bool:
        return self.send is not None

    def exchange_now(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Exchange ``tensor`` (send_rows, *part) and wait; returns (recv_rows, *part)."""
        if not self.finalised:
            return self._register(key, tensor)
        slot = self._slot(key)
        self._wait(slot.batch)
        self._write(slot, tensor)
        self._launch_span(slot.offset, slot.offset + slot.numel).wait()
        return self._view(slot)

    def get(self, key: str) -> torch.Tensor:
        """What the last exchange of ``key`` delivered, (recv_rows, *part); waits for its batch if in flight."""
        slot = self._slot(key)
        self._wait(slot.batch)
        return self._view(slot)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Hand in this step's ``tensor``; its batch goes out once every slot in it is written."""
        slot = self._slot(key)
        self._write(slot, tensor)
        self.written[slot.batch] = self.written.get(slot.batch, 0) + 1
        if self.written[slot.batch] == len(self.batches[slot.batch]):
            self._launch_batch(slot.batch)

    def flush(self) -> None:
        """Send whatever was written but not sent yet (the end of a model call)."""
        for batch, count in list(self.written.items()):
            if count:
                self._launch_batch(batch)

    def wait_all(self) -> None:
        for batch in list(self.pending):
            self._wait(batch)

    def finalise(self) -> None:
        """After the first pass: one flat buffer for every registered slot, filled with what that pass moved."""
        if self.finalised or not self.slots:
            return
        sample_send, _ = next(iter(self.first_pass.values()))
        total = sum(slot.numel for slot in self.slots.values())
        options = {"dtype": sample_send.dtype, "device": sample_send.device}
        self.send = torch.zeros(self.collective.send_rows, total, **options)
        self.recv = torch.zeros(self.collective.recv_rows, total, **options)
        for key, (sent, received) in self.first_pass.items():
            slot = self.slots[key]
            self.send[:, slot.offset : slot.offset + slot.numel] = sent.reshape(self.collective.send_rows, -1)
            self.recv[:, slot.offset : slot.offset + slot.numel] = received.reshape(self.collective.recv_rows, -1)
        self.first_pass.clear()
        self._plan_batches(sample_send.element_size())

    def _register(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key in self.slots:
            raise RuntimeError(f"{key} exchanged twice in one model call")
        part = tensor.shape[1:]
        offset = sum(slot.numel for slot in self.slots.values())
        self.slots[key] = _Slot(offset, math.prod(part), part)
        send = tensor.detach().reshape(self.collective.send_rows, -1).contiguous()
        recv = torch.zeros(self.collective.recv_rows, send.shape[1], dtype=send.dtype, device=send.device)
        self.collective.launch(list(send.unbind(0)), list(recv.unbind(0))).wait()
        self.bytes_received += self.collective.received_bytes(send[0].nbytes)
        self.first_pass[key] = (send, recv)
        return recv.view(self.collective.recv_rows, *part)

    def _plan_batches(self, itemsize: int) -> None:
        current, size = [], 0
        for key, slot in self.slots.items():
            current.append(key)
            size += slot.numel * itemsize
            slot.batch = len(self.batches)
            if size >= self.batch_bytes:
                self.batches.append(current)
                current, size = [], 0
        if current:
            self.batches.append(current)

    def _slot(self, key: str) -> _Slot:
        if key not in self.slots:
            raise RuntimeError(f"{key} was not exchanged in the first pass; the model's layers changed mid-run")
        return self.slots[key]

    def _write(self, slot: _Slot, tensor: torch.Tensor) -> None:
        rows = self.collective.send_rows
        self.send[:, slot.offset : slot.offset + slot.numel].copy_(tensor.detach().reshape(rows, -1))

    def _view(self, slot: _Slot) -> torch.Tensor:
        return self.recv[:, slot.offset : slot.offset + slot.numel].view(self.collective.recv_rows, *slot.part)

    def _launch_batch(self, batch: int) -> None:
        keys = self.batches[batch]
        start = self.slots[keys[0]].offset
        end = self.slots[keys[-1]].offset + self.slots[keys[-1]].numel
        self._wait(batch)
        self.pending[batch] = self._launch_span(start, end)
        self.written[batch] = 0

    def _launch_span(self, start: int, end: int):
        # Rows of the flat buffers sliced to the span are contiguous, so collectives read and write in place.
        work = self.collective.launch(list(self.send[:, start:end].unbind(0)), list(self.recv[:, start:end].unbind(0)))
        self.bytes_received += self.collective.received_bytes((end - start) * self.send.element_size())
        return work

    def _wait(self, batch: int) -> None:
        work = self.pending.pop(batch, None)
        if work is not None:
            work.wait()
