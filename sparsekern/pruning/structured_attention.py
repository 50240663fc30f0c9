"""``PrunedMultiheadAttention``: self-attention with some of its heads physically removed.

``nn.MultiheadAttention`` requires ``embed_dim == num_heads * head_dim``; after head pruning the
projections are narrower than the residual stream (``H' * d < E``), so the pruned attention is
this module: the kept heads' rows of the packed in-projection ``[3 * H' * d, E]`` and the kept
heads' columns of the out-projection ``[E, H' * d]``. Its forward has ``nn.MultiheadAttention``'s
signature and semantics (``batch_first``, ``key_padding_mask``, ``attn_mask`` 2-D or per head
3-D, ``is_causal``, ``need_weights`` / ``average_attn_weights``, dropout on the attention
weights in training, unbatched inputs), so the parents that call an ``nn.MultiheadAttention``
(torchvision's ViT ``EncoderBlock``, ``nn.TransformerEncoderLayer``) call it unchanged.

Deviations from ``nn.MultiheadAttention``, all forced by the narrower heads:

* a per-head 3-D ``attn_mask`` ``[B * num_heads_before, L, S]`` is given in the *original*
  head numbering (what the parent was written for) and the kept heads' slices are used;
* the attention weights returned with ``need_weights`` average over the kept heads only;
* ``_qkv_same_embed_dim`` is False, so torch's fused encoder-layer fast path (which assumes
  ``embed_dim == num_heads * head_dim``) is never taken; ``kdim`` / ``vdim`` other than
  ``embed_dim``, ``bias_k`` / ``bias_v`` and ``add_zero_attn`` are not supported (refused by
  :meth:`from_attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.pruning._dependency import dense_weight

__all__ = ["PrunedMultiheadAttention", "attention_weights", "check_attention"]


def check_attention(m: nn.Module, name: str) -> None:
    """ValueError for an attention whose heads cannot be split here (named, with why)."""
    if isinstance(m, PrunedMultiheadAttention):
        return
    why = []
    if not m._qkv_same_embed_dim:
        why.append(f"kdim={m.kdim} / vdim={m.vdim} differ from embed_dim={m.embed_dim}")
    if m.bias_k is not None or m.bias_v is not None:
        why.append("add_bias_kv=True")
    if m.add_zero_attn:
        why.append("add_zero_attn=True")
    if why:
        raise ValueError(
            f"prune_channels: expected attentions with one packed in-projection (kdim = vdim = "
            f"embed_dim, no bias_k / bias_v, no add_zero_attn) to prune heads, got {name!r} "
            f"with {', '.join(why)}"
        )


def attention_weights(m: nn.Module):
    """The weights an attention computes with (masks applied for sparsekern's
    ``SparseMultiheadAttention``), per head: ``w_in [3, H, d, E]``, ``b_in [3, H, d]`` or None,
    ``w_out [E, H, d]``, ``b_out [E]`` or None (all detached)."""
    h, d = m.num_heads, m.head_dim
    w = m.in_proj_weight.detach()
    mask = getattr(getattr(m, "in_proj", None), "mask", None)
    if mask is not None:
        w = w * mask
    e = w.shape[1]
    b = m.in_proj_bias.detach().view(3, h, d) if m.in_proj_bias is not None else None
    w_out = dense_weight(m.out_proj).view(e, h, d)
    b_out = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
    return w.view(3, h, d, e), b, w_out, b_out


class PrunedMultiheadAttention(nn.Module):
    """Self-attention over ``num_heads`` kept heads of width ``head_dim`` on an ``embed_dim``
    stream (module docstring). Build one with :meth:`from_attention`.

    Parameters: ``in_proj_weight [3 * num_heads * head_dim, embed_dim]`` (q, k, v blocks, each
    head-major as in ``nn.MultiheadAttention``), ``in_proj_bias [3 * num_heads * head_dim]`` or
    None, ``out_proj`` an ``nn.Linear(num_heads * head_dim, embed_dim)``. Buffer ``kept_heads``
    ``[num_heads]``: the kept heads' indices in the attention it came from.
    """

    _qkv_same_embed_dim = False  # keeps torch's fused encoder-layer path off (see module doc)
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        num_heads_before: int,
        *,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not (1 <= num_heads <= num_heads_before):
            raise ValueError(
                f"PrunedMultiheadAttention: expected 1 <= num_heads <= num_heads_before="
                f"{num_heads_before}, got {num_heads}"
            )
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.num_heads_before = num_heads_before
        self.kdim = self.vdim = embed_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=out_bias, **kw)
        self.register_buffer("kept_heads", torch.arange(num_heads, device=device))
        if self.in_proj_weight.device.type != "meta":
            nn.init.xavier_uniform_(self.in_proj_weight)
        #: for head importances only: when set to a list, every forward appends a ``[B, H]``
        #: gate of ones (requires grad) multiplying each head's output
        self.gates: list[torch.Tensor] | None = None

    @classmethod
    @torch.no_grad()
    def from_attention(cls, m: nn.Module, keep: torch.Tensor) -> PrunedMultiheadAttention:
        """The attention ``m`` (``nn.MultiheadAttention``, sparsekern's sparse one, or a pruned
        one) restricted to the heads where ``keep`` ``[num_heads]`` (bool) is True; fresh
        parameters (copies), same device, dtype and training mode."""
        check_attention(m, type(m).__name__)
        keep = torch.as_tensor(keep, dtype=torch.bool).cpu()
        if keep.shape != (m.num_heads,) or not bool(keep.any()):
            raise ValueError(
                f"PrunedMultiheadAttention.from_attention: expected a bool keep of shape "
                f"[{m.num_heads}] with at least one True, got shape {list(keep.shape)} with "
                f"{int(keep.sum())} True"
            )
        w_in, b_in, w_out, b_out = attention_weights(m)
        idx = keep.nonzero().flatten().to(w_in.device)
        before = getattr(m, "num_heads_before", m.num_heads)
        kept_before = m.kept_heads[idx] if hasattr(m, "kept_heads") else idx
        new = cls(
            m.embed_dim,
            len(idx),
            m.head_dim,
            before,
            bias=b_in is not None,
            out_bias=b_out is not None,
            dropout=m.dropout,
            batch_first=m.batch_first,
            device="meta",
            dtype=w_in.dtype,
        )  # fmt: skip  (meta: no random init of weights replaced at once)
        grad = m.in_proj_weight.requires_grad
        new.in_proj_weight = nn.Parameter(
            w_in[:, idx].reshape(-1, m.embed_dim).clone(), requires_grad=grad
        )
        if b_in is not None:
            new.in_proj_bias = nn.Parameter(b_in[:, idx].reshape(-1).clone(), requires_grad=grad)
        out = nn.Linear(len(idx) * m.head_dim, m.embed_dim, bias=b_out is not None, device="meta")
        out.weight = nn.Parameter(
            w_out[:, idx].reshape(m.embed_dim, -1).clone(),
            requires_grad=m.out_proj.weight.requires_grad,
        )
        if b_out is not None:
            out.bias = nn.Parameter(b_out.clone(), requires_grad=m.out_proj.bias.requires_grad)
        new.out_proj = out
        new.kept_heads = kept_before.clone()
        return new.train(m.training)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads} of "
            f"{self.num_heads_before}, head_dim={self.head_dim}, batch_first={self.batch_first}"
        )

    def _mask(self, attn_mask, key_padding_mask, is_causal, b, lq, lk, like):
        """One additive float mask broadcastable to ``[B, H, L, S]``, or None."""
        out = None

        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(
                    m, float("-inf")
                )
            return m.to(like.dtype)

        if attn_mask is not None:
            am = additive(attn_mask)
            if am.dim() == 2:  # [L, S]
                am = am.view(1, 1, lq, lk)
            else:  # [B * num_heads_before, L, S] in the original numbering
                am = am.view(b, self.num_heads_before, lq, lk)[:, self.kept_heads]
            out = am
        elif is_causal:
            out = torch.full((lq, lk), float("-inf"), dtype=like.dtype, device=like.device)
            out = out.triu(1).view(1, 1, lq, lk)
        if key_padding_mask is not None:
            kp = additive(key_padding_mask).view(b, 1, 1, lk)
            out = kp if out is None else out + kp
        return out

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query [B, L, E]`` (``[L, B, E]`` unless batch_first; ``[L, E]`` unbatched), ``key``
        / ``value`` ``[B, S, E]`` likewise -> ``(output like query, weights [B, L, S]`` (or
        ``[B, H, L, S]`` without averaging) ``or None)``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (
            F.linear(t, wi, bi).view(b, t.shape[1], h, d).transpose(1, 2)  # [B, H, L, d]
            for t, wi, bi in zip((query, key, value), w, bias)
        )
        mask = self._mask(attn_mask, key_padding_mask, is_causal, b, lq, lk, q)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            a = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # [B, H, L, S]
            a = torch.softmax(a if mask is None else a + mask, dim=-1)
            if p > 0:
                a = F.dropout(a, p)
            ctx = a @ v
            weights = a.mean(1) if average_attn_weights else a
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        if self.gates is not None:
            g = torch.ones(b, h, dtype=ctx.dtype, device=ctx.device, requires_grad=True)
            self.gates.append(g)
            ctx = ctx * g.view(b, h, 1, 1)
        out = F.linear(ctx.transpose(1, 2).reshape(b, lq, h * d), self.out_proj.weight,
                       self.out_proj.bias)  # fmt: skip
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
