"""Linear head + cross-entropy / token log-probabilities without the (tokens x vocab) logits in memory.

The plain path computes `logits = hidden @ W^T` for every position, upcasts them to fp32 and keeps them (and
their softmax) for backward: two to three tokens x vocab fp32 tensors. Here only the positions that carry a
label go through the head, in chunks of rows, so one chunk's logits exist at a time (the idea behind Liger's
fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989, and Cut Cross-Entropy, Wijmans et al. 2024,
arXiv:2411.09009). Written by hand: neither library runs on CPU.

- `chunked_cross_entropy`: CE = Σ_i [logsumexp(z_i) − z_i[y_i]] / n with z_i = W h_i (+ b). Its gradient is
  computed during the forward pass, chunk by chunk (∂CE/∂z_i = (softmax(z_i) − onehot(y_i)) / n), and only scaled
  in backward: one head matmul forward and two for the gradients, as in the plain path, no recomputation.
- `token_logprobs`: log p(y_i | h_i) = z_i[y_i]/T − logsumexp(z_i/T) per position, for losses whose upstream
  gradient is known only in backward (DPO, GRPO, PPO). Keeps hidden states and one logsumexp per row, and
  recomputes each chunk's logits in backward (one extra head matmul).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # fp32 logits per chunk: 8M elements = 32 MiB (170 rows of a 49,152-token vocabulary)


def chunk_rows(vocab_size: int, chunk: int | None = None) -> int:
    """Rows per chunk: `chunk` if given, else as many as keep one chunk's fp32 logits near 32 MiB."""
    return max(1, chunk if chunk else CHUNK_ELEMENTS // max(vocab_size, 1))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = h @ weight.t()
    z = z.to(_acc(z.dtype))
    if bias is not None:
        z += bias.to(z.dtype)
    if temperature != 1.0:
        z /= temperature
    return z


def _grad_buffers(
    ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    acc: torch.dtype,
) -> tuple:
    """(grad hidden, grad weight, grad bias) to fill chunk by chunk; None where no gradient is needed. The weight
    and bias gradients accumulate in `acc`."""
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None)


def _add_chunk_grads(grads: tuple, g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, s: int) -> None:
    """Chain ∂L/∂z of one chunk (rows s.., g: rows × vocab) through z = h W^T + b: ∂h = g W, ∂W += g^T h,
    ∂b += Σ_rows g."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[s : s + g.shape[0]] = g.to(weight.dtype) @ weight
    if grad_w is not None:
        grad_w.addmm_(g.t(), h.to(grad_w.dtype))
    if grad_b is not None:
        grad_b += g.sum(0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(hidden_i @ weight^T + bias, labels_i) / denominator, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denominator: float, rows: int):
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        acc = _acc(hidden.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grads = _grad_buffers(ctx, hidden, weight, bias, acc)
        for s in range(0, hidden.shape[0], rows):
            h, y = hidden[s : s + rows], labels[s : s + rows]
            z = _logits(h, weight, bias, 1.0)
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            if all(x is None for x in grads):
                continue
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            g /= denominator
            _add_chunk_grads(grads, g, h, weight, s)
        ctx.save_for_backward(*grads)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        out_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_out.to(grad_w.dtype)).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * grad_out.to(grad_b.dtype)).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden_i @ weight^T / T + ...)[labels_i] per row; logits recomputed per chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature: float, rows: int):
        out = torch.empty(hidden.shape[0], dtype=_acc(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], rows):
            z = _logits(hidden[s : s + rows], weight, bias, temperature)
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            out[s : s + rows] = z.gather(1, labels[s : s + rows, None]).squeeze(1) - lse[s : s + rows]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        acc = lse.dtype
        grads = _grad_buffers(ctx, hidden, weight, bias, acc)
        grad_h, grad_w, grad_b = grads
        for s in range(0, hidden.shape[0], rows):
            h, y, go = hidden[s : s + rows], labels[s : s + rows], grad_out[s : s + rows].to(acc)
            # ∂ logp_i / ∂ z_i = (onehot(y_i) − softmax(z_i/T)) / T, times the upstream gradient g_i
            g = _logits(h, weight, bias, t).sub_(lse[s : s + rows, None]).exp_()
            g.mul_(-go[:, None])
            g[torch.arange(len(y), device=g.device), y] += go
            if t != 1.0:
                g /= t
            _add_chunk_grads(grads, g, h, weight, s)
        out_w = grad_w.to(weight.dtype) if grad_w is not None else None
        out_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, out_w, out_b, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy Σ_{i: y_i≠ignore} −log softmax(W h_i + b)[y_i] / n, chunked over rows.

    `hidden` (..., H) and `labels` (...) are already aligned (hidden_i predicts labels_i; see `shift_for_next_token`).
    n = `num_items` when given (the Trainer's token count across gradient-accumulation micro-batches), else the
    number of labelled positions. Positions with `ignore_index` never reach the head.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    keep = y != ignore_index
    h, y = h[keep], y[keep]
    n = float(num_items) if num_items is not None else float(max(int(y.numel()), 1))
    if h.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps the graph connected (DDP) with a zero gradient
    return _FusedLinearCrossEntropy.apply(h, weight, bias, y, max(n, 1.0), chunk_rows(weight.shape[0], chunk))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk: int | None = None,
) -> torch.Tensor:
    """log p(y_i | h_i) = log softmax((W h_i + b) / T)[y_i] for every position (shape of `labels`), >= fp32.

    Positions whose label is `ignore_index` get 0 and are not computed. Differentiable in `hidden`, `weight`
    and `bias`; memory is O(rows · vocab) for one chunk plus O(tokens) instead of O(tokens · vocab).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(flat_h.device)
    keep = flat_y != ignore_index
    out = torch.zeros(flat_y.shape, dtype=_acc(flat_h.dtype), device=flat_h.device)
    if bool(keep.any()):
        lp = _LinearTokenLogprobs.apply(flat_h[keep], weight, bias, flat_y[keep], float(temperature),
                                        chunk_rows(weight.shape[0], chunk))
        out = out.masked_scatter(keep, lp)
    return out.reshape(labels.shape)


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden[:, :-1], labels[:, 1:]): position t predicts token t+1, as transformers' ForCausalLMLoss shifts."""
    return hidden[:, :-1], labels[:, 1:]
