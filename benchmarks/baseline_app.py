"""The baseline a user writes first: FastAPI + uvicorn, PyTorch eager, one image per call.

It loads the trained checkpoint of a run folder (`trainer.runs.load_trained`, the same weights
that `trainer export` turns into the service's ONNX file) and answers the service's /classify
and /classify_batch shapes, so the same Locust scenario drives both. It uses the contract's
`load_and_preprocess`, so both servers pay the same decode and give the same answers: the
benchmark then compares serving (ONNX Runtime + adaptive batching vs eager per request), not
two preprocessings.

    BASELINE_RUN_DIR=runs/demo uvicorn benchmarks.baseline_app:app --port 8000

Env: BASELINE_RUN_DIR (required), BASELINE_THREADS (torch intra-op threads, default 1),
BASELINE_TOP_K (default 3).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, UploadFile

from service.contract import ImageDecodeError, load_and_preprocess
from service.schemas import ErrorBody, ModelRef, Prediction

STATE: dict = {}


@asynccontextmanager
async def lifespan(_app: FastAPI):
    from trainer.runs import load_trained

    torch.set_num_threads(int(os.environ.get("BASELINE_THREADS", "1")))
    run_dir = os.environ.get("BASELINE_RUN_DIR")
    if not run_dir:
        raise RuntimeError("set BASELINE_RUN_DIR to a trainer run folder (checkpoints/best.pt)")
    model, contract, _checkpoint = load_trained(Path(run_dir))
    STATE.update(model=model, contract=contract, top_k=int(os.environ.get("BASELINE_TOP_K", "3")))
    yield
    STATE.clear()


app = FastAPI(title="baseline: FastAPI + PyTorch eager", lifespan=lifespan)


def _predict(batch: np.ndarray) -> list[dict]:
    contract, top_k = STATE["contract"], STATE["top_k"]
    with torch.inference_mode():
        probabilities = torch.softmax(STATE["model"](torch.from_numpy(batch)), dim=1).numpy()
    model = ModelRef(name=contract.name, version=contract.version)
    return [Prediction.from_scores(row, contract.labels, top_k=top_k, model=model).model_dump()
            for row in probabilities]


def _tensor(data: bytes) -> np.ndarray:
    try:
        return load_and_preprocess(data, STATE["contract"])
    except ImageDecodeError as exc:
        raise HTTPException(status_code=400,
                            detail=ErrorBody(error=exc.detail, reason=exc.reason).model_dump())


@app.post("/classify")
def classify(image: Annotated[UploadFile, File()]) -> dict:
    # A plain `def` endpoint: FastAPI runs it in its thread pool, as the docs advise for
    # blocking work; each request is decoded and run through the model on its own.
    return _predict(_tensor(image.file.read())[None])[0]


@app.post("/classify_batch")
def classify_batch(images: Annotated[list[UploadFile], File()]) -> dict:
    return {"predictions": _predict(np.stack([_tensor(f.file.read()) for f in images]))}


@app.get("/livez")
def livez() -> dict:
    return {"status": "ok"}


@app.get("/readyz")
def readyz() -> dict:
    if "model" not in STATE:
        raise HTTPException(status_code=503, detail="model not loaded")
    return {"status": "ready"}
