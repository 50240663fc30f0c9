"""Federated pruning: clients train the server's reduced model on their private data, the server
averages their weights (FedAvg, McMahan et al. 2017) and prunes the average (Lin et al. 2022,
"Federated Pruning: improving neural network efficiency with federated learning"); the new masks
go back to the clients with the weights.

Two runs of the same rounds: :meth:`FederatedPruning.run_round` simulates every client in this
process; :meth:`FederatedPruning.run_round_distributed` runs each process's clients under
``torch.distributed`` (gloo, one process per client or several clients per process) and gives the
same weights and masks, bitwise: the aggregation sums the clients in client order in float64 on
every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.pruning.base import BasePruner
from sparsekern.pruning.importance import MagnitudeImportance, score_masks

__all__ = ["FederatedPruning", "split_clients"]

Batch = tuple[torch.Tensor, torch.Tensor]


def split_clients(
    labels: torch.Tensor,
    num_clients: int,
    iid: bool = True,
    shards_per_client: int = 2,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Indices of each client's examples (McMahan et al. 2017's MNIST splits).

    IID: a random permutation cut into ``num_clients`` equal parts. Non-IID: the examples sorted
    by label, cut into ``num_clients * shards_per_client`` equal shards, each client given
    ``shards_per_client`` random shards (with 2, most clients see two digits only).

    Args:
        labels: ``[N]`` int labels.
    Returns:
        ``num_clients`` int64 index tensors, disjoint, each of ``N // num_clients`` examples
        (the remainder unused).
    """
    if labels.dim() != 1:
        raise ValueError(f"split_clients: expected labels [N], got {list(labels.shape)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"split_clients: expected num_clients >= 1, got {num_clients!r}")
    n = labels.numel()
    if iid:
        per = n // num_clients
        perm = torch.randperm(n, generator=generator)
        return [perm[k * per : (k + 1) * per].clone() for k in range(num_clients)]
    shards = num_clients * shards_per_client
    size = n // shards
    if size < 1:
        raise ValueError(f"split_clients: expected >= {shards} examples, got {n}")
    order = torch.sort(labels, stable=True).indices
    pick = torch.randperm(shards, generator=generator).view(num_clients, shards_per_client)
    return [
        torch.cat([order[s * size : (s + 1) * size] for s in pick[k].tolist()])
        for k in range(num_clients)
    ]


class FederatedPruning(BasePruner):
    """FedAvg with server-side magnitude pruning; the masks travel to the clients.

    Each round: every client gets a copy of the server's model (weights and masks), trains it
    ``local_epochs`` over its data with SGD (batch ``batch_size``; the masks hold, pruned
    weights stay zero), returns its weights; the server averages them weighted by the clients'
    example counts (FedAvg), then prunes the average to the round's target (``schedule`` on the
    round clock, e.g. ``Geometric(0.9, rounds=5)``, or ``sparsity``), by ``|w|`` per layer or
    globally (``scope``); pruned weights never return. Loop::

        fed = FederatedPruning(model, schedule=Geometric(0.9, rounds=5), lr=0.05)
        for r in range(20):
            fed.run_round(clients)      # [(x_k, y_k)], or run_round_distributed(...) per rank

    Deviations from the papers: every client takes part in every round (McMahan's C = 1; the
    sampling of a client fraction is left to the caller, who passes the round's clients);
    clients run plain SGD (no momentum carried between rounds, as FedAvg); the server prunes
    by magnitude (Lin et al. also study other criteria on ASR models).

    Args:
        model: the server's model, with sparse layers.
        optimizer: unused by the server (None); accepted for the lifecycle.
        local_epochs: passes over each client's data per round (McMahan: E = 1 or 5).
        batch_size: client batch (McMahan: B = 10).
        lr, momentum: the clients' SGD.
        loss_fn: ``loss_fn(logits, y)``, default cross-entropy.
        seed: seeds each client's batch order per round (client ``k``, round ``r``: the
            generator ``seed * 1_000_003 + r * 1009 + k``), so that both runs shuffle alike.
        scope: ``"layer"`` or ``"global"`` magnitude ranking.
        sparsity, schedule, layers: see :class:`BasePruner`.
    """

    monotone = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        local_epochs: int = 1,
        batch_size: int = 10,
        lr: float = 0.05,
        momentum: float = 0.0,
        loss_fn: Callable | None = None,
        seed: int = 0,
        scope: str = "layer",
        **base,
    ) -> None:
        if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
            raise ValueError(f"FederatedPruning: expected local_epochs >= 1, got {local_epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FederatedPruning: expected batch_size >= 1, got {batch_size!r}")
        if not lr > 0:
            raise ValueError(f"FederatedPruning: expected lr > 0, got {lr}")
        if scope not in ("layer", "global"):
            raise ValueError(f"FederatedPruning: expected scope 'layer' or 'global', got {scope!r}")
        super().__init__(model, optimizer, **base)
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.loss_fn = loss_fn or F.cross_entropy
        self.seed = int(seed)
        self.scope = scope
        # what FedAvg averages: every floating tensor of the state except the masks (server's)
        self._keys = [
            k
            for k, v in model.state_dict().items()
            if v.is_floating_point() and not k.endswith("mask")
        ]

    # ------------------------------------------------------------------ clients
    def client_update(self, k: int, data: Batch) -> nn.Module:
        """Client ``k``'s local training this round on ``data = (x [n, ...], y [n])``: a copy of
        the server's model (weights and masks), ``local_epochs`` of SGD. Returns the copy."""
        x, y = data
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"FederatedPruning: expected client {k}'s x and y with the same number (> 0) of "
                f"examples, got {x.shape[0]} and {y.shape[0]}"
            )
        local = copy.deepcopy(self.model)
        local.train()
        opt = torch.optim.SGD(local.parameters(), lr=self.lr, momentum=self.momentum)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds * 1009 + k)
        for _ in range(self.local_epochs):
            order = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], self.batch_size):
                idx = order[i : i + self.batch_size]
                loss = self.loss_fn(local(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return local

    def _contribution(self, local: nn.Module, n: int) -> torch.Tensor:
        state = local.state_dict()
        return torch.cat([state[k].detach().double().flatten() for k in self._keys]) * n

    # ------------------------------------------------------------------ server
    @torch.no_grad()
    def _aggregate(self, rows: Sequence[torch.Tensor], counts: Sequence[int]) -> None:
        """FedAvg: ``sum_k n_k w_k / sum_k n_k`` in float64, clients summed in order. For
        identical clients the result is their weights exactly (``n_k w`` and the partial sums
        are exact in float64 for float32 ``w``)."""
        acc = torch.zeros_like(rows[0])
        for r in rows:
            acc += r
        acc /= float(sum(counts))
        state = self.model.state_dict()
        i = 0
        for k in self._keys:
            t = state[k]
            t.copy_(acc[i : i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()

    def _server_prune(self) -> bool:
        if self.schedule is None and self.sparsity is None:
            return False
        target = self._default_target()
        scores = MagnitudeImportance()(self.layers)
        masks = score_masks(self.layers, scores, target, self.scope, None, "FederatedPruning")
        return self._apply(masks, target=target, event="round")

    def run_round(self, clients: Sequence[Batch]) -> dict:
        """One round simulated in this process over ``clients = [(x_k, y_k), ...]``. Returns
        ``{"round", "sparsity", "changed"}``."""
        if not clients:
            raise ValueError("FederatedPruning.run_round: expected at least one client, got none")
        rows, counts = [], []
        for k, data in enumerate(clients):
            local = self.client_update(k, data)
            rows.append(self._contribution(local, int(data[0].shape[0])))
            counts.append(int(data[0].shape[0]))
        return self._finish(rows, counts)

    def run_round_distributed(
        self, clients: dict[int, Batch], num_clients: int, group=None
    ) -> dict:
        """One round with this process training ``clients = {k: (x_k, y_k)}`` (its share of the
        ``num_clients``; each client on exactly one rank). The contributions are all-reduced as
        a ``[num_clients, P]`` float64 matrix whose row ``k`` only client ``k``'s rank fills
        (``x + 0 = x``: exact), then summed in client order: every rank ends with the weights
        and masks :meth:`run_round` gives."""
        import torch.distributed as dist

        if not clients or any(not 0 <= k < num_clients for k in clients):
            raise ValueError(
                f"FederatedPruning.run_round_distributed: expected client ids in "
                f"[0, {num_clients}), got {sorted(clients)}"
            )
        p = sum(self.model.state_dict()[k].numel() for k in self._keys)
        rows = torch.zeros(num_clients, p, dtype=torch.float64)
        counts = torch.zeros(num_clients, dtype=torch.float64)
        for k in sorted(clients):
            local = self.client_update(k, clients[k])
            n = int(clients[k][0].shape[0])
            rows[k] = self._contribution(local, n)
            counts[k] = n
        dist.all_reduce(rows, group=group)
        dist.all_reduce(counts, group=group)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"FederatedPruning: no rank trained clients {missing}")
        return self._finish(list(rows), [int(c) for c in counts.tolist()])

    def _finish(self, rows, counts) -> dict:
        self._aggregate(rows, counts)
        changed = self._server_prune()
        if not changed and self.schedule is None and self.sparsity is None:
            self.rounds += 1
        return {"round": self.rounds, "sparsity": self.current_sparsity(), "changed": changed}

    def compute_masks(self, sparsity, closure=None) -> dict[str, torch.Tensor]:
        scores = MagnitudeImportance()(self.layers)
        return score_masks(self.layers, scores, sparsity, self.scope, None, "FederatedPruning")

    def _config(self) -> dict:
        return {
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "seed": self.seed,
            "scope": self.scope,
        }
