"""Micro-batches for Megatron's schedules: right-padded rows, or sequences packed end to end.

Both kinds present the model inputs and a flat per-token view, so the loss and the log-prob pass
never care which it is:

* ``PaddedMicro`` — rows ``[b, L]`` of a right-padded ``SeqBatch``; the per-token view is every
  position of ``logits`` flattened, ``N = b * L`` (a view: slicing off the last position would copy
  ``[b, L-1, V]`` whenever b > 1); the last position of each row carries zero weight and mask, a
  placeholder target, and is dropped by ``scatter_into``.
* ``PackedMicro`` — several sequences laid end to end in one row ``[1, t]`` with boundaries
  ``cu_seqlens`` (Megatron's ``PackedSeqParams``, ``qkv_format='thd'``): attention and RoPE restart at
  each boundary, so no compute is spent on padding.  The per-token view is every position of the
  pack, ``N = t``; the last position of each sequence (it predicts nothing) and the pack's tail
  padding carry zero mask and weight.

``pack_micro_batches`` bins sequences first-fit-decreasing into packs of at most ``max_tokens``
tokens (a longer sequence gets a pack of its own), each pack padded to a multiple of
``pad_multiple``; ``padded_micro_batches`` takes the rows longest first, each micro-batch cut to its
longest row.  Micro-batches of different shapes go through a pipeline too: the stages exchange each
activation's shape first (``Policy._run_schedule``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

FIELDS = ("loss_mask", "old_logp", "ref_logp", "advantages", "weights")


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """``x`` on ``device``.  A host tensor goes to a GPU without blocking: PyTorch's blocking copy synchronises
    the stream, so each micro-batch's inputs would wait for the previous micro-batch's kernels to finish before
    the host could launch more.  (CUDA stages a pageable source before returning, so the copy is safe.)"""
    return x.to(device, non_blocking=x.device.type == "cpu" and torch.device(device).type == "cuda")


def seq_lengths(batch) -> torch.Tensor:
    """Real (unpadded) length of each row: ``batch.lengths`` when the builder recorded it, else one past
    the last response token (rows without any response token count as full length)."""
    if getattr(batch, "lengths", None) is not None:
        return batch.lengths.to(torch.long).cpu()
    B, L = batch.tokens.shape
    m = batch.loss_mask.cpu() > 0
    idx = torch.arange(L - 1).expand(B, -1)
    last = torch.where(m, idx, torch.full_like(idx, -1)).max(1).values
    return torch.where(last >= 0, last + 2, torch.full_like(last, L))


class PaddedMicro:
    def __init__(self, batch, rows: torch.Tensor):
        self.batch, self.rows = batch, rows
        self.n_rows, self.seq_len = batch.tokens.shape

    def __len__(self) -> int:
        return self.n_rows

    def model_inputs(self, device, attn_mask_fn, cpu_boundaries: bool = False):
        tokens = to_device(self.batch.tokens, device)
        L = tokens.shape[1]
        pos = torch.arange(L, device=device)[None].expand(tokens.shape[0], -1)
        return tokens, pos, attn_mask_fn(L, device), None

    def flat_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(-1, logits.shape[-1])

    def real_tokens(self) -> torch.Tensor:
        """[b, L] bool: the positions holding a sequence's tokens (not its row's padding)."""
        return torch.arange(self.seq_len)[None] < seq_lengths(self.batch)[:, None]

    @property
    def has_routing(self) -> bool:
        return getattr(self.batch, "routing", None) is not None

    def routing_targets(self, layer: int, tp: int = 1, tp_rank: int = 0) -> torch.Tensor:
        """[tokens, k] long: MoE layer ``layer``'s recorded experts in its router's token order ([L, b] flattened;
        under sequence parallelism this TP rank's chunk of L)."""
        r = self.batch.routing[:, :, layer].transpose(0, 1)  # [L, b, k]
        return r.chunk(tp, dim=0)[tp_rank].reshape(-1, r.shape[-1]).long()

    def targets(self, device) -> torch.Tensor:
        t = self.batch.tokens
        return to_device(torch.cat([t[:, 1:], t[:, -1:]], 1).reshape(-1), device)  # last column: a placeholder

    def segments(self, device) -> torch.Tensor:
        """A sequence id per position of the flat per-token view: the row."""
        return torch.arange(self.n_rows, device=device).repeat_interleave(self.seq_len)

    def field(self, name: str, device) -> Optional[torch.Tensor]:
        x = getattr(self.batch, name)
        if x is None:
            return None
        return to_device(torch.cat([x, x.new_zeros(x.shape[0], 1)], 1).reshape(-1), device)

    def scatter_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        v = values.reshape(self.n_rows, self.seq_len).to(out.device)
        w = min(out.shape[1], self.seq_len - 1)  # drop the placeholder and length padding
        # each row's own positions only, as a pack writes them: past a row's end out keeps its 0, whatever the
        # micro-batch's length (the padding's values would depend on it)
        real = self.real_tokens()[:, 1: w + 1].to(out.device)
        out[self.rows, :w] = torch.where(real, v[:, :w], torch.zeros((), dtype=v.dtype, device=v.device))


class PackedMicro:
    def __init__(self, tokens, targets, positions, cu_seqlens, fields: Dict[str, Optional[torch.Tensor]],
                 rows: List[int], starts: List[int], lengths: List[int], routing: Optional[torch.Tensor] = None):
        self.tokens, self._targets, self.positions, self.cu_seqlens = tokens, targets, positions, cu_seqlens
        self.routing = routing  # [t, layers, k]: SeqBatch.routing of the packed tokens
        self.fields, self.rows, self.starts, self.lengths = fields, rows, starts, lengths
        self.seq_len = tokens.shape[1]

    def __len__(self) -> int:
        return 1

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def packed_seq_params(self, device, cpu_boundaries: bool = False):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = to_device(self.cu_seqlens, device)
        max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                            max_seqlen_kv=max_len)
        if cpu_boundaries:
            from ..models.attention import cpu_boundaries as put

            put(p)
        return p

    def model_inputs(self, device, attn_mask_fn, cpu_boundaries: bool = False):
        return (to_device(self.tokens, device), to_device(self.positions, device), None,
                self.packed_seq_params(device, cpu_boundaries))

    def flat_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(-1, logits.shape[-1])

    def real_tokens(self) -> torch.Tensor:
        """[1, t] bool: the positions holding the packed sequences' tokens (not the pack's tail padding)."""
        return (torch.arange(self.seq_len) < sum(self.lengths))[None]

    @property
    def has_routing(self) -> bool:
        return self.routing is not None

    def routing_targets(self, layer: int, tp: int = 1, tp_rank: int = 0) -> torch.Tensor:
        """[tokens, k] long: as ``PaddedMicro.routing_targets``, for the pack's tokens in order."""
        return self.routing[:, layer].chunk(tp, dim=0)[tp_rank].long()

    def targets(self, device) -> torch.Tensor:
        return to_device(self._targets, device)

    def segments(self, device) -> torch.Tensor:
        """A sequence id per position of the pack (the tail padding one of its own)."""
        cu = self.cu_seqlens.to(torch.long)
        return to_device(torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1]), device)

    def field(self, name: str, device) -> Optional[torch.Tensor]:
        x = self.fields.get(name)
        return None if x is None else to_device(x, device)

    def scatter_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(out.device)
        for r, s, n in zip(self.rows, self.starts, self.lengths):
            out[r, : n - 1] = values[s: s + n - 1]


class IdleMicro(PaddedMicro):
    """A micro-batch that carries nothing: one row of ``length`` pad tokens with zero mask and weights (``like``'s
    fields, zero, where ``like`` has them), so that a rank with fewer micro-batches than the others of its
    expert-parallel group runs the matching forwards and backwards (``parallel.wide_expert_group``); its loss is
    0 and it writes no log-prob."""

    def __init__(self, like, length: int, pad_id: int = 0):
        length = max(2, int(length))
        zeros = lambda name: None if getattr(like, name) is None else torch.zeros(1, length - 1)  # noqa: E731
        batch = type(like)(torch.full((1, length), int(pad_id), dtype=torch.long), torch.zeros(1, length - 1),
                           zeros("old_logp"), zeros("ref_logp"), zeros("advantages"), zeros("weights"),
                           torch.tensor([length]), None)
        super().__init__(batch, torch.zeros(0, dtype=torch.long))

    def real_tokens(self) -> torch.Tensor:
        return torch.zeros(1, self.seq_len, dtype=torch.bool)

    def scatter_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        pass


def padded_micro_batches(batch, micro_batch_size: int, pad_id: int = 0, pad_multiple: int = 1) -> List[PaddedMicro]:
    """Micro-batches of ``micro_batch_size`` rows, the rows taken longest first so that rows of like length share
    one, each cut to its own longest row: no forward runs over another micro-batch's padding (until 2026-12-07
    every micro-batch had the whole batch's length, so at micro-batch size 1 a 1K-token sequence of a batch that
    held an 8K one ran 8K positions; pipeline stages now exchange each micro-batch's shape).  The length is padded
    up to a multiple of ``pad_multiple`` (FP8 GEMMs need the token count divisible by 16; sequence parallelism
    by TP)."""
    mult = max(1, int(pad_multiple))
    n = len(batch)
    lengths = seq_lengths(batch)
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    out = []
    for i in range(0, n, micro_batch_size):
        rows = torch.tensor(order[i: i + micro_batch_size], dtype=torch.long)
        L = max(2, int(lengths[rows].max()))
        out.append(PaddedMicro(_with_length(batch.slice(rows), -(-L // mult) * mult, pad_id), rows))
    return out


def _with_length(batch, L: int, pad_id: int):
    """``batch`` cut or right-padded to ``L`` positions (the per-token fields to ``L - 1``): padding tokens, zero
    mask, log-probs, advantages and weights, and the routing's filler experts 0..k-1."""
    cur = batch.tokens.shape[1]
    if L == cur:
        return batch

    def fit(x, n, value):
        if x is None or n <= x.shape[1]:
            return None if x is None else x[:, :n]
        return torch.nn.functional.pad(x, (0, n - x.shape[1]), value=value)

    routing = getattr(batch, "routing", None)
    if routing is not None:
        B, _, n_layers, k = routing.shape
        routing = (routing[:, :L] if L <= cur else
                   torch.cat([routing, torch.arange(k, dtype=routing.dtype).expand(B, L - cur, n_layers, k)], 1))
    return type(batch)(fit(batch.tokens, L, pad_id), fit(batch.loss_mask, L - 1, 0.0), fit(batch.old_logp, L - 1, 0.0),
                       fit(batch.ref_logp, L - 1, 0.0), fit(batch.advantages, L - 1, 0.0),
                       fit(batch.weights, L - 1, 0.0), batch.lengths, routing)


def _bins(lengths: List[int], max_tokens: int) -> List[List[int]]:
    """First-fit decreasing; ties keep the original order, so packing is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    room: List[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max(max_tokens - lengths[i], 0))
    return [sorted(b) for b in bins]


def pack_micro_batches(batch, max_tokens: int, pad_id: int, pad_multiple: int = 1) -> List[PackedMicro]:
    """Pack the rows of a right-padded ``SeqBatch`` into micro-batches of at most ``max_tokens`` tokens."""
    if max_tokens <= 0:
        raise ValueError(f"pack_micro_batches: max_tokens must be positive, got {max_tokens}")
    lengths = seq_lengths(batch).tolist()
    bins = _bins(lengths, max_tokens)
    mult = max(1, int(pad_multiple))
    sizes = [sum(lengths[i] for i in b) for b in bins]
    tokens_cpu = batch.tokens.cpu()
    packs = []
    for b, used in zip(bins, sizes):
        t = -(-used // mult) * mult
        tok = torch.full((t,), pad_id, dtype=torch.long)
        tgt = torch.full((t,), pad_id, dtype=torch.long)
        pos = torch.zeros(t, dtype=torch.long)
        fields = {f: (None if getattr(batch, f) is None else torch.zeros(t, dtype=getattr(batch, f).dtype))
                  for f in FIELDS}
        routing = getattr(batch, "routing", None)
        route = None
        if routing is not None:  # the tail padding's filler experts, 0..k-1
            route = torch.arange(routing.shape[-1], dtype=routing.dtype).expand(t, *routing.shape[2:]).clone()
        cu, starts, off = [0], [], 0
        for i in b:
            n = lengths[i]
            tok[off: off + n] = tokens_cpu[i, :n]
            if route is not None:
                route[off: off + n] = routing[i, :n].cpu()
            tgt[off: off + n - 1] = tokens_cpu[i, 1:n]
            pos[off: off + n] = torch.arange(n)
            for f, x in fields.items():
                if x is not None:
                    x[off: off + n - 1] = getattr(batch, f)[i, : n - 1].cpu()
            starts.append(off)
            off += n
            cu.append(off)
        if off < t:  # the tail padding is a sequence of its own: nothing attends across into it
            pos[off:] = torch.arange(t - off)
            cu.append(t)
        packs.append(PackedMicro(tok[None], tgt, pos[None], torch.tensor(cu, dtype=torch.int32), fields, list(b),
                                 starts, [lengths[i] for i in b], route))
    return packs
