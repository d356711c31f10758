"""python -m faceage.serve --model model.pt: the ages of faces in photos over HTTP (FastAPI on uvicorn).

    POST /predict   multipart: one or more files in fields `file` or `files`; or JSON
                    {"images": [{"name": "a.jpg", "data": "<base64>"}, "<base64>", ...]} (or {"image": "<base64>"})
                    -> {"model_id", "images": [{"name", "status", "detail", "faces": [{"face_index", "box",
                        "landmarks", "alignment", "age", "uncertainty", "det_score"}]}], "seconds"}
    GET  /health    {"status": "ok", "model_id"}
    GET  /model     the model: id, format, head, input size, training data and its version, crop settings

The service is faceage.Estimator (the path of score and predict: detector, framing, crop, model, TTA), loaded
once per process. Limits, each a flag: the bytes of one request (--max-upload-mb), the pixels of one image
(--max-pixels, checked from its header before it is decoded), the images of one request (--max-images), the
wait for the model (--queue-seconds) and a request's own time (--timeout). A request the service cannot serve
gets a 4xx (503/504 when busy or too slow) with one line of JSON, {"error": "..."}, and no other request is
affected. A photo that reads but holds no usable face is not an error: its status says why (no_face, ...).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import io
import json
import sys
import time
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from schemas.crop import DETECTORS
from shell.cli import entry_points, log, number, Parser, path_arg, positive_int
from shell.errors import UserError

FILE_FIELDS = ("file", "files")
# a photo the service could not read is the caller's mistake (4xx); one without a usable face is an answer
UNREADABLE = {"not_an_image": 422, "empty_file": 422, "corrupt": 422, "unsupported_mode": 422, "too_large": 413}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the service."""

    max_upload_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    max_images: int = 16
    queue_seconds: float = 30.0  # the longest a request waits for the model
    timeout_seconds: float = 60.0  # the longest a request's own work may take


class RequestError(Exception):
    """A request the service refuses: its HTTP status and one line for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def error_response(status: int, message: str):
    return JSONResponse({"error": _one_line(message)}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees it (the rest is
    read and dropped, up to 4x the limit, so the client reads the answer instead of a reset connection)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size <= self.limit:
                chunks.append(message.get("body", b""))
            elif size > 4 * self.limit:
                break
        if size > self.limit or (declared is not None and declared.isdigit() and int(declared) > self.limit):
            shown = max(size, int(declared) if declared and declared.isdigit() else 0)
            response = error_response(413, f"the request holds {shown} bytes; the limit is {self.limit} "
                                           f"(--max-upload-mb): send fewer or smaller images per request")
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the app waits on a disconnect after the body: pass it through
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def read_images(request, limits: Limits) -> List[tuple]:
    """[(name, bytes)] from a multipart upload or a JSON body; RequestError for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:  # parts are bounded by the body's size (BodyLimit); their count is checked in check_images
            form = await request.form(max_files=100 * limits.max_images, max_fields=100 * limits.max_images)
        except Exception as e:  # noqa: BLE001 - starlette's MultiPartException and parser errors alike
            if "Too many" in str(e):
                raise RequestError(413, f"over {100 * limits.max_images} parts in one request; the limit is "
                                        f"{limits.max_images} images (--max-images)") from None
            raise RequestError(400, f"the multipart body does not parse ({_one_line(e)})") from None
        images, unknown = [], []
        for key, value in form.multi_items():
            if key in FILE_FIELDS and hasattr(value, "read"):
                images.append((value.filename or f"image {len(images)}", await value.read()))
            else:
                unknown.append(key)
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r}: send each image as a file in field 'file' "
                                    f"(or 'files')")
        return images
    if kind == "application/json":
        try:
            payload = json.loads(await request.body())
        except ValueError as e:
            raise RequestError(400, f"the JSON body does not parse ({_one_line(e)})") from None
        return _json_images(payload)
    raise RequestError(415, f"content type {kind or 'none'!r}: send multipart/form-data (field 'file') or "
                            f"application/json ({{\"images\": [base64, ...]}})")


def _json_images(payload) -> List[tuple]:
    if not isinstance(payload, dict) or not ({"images", "image"} & set(payload)):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise RequestError(400, f"JSON body holds {keys}: send {{\"images\": [{{\"name\": ..., \"data\": "
                                f"base64}}, ...]}} or {{\"image\": base64}}")
    items = payload["images"] if "images" in payload else [payload["image"]]
    if not isinstance(items, list):
        raise RequestError(400, "'images' must be a list of base64 strings or {\"name\", \"data\"} objects")
    images = []
    for index, item in enumerate(items):
        name, data = (item.get("name") or f"image {index}", item.get("data")) if isinstance(item, dict) \
            else (f"image {index}", item)
        if not isinstance(data, str):
            raise RequestError(400, f"image {index}: 'data' must be a base64 string")
        try:
            images.append((str(name), base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:")
                                                       else data, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"image {index} ({name}): its data is not base64") from None
    return images


def check_images(images: List[tuple], limits: Limits) -> None:
    """RequestError unless there are 1..max_images images, each an image whose header says at most
    max_pixels (read from the header: nothing is decoded yet)."""
    from PIL import Image

    if not images:
        raise RequestError(400, "no image in the request: send a file in field 'file' (multipart) or JSON "
                                "{\"images\": [base64, ...]}")
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images in one request; the limit is {limits.max_images} "
                                f"(--max-images): split them over several requests")
    for index, (name, raw) in enumerate(images):
        where = f"image {index} ({name})"
        if not raw:
            raise RequestError(422, f"{where}: empty (0 bytes)")
        try:
            with Image.open(io.BytesIO(raw)) as im:
                width, height = im.size
        except Image.DecompressionBombError:  # Pillow's own cap (about 179 MP) is above any --max-pixels here
            raise RequestError(413, f"{where}: over {limits.max_pixels} pixels (--max-pixels); Pillow calls it a "
                                    f"decompression bomb") from None
        except Exception:  # noqa: BLE001 - Pillow's UnidentifiedImageError and header parse errors alike
            raise RequestError(422, f"{where}: not an image Pillow reads (JPEG, PNG, WebP, ...)") from None
        if width * height > limits.max_pixels:
            raise RequestError(413, f"{where}: {width}x{height} = {width * height} pixels is over the limit of "
                                    f"{limits.max_pixels} (--max-pixels)")


def image_results(images: List[tuple], rows: List[dict], alignment: str) -> List[dict]:
    """Prediction rows (in image order) -> one result per image with its faces; RequestError(4xx) naming the
    first image that did not read."""
    results = [{"name": name, "status": None, "detail": None, "faces": []} for name, _ in images]
    for row in rows:
        result = results[int(row["source_path"])]
        if row["status"] != "ok":
            if row["status"] in UNREADABLE:
                raise RequestError(UNREADABLE[row["status"]],
                                   f"image {row['source_path']} ({result['name']}): {row['status']}: {row['detail']}")
            result.update(status=row["status"], detail=row["detail"])
            continue
        spread = row["uncertainty"]
        result["status"] = "ok"
        result["faces"].append({
            "face_index": row["face_index"], "box": row["bbox"], "landmarks": row.get("landmarks"),
            "alignment": alignment if row.get("landmarks") or alignment != "landmarks" else "box",
            "age": row["predicted_age"], "uncertainty": None if spread is None or spread != spread else spread,
            "det_score": row["det_score"]})
    return results


class Service:
    """One Estimator and the limits it is served under; one prediction at a time per process (the model uses
    every core it is given), requests beyond it wait their turn for at most --queue-seconds."""

    def __init__(self, estimator, limits: Limits):
        self.estimator, self.limits = estimator, limits
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="faceage-model")
        self.slot: Optional[asyncio.Semaphore] = None
        detector = estimator.predictor.crop.detector
        self.alignment = {"none": "none (aligned chips)", "hog": "box"}.get(detector, "landmarks")

    async def predict(self, request) -> dict:
        started = time.perf_counter()
        images = await read_images(request, self.limits)
        check_images(images, self.limits)
        records = [(str(index), raw) for index, (_, raw) in enumerate(images)]
        rows = await self._bounded(lambda: self.estimator.score_records(records))
        return {"model_id": self.estimator.settings.model_id, "images": image_results(images, rows, self.alignment),
                "seconds": round(time.perf_counter() - started, 4)}

    async def _bounded(self, work):
        if self.slot is None:
            self.slot = asyncio.Semaphore(1)
        try:
            await asyncio.wait_for(self.slot.acquire(), self.limits.queue_seconds)
        except asyncio.TimeoutError:
            raise RequestError(503, f"busy: no turn at the model within {self.limits.queue_seconds:g} s "
                                    f"(--queue-seconds); retry later") from None
        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        future.add_done_callback(lambda _: self.slot.release())  # released when the work ends, even after a 504
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.timeout_seconds)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the prediction took over {self.limits.timeout_seconds:g} s (--timeout)") \
                from None


def create_app(estimator, limits: Limits = Limits()):
    """The ASGI app serving `estimator` (a faceage.Estimator) under `limits`."""
    service = Service(estimator, limits)
    app = FastAPI(title="faceage", version="1", summary="ages of the faces in photos")

    @app.exception_handler(HTTPException)
    async def _http_error(request, e):  # 404, 405, ...: the same one-line JSON as every refusal
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return error_response(422, f"{request.method} {request.url.path}: {e.errors()[:1]}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model_id": estimator.settings.model_id}

    @app.get("/model")
    async def model():
        return estimator.info()

    @app.post("/predict")
    async def predict(request: Request):
        try:
            return await service.predict(request)
        except RequestError as e:
            return error_response(e.status, str(e))
        except Exception as e:  # noqa: BLE001 - a defect: one line for the caller, the server keeps serving
            log.error(f"serve: {type(e).__name__}: {_one_line(e)}")
            return error_response(500, f"internal error ({type(e).__name__}); the service keeps serving")

    return BodyLimit(app, limits.max_upload_bytes)


def get_args_parser() -> argparse.ArgumentParser:
    from trainer.runtime import TTA, TTA_HELP  # torch-free; imported here, where the flags are defined

    p = Parser("serve", prog="python -m faceage.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/train/model.pt", type=path_arg,
                   help="model bundle (python -m trainer.train) or .onnx export (python -m trainer.export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=number(0, 65535, integer=True), default=8000, help="0: any free port")
    p.add_argument("--detector", default="auto", choices=("auto",) + DETECTORS,
                   help="auto detects and aligns faces to the model's framing; none: images are aligned chips")
    p.add_argument("--tta", default=None, choices=TTA, help=TTA_HELP)
    p.add_argument("--threads", type=positive_int, help="torch / ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-upload-mb", type=number(0.001), default=32.0, help="largest request body")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="largest image, width x height")
    p.add_argument("--max-images", type=positive_int, default=16, help="most images in one request")
    p.add_argument("--queue-seconds", type=number(0.1), default=30.0, help="longest wait for the model")
    p.add_argument("--timeout", type=number(0.1), default=60.0, help="longest a prediction may take")
    return p


def _job(argv: Optional[List[str]]) -> int:
    import uvicorn

    from faceage import Estimator

    args = get_args_parser().parse_args(argv)
    estimator = Estimator.load(args.model, detector=args.detector, tta=args.tta, threads=args.threads)
    limits = Limits(int(args.max_upload_mb * 2**20), args.max_pixels, args.max_images, args.queue_seconds,
                    args.timeout)
    config = uvicorn.Config(create_app(estimator, limits), host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_keep_alive=5, limit_concurrency=64,
                            timeout_graceful_shutdown=5)
    sock = listen(args.host, args.port)
    log.info(f"serve: model {estimator.settings.model_id} ({estimator.info()['head']} head, --tta "
             f"{estimator.settings.tta}), "
             f"listening on http://{args.host}:{sock.getsockname()[1]}")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A listening socket on host:port (port 0: a free one, told in the 'listening on' line)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (else a 40 ms delayed-ACK stall)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): another port (--port), or an "
                        f"address of this machine (--host)") from None
    return sock


main, console_main = entry_points("serve", _job)

if __name__ == "__main__":
    sys.exit(main())
