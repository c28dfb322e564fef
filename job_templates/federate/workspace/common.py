"""What the server and the clients share: the model, the data and its non-IID split, training and evaluation.

The data is scikit-learn's bundled `load_digits` (1797 8x8 images, 10 classes; never downloaded). A fixed 20 %
test split stays with the server. The rest is dealt to the clients label-skewed: client k "owns" a few
classes (client 1: 0-2, client 2: 3-5, client 3: 6-9 with 3 clients) and gets 70 % of those classes' samples;
the other 30 % of every class is shared evenly by the clients that do not own it. So each client sees mostly
its own classes, and only the federated average knows all ten well. Everything is seeded: the same split on
every node.
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
OWN_SHARE = 0.7
NUM_CLASSES = 10

torch.set_num_threads(1)  # several ranks may share one small machine


def make_model() -> nn.Module:
    torch.manual_seed(SEED)  # every rank starts from the same weights (the server's are sent anyway)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=SEED, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def owners(num_clients: int) -> dict[int, int]:
    """class -> the client (1..N) that owns it: the classes in N contiguous blocks."""
    return {c: 1 + c * num_clients // NUM_CLASSES for c in range(NUM_CLASSES)}


def client_data(client: int, num_clients: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client `client`'s (1..N) label-skewed shard of the training split."""
    x, y, _, _ = _data()
    g = torch.Generator().manual_seed(SEED)
    own = owners(num_clients)
    mine: list[torch.Tensor] = []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(OWN_SHARE * len(idx)))
        if num_clients == 1:
            mine.append(idx)
        elif own[c] == client:
            mine.append(idx[:cut])
        else:
            others = [k for k in range(1, num_clients + 1) if k != own[c]]
            mine.append(idx[cut:][others.index(client)::len(others)])
    sel = torch.cat(mine)
    return x[sel], y[sel]


def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = _data()
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.1,
          batch_size: int = 32, seed: int = 0) -> float:
    """`epochs` of SGD on (x, y); returns the last epoch's mean loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    mean = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        mean = total / len(x)
    return mean


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default
