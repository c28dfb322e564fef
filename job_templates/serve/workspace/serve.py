"""Serve a digits classifier (torch) over HTTP: POST /predict, GET /health.

The model is the train template's checkpoint when MODEL_PATH names one, else a small MLP trained here on
scikit-learn's digits (ships with the package: nothing is downloaded). Listens on $FEDML_SERVE_HOST:$PORT,
which the serve supervisor gives each replica.
"""

import os
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from sklearn.datasets import load_digits
from torch import nn

REPLICA = int(os.environ.get("FEDML_REPLICA_INDEX", "0"))


def build() -> tuple[nn.Module, float]:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    path = os.environ.get("MODEL_PATH")
    if path:
        ck = torch.load(path, map_location="cpu")
        model.load_state_dict(ck["state_dict"])
        print(f"replica {REPLICA}: loaded {path} (accuracy {ck.get('accuracy', float('nan')):.4f})")
        return model.eval(), float(ck.get("accuracy", 0.0))
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    xt, yt = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"replica {REPLICA}: trained a model on digits (train accuracy {acc:.4f})")
    return model.eval(), acc


class PredictIn(BaseModel):
    # rows of 64 pixel values (0..16, as in load_digits)
    inputs: list[list[float]] = Field(min_length=1, max_length=1024)


app = FastAPI()
started = time.time()
model, accuracy = build()


@app.get("/health")
def health() -> dict:
    return {"ok": True, "replica": REPLICA, "accuracy": accuracy}


@app.post("/predict")
def predict(body: PredictIn) -> dict:
    if any(len(row) != 64 for row in body.inputs):
        raise HTTPException(422, "each input row needs 64 values (an 8x8 digit image, 0..16)")
    with torch.no_grad():
        out = model(torch.tensor(body.inputs, dtype=torch.float32) / 16.0)
    return {"predictions": out.argmax(1).tolist(), "replica": REPLICA}


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("FEDML_SERVE_HOST", "127.0.0.1")
    print(f"replica {REPLICA}: serving on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
