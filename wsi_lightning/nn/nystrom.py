"""Nyström self-attention (Xiong et al., AAAI 2021) for padded batches of bags.

Softmax attention ``softmax(Q Kᵀ / √d) V`` over N tokens is approximated with m landmarks
``Q̃, K̃`` (segment means of Q and K), at O(N·m) cost instead of O(N²) (paper Eq. 14)::

    out = softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V

``pinv`` is the iterative Moore–Penrose approximation of Razavi et al. (2014) used by the paper
(Eq. 13), started from ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞)``::

    Z_{j+1} = ¼ Z_j (13 I − A Z_j (15 I − A Z_j (7 I − A Z_j)))

An optional depthwise convolution of the values along the sequence (one kernel of size 33 per
head, shared across the head's channels) is added to the output, as in the paper's code.

Masking. A bag is the set of valid tokens of one row; padded tokens never change valid outputs,
and a padded batch gives each bag the output it gets alone:
    - A bag's n valid tokens are treated as if padded *at the end* to m·l tokens, l = ⌈n/m⌉, and
      cut into m segments of l tokens. Landmark j is the mean of the valid tokens of segment j:
      padding counts neither in the sum nor in the divisor. The segmentation depends on n only,
      never on the padded length N of the batch.
    - A segment with no valid token (when n is not a multiple of m, e.g. n = 9, m = 8, l = 2 leaves
      segments 5..7 empty) gives an empty landmark. Empty landmarks are masked out of
      ``softmax(Q K̃ᵀ)`` and ``softmax(Q̃ K̃ᵀ)``, whose rows for them become identity rows, so the
      pseudo-inverse acts on the valid block alone (the iteration preserves the block structure).
    - Padded keys are masked out of ``softmax(Q̃ Kᵀ)``; padded values are zeroed before the
      convolution, so it sees the zero border a lone bag sees; padded outputs are 0.
    - Masks whose valid tokens are not contiguous at the front are compacted first (stable sort)
      and the outputs scattered back, so the convolution sees neighbours in bag order.

Deviations from the library HAG-MIL uses (nystrom-attention 0.0.11):
    - It pads the sequence at the *front* with zero tokens that count in the first landmark's
      mean and take part in the key softmax; here padding is never attended to.
    - Its pinv start divides by norms maxed over the whole batch and all heads; here the norms
      are per matrix, so results do not depend on what else is in the batch.
    - The attention core runs in float32 (autocast off): the iterative pinv is fragile in fp16.
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_lightning.nn.attention import masked_softmax


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose pseudo-inverse by the iteration of Razavi et al. (2014).

    Args:
        a: (..., m, m) square matrices.
        iters: number of iterations (6 in the paper).

    Returns:
        (..., m, m) approximate ``pinv(a)``.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (m, m)
    norm_1 = a.abs().sum(-2).amax(-1)  # (...,) largest column sum
    norm_inf = a.abs().sum(-1).amax(-1)  # (...,) largest row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]  # (..., m, m)
    for _ in range(iters):
        az = a @ z  # (..., m, m)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_landmarks(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, num_landmarks: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Landmarks as means of consecutive segments of each bag's valid tokens (see module doc).

    Args:
        q, k: (B, H, N, d) queries and keys.
        mask: (B, N) bool, True for valid tokens.
        num_landmarks: m.

    Returns:
        q_l, k_l: (B, H, m, d) landmark queries / keys (0 for empty landmarks);
        valid: (B, m) bool, False for empty landmarks.
    """
    b, h, n, d = q.shape
    m = num_landmarks
    n_valid = mask.sum(1)  # (B,)
    seg_len = torch.div(n_valid + m - 1, m, rounding_mode="floor").clamp(min=1)  # (B,) l = ⌈n/m⌉
    rank = mask.long().cumsum(1) - 1  # (B, N) position among the bag's valid tokens
    seg = torch.where(mask, rank // seg_len[:, None], m)  # (B, N) segment; padding -> bucket m
    counts = q.new_zeros(b, m + 1).scatter_add_(1, seg, mask.to(q.dtype))[:, :m]  # (B, m)
    index = seg[:, None, :, None].expand(b, h, n, d)  # (B, H, N, d)

    def means(t: torch.Tensor) -> torch.Tensor:
        sums = t.new_zeros(b, h, m + 1, d).scatter_add_(2, index, t)[:, :, :m]  # (B, H, m, d)
        return sums / counts.clamp(min=1)[:, None, :, None]

    return means(q), means(k), counts > 0


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      num_landmarks: int, pinv_iterations: int = 6) -> torch.Tensor:
    """Masked Nyström approximation of ``softmax(q kᵀ) v`` (q already scaled by 1/√d).

    Args:
        q, k, v: (B, H, N, d).
        mask: (B, N) bool, True for valid tokens.
        num_landmarks: m.
        pinv_iterations: iterations of :func:`iterative_pinv`.

    Returns:
        (B, H, N, d); 0 at padded positions.
    """
    m = num_landmarks
    valid = mask[:, None, :, None]  # (B, 1, N, 1)
    q, k, v = (t.masked_fill(~valid, 0.0) for t in (q, k, v))
    q_l, k_l, lm_valid = segment_landmarks(q, k, mask, m)  # (B, H, m, d) x2, (B, m)
    lm_cols = lm_valid[:, None, None, :]  # (B, 1, 1, m)
    kernel_1 = masked_softmax(q @ k_l.transpose(-1, -2), lm_cols)  # (B, H, N, m)
    kernel_2 = masked_softmax(q_l @ k_l.transpose(-1, -2), lm_cols)  # (B, H, m, m)
    eye = torch.eye(m, dtype=q.dtype, device=q.device)  # (m, m)
    kernel_2 = torch.where(lm_valid[:, None, :, None], kernel_2, eye)  # empty rows -> identity
    kernel_3 = masked_softmax(q_l @ k.transpose(-1, -2), mask[:, None, None, :])  # (B, H, m, N)
    out = (kernel_1 @ iterative_pinv(kernel_2, pinv_iterations)) @ (kernel_3 @ v)  # (B, H, N, d)
    return out.masked_fill(~valid, 0.0)


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with padding masks.

    Args:
        dim: token size D (input and output).
        heads: number of heads H.
        dim_head: size d of each head (inner size H·d).
        num_landmarks: m.
        pinv_iterations: iterations of the pseudo-inverse (6 in the paper).
        residual_conv: add the depthwise convolution of the values along the sequence.
        conv_kernel: its kernel size along the sequence (odd; 33 in the paper's code).
        dropout: dropout after the output projection.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_conv: bool = True, conv_kernel: int = 33,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if conv_kernel % 2 != 1:
            raise ValueError(f"NystromAttention: conv_kernel={conv_kernel} must be odd "
                             "(the convolution keeps the sequence length)")
        if num_landmarks < 1:
            raise ValueError(f"NystromAttention: num_landmarks={num_landmarks} must be >= 1")
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = (
            nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                      bias=False)
            if residual_conv else None
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, N, D) tokens.
            mask: (B, N) bool, True for valid tokens; None = all valid.

        Returns:
            (B, N, D); 0 at padded positions.
        """
        b, n, _ = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        order = None
        if (mask[:, 1:] & ~mask[:, :-1]).any():  # a valid token after a pad: compact first
            order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # (B, N)
            x = x.gather(1, order[..., None].expand_as(x))  # (B, N, D) valid tokens first
            mask = mask.gather(1, order)  # (B, N)
        qkv = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        v = v.masked_fill(~mask[:, None, :, None], 0.0)  # (B, H, N, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = nystrom_attention(q.float() * self.scale, k.float(), v.float(), mask,
                                    self.num_landmarks, self.pinv_iterations)  # (B, H, N, d)
        if self.res_conv is not None:
            out = out + self.res_conv(v).float()  # per-head conv along N: (B, H, N, d)
        out = out.masked_fill(~mask[:, None, :, None], 0.0).to(qkv.dtype)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, H·d)
        out = self.to_out(out).masked_fill(~mask[..., None], 0.0)  # (B, N, D)
        if order is not None:  # back to the caller's token order
            out = torch.zeros_like(out).scatter_(1, order[..., None].expand_as(out), out)
        return out
