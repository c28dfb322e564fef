"""Train a small MLP on scikit-learn's digits (ships with the package: nothing is downloaded).

Prints the loss every epoch and the final test accuracy, and reports them as metrics (`fedml.log`: `fedml run
metrics RUN` plots them); saves the model to $FEDML_ARTIFACT_DIR/model.pt, which the scheduler keeps as the
run's artifact.
"""

import argparse
import os
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

try:
    import fedml  # installed with the agent on every node (light: no torch of its own)
except ImportError:  # run by hand elsewhere: metrics only printed
    fedml = None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu"
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=args.seed,
                                                        stratify=y)
    to = lambda a, t: torch.tensor(a, dtype=t, device=device)  # noqa: E731
    xt, yt, xv, yv = to(x_train, torch.float32), to(y_train, torch.long), to(x_test, torch.float32), to(y_test, torch.long)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    print(f"training on {device}: {len(xt)} train / {len(xv)} test samples, {args.epochs} epochs")
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(xt), device=device)
        total = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch} loss {total / len(xt):.4f}")
        if fedml is not None:
            fedml.log({"loss": total / len(xt)}, step=epoch)
    model.eval()
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    print(f"final accuracy {acc:.4f}")
    if fedml is not None:
        fedml.log({"accuracy": acc}, step=args.epochs)

    out = Path(os.environ.get("FEDML_ARTIFACT_DIR", "."))
    torch.save({"state_dict": model.state_dict(), "accuracy": acc}, out / "model.pt")
    print(f"saved checkpoint to {out / 'model.pt'}")


if __name__ == "__main__":
    main()
