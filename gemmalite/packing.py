"""bf16 weights packed once into oneDNN's layout, for CPU decoding.

At batch 1 a decode step is one matrix-vector product per weight, and its speed is the speed of
reading the weights. PyTorch's plain bf16 matmul reads them at well under the CPU's bandwidth;
oneDNN's linear on weights reordered once into its blocked layout (what PyTorch's own CPU
inference path uses after freezing) reads them about twice as fast. Measured on the 2-core
AVX-512 machine of docs/benchmarks.md: the 262144 x 640 head took 21.5 ms per token plain, 12.2 ms
packed; the real 270M decoded 1.36x faster packed than plain (eager, alternating in one process),
with the same greedy tokens.

Every projection is packed, and so is the output head. The head is the tied embedding, whose
plain rows are still needed for lookups, so it is kept twice: vocab x hidden more bf16 values
(335 MB for the 270M; see weights.md). Only bf16 on CPU is packed, where oneDNN has bf16
kernels; float32, the precision that proofs run in, keeps PyTorch's plain matmul.

torch.compile cannot take packed weights as graph inputs (inductor accepts them only as frozen
constants), so the matmul is a custom op that finds them by key, the way quantize.py's int8
matmul does; compiled graphs call it like any other kernel.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

# Weights in a layout only their kernel can read, by key. A module registers its own and the
# entry goes when the module does.
_OPAQUE: dict[int, object] = {}
_keys = itertools.count()


def hold(owner: object, weights: object) -> int:
    """Keep `weights` for as long as `owner` lives; the key that custom ops find them by."""
    key = next(_keys)
    _OPAQUE[key] = weights
    weakref.finalize(owner, _OPAQUE.pop, key, None)
    return key


def replace(key: int, weights: object) -> None:
    """Put new `weights` under a key that is held (graphs that read the key read them from now on)."""
    _OPAQUE[key] = weights


def held(key: int) -> object:
    return _OPAQUE[key]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a forward reads: parameters, plus packed weights (`packed_bytes` of a module)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(getattr(m, "packed_bytes", 0) for m in model.modules())


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this build and CPU run oneDNN's bf16 linear (and the weights are bf16 on CPU)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


# Registered on the dispatcher directly, not with torch.library.custom_op, whose Python wrappers
# cost about 18 us a call (73 calls a decode step). The key is a tensor, one of the model's
# buffers, so a compiled graph reads it at run time: a package built in another process, where
# the keys were numbered otherwise, still finds this process's weights.
_LIBRARY = torch.library.Library("gemmalite", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor key, int out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, key: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., in] @ packed weight [out, in]^T, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, held(int(key)), None, "none", [], "")


_LIBRARY.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("gemmalite::packed_linear")
def _(x: torch.Tensor, key: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight [out, in] is packed for oneDNN."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_bytes = weight.numel() * 2
        # The layout is chosen for one row at a time (decoding); longer inputs run on it too.
        key = hold(self, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1))
        self.register_buffer("key", torch.tensor(key), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gemmalite.packed_linear(x, self.key, self.out_features)


class TiedEmbeddingWithHead(nn.Module):
    """The tied embedding with its output head in another form: plain rows for lookups, `head` for logits."""

    def __init__(self, weight: torch.Tensor, head: nn.Module):
        super().__init__()
        # A buffer, not a parameter: decoding reads one row of it per token, not all of it.
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class PackedTiedEmbedding(TiedEmbeddingWithHead):
    def __init__(self, weight: torch.Tensor):
        super().__init__(weight, PackedLinear(weight))


def replace_linears(model: nn.Module, make) -> None:
    """Swap every bias-free nn.Linear of `model` for `make(weight)`, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, make(child.weight))


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Swap every linear layer and the tied head for packed versions, in place (bf16 on CPU)."""
    replace_linears(model, PackedLinear)
    model.embed_tokens = PackedTiedEmbedding(model.embed_tokens.weight)
    return model
