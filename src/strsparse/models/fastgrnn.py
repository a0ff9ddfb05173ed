"""FastGRNN (Kusupati et al., NeurIPS 2018): a gated RNN with one shared pre-activation.

For an input sequence x_1..x_T (batch, time, features) and h_0 = 0::

    a   = W x_t + U h_{t-1}
    z   = sigmoid(a + b_z)
    h~  = tanh(a + b_h)
    h_t = z * h_{t-1} + (sigmoid(zeta) * (1 - z) + sigmoid(nu)) * h~

with learnable scalars zeta (initialised 1.0) and nu (-4.0) and biases b_z, b_h (1.0). The
classifier ``fc`` reads h_T. W (hidden, features) and U (hidden, hidden) are dense
``nn.Linear`` layers, or ``LowRankLinear`` layers W = W1 W2, U = U1 U2 when ``rank_w`` /
``rank_u`` are given; biases and the classifier stay dense (the STR paper, Appendix A.7).
``sparsify(model, "str", structure="rank")`` learns the ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from strsparse.errors import OptionError
from strsparse.layers import LowRankLinear

from .registry import check_positive_int, register_model

__all__ = ["FastGRNN", "fastgrnn"]


def _projection(in_features: int, out_features: int, rank: int | None, name: str) -> nn.Module:
    if rank is None:
        return nn.Linear(in_features, out_features, bias=False)
    check_positive_int(rank, name)
    return LowRankLinear(in_features, out_features, rank)


class FastGRNN(nn.Module):
    """FastGRNN over (batch, time, features) inputs, classifying the last hidden state."""

    classifier_name = "fc"

    def __init__(
        self,
        *,
        num_classes: int = 10,
        input_size: int = 28,
        hidden_size: int = 32,
        rank_w: int | None = None,
        rank_u: int | None = None,
        seq_len: int = 28,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(input_size, "input_size")
        check_positive_int(hidden_size, "hidden_size")
        check_positive_int(seq_len, "seq_len")
        self.input_size = input_size
        self.hidden_size = hidden_size
        # the sequence the model is built for; any length runs
        self.input_shape = (seq_len, input_size)
        self.w = _projection(input_size, hidden_size, rank_w, "rank_w")
        self.u = _projection(hidden_size, hidden_size, rank_u, "rank_u")
        self.bias_z = nn.Parameter(torch.ones(hidden_size))
        self.bias_h = nn.Parameter(torch.ones(hidden_size))
        self.zeta = nn.Parameter(torch.tensor(1.0))
        self.nu = nn.Parameter(torch.tensor(-4.0))
        self.fc = nn.Linear(hidden_size, num_classes)

    def hidden_states(self, x: Tensor) -> Tensor:
        """All hidden states h_1..h_T: (batch, time, features) -> (batch, time, hidden)."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise OptionError(
                f"FastGRNN expects (batch, time, {self.input_size}) inputs, "
                f"got shape {tuple(x.shape)}"
            )
        # parametrized W / U factors are computed once per sequence, not once per step
        with parametrize.cached():
            wx = self.w(x)  # (B, T, H): W x_t for every step at once
            h = x.new_zeros(x.shape[0], self.hidden_size)  # (B, H)
            gate_z = torch.sigmoid(self.zeta)
            gate_nu = torch.sigmoid(self.nu)
            states = []
            for t in range(x.shape[1]):
                a = wx[:, t] + self.u(h)  # (B, H)
                z = torch.sigmoid(a + self.bias_z)
                h_tilde = torch.tanh(a + self.bias_h)
                h = z * h + (gate_z * (1.0 - z) + gate_nu) * h_tilde
                states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden_states(x)[:, -1])  # (B, num_classes)

    def ranks(self) -> tuple[int | None, int | None]:
        """Stored ranks (r_W, r_U); None for a dense projection."""
        return tuple(  # type: ignore[return-value]
            p.rank if isinstance(p, LowRankLinear) else None for p in (self.w, self.u)
        )


@register_model
def fastgrnn(
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: int | None = None,
    hidden_size: int = 32,
    rank_w: int | None = None,
    rank_u: int | None = None,
    seq_len: int = 28,
) -> FastGRNN:
    """FastGRNN for (batch, time, features) sequences; ``input_size`` is the number of features
    per step (``in_channels``, the trainer's generic name, is accepted for it). ``rank_w`` /
    ``rank_u``: low-rank W and U (None: full rank, dense). Defaults: row-wise 28x28 images."""
    if input_size is not None and in_channels is not None and input_size != in_channels:
        raise OptionError(
            f"fastgrnn got input_size={input_size} and in_channels={in_channels}; they name the "
            "same thing (features per time step): give one"
        )
    features = input_size if input_size is not None else in_channels
    return FastGRNN(
        num_classes=num_classes,
        input_size=28 if features is None else features,
        hidden_size=hidden_size,
        rank_w=rank_w,
        rank_u=rank_u,
        seq_len=seq_len,
    )
