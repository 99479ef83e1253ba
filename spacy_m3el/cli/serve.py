"""An HTTP server for a linking pipeline (``pip install 'spacy-m3el[serve]'``).

``POST /link`` takes one row or a JSON list of rows in the ``link`` format
(``text``; a picture as ``image``, a path under an allowed image folder, or
``image_base64``, or none; optional ``spans`` to disambiguate given
mentions) and answers with the rows ``link`` writes (a list for a list).
Requests from all clients are micro-batched: the model runs on one thread,
on every row that arrived within ``max_wait_ms`` (up to ``max_batch``
rows). ``GET /health`` says the process is up, ``GET /ready`` that the
pipeline is loaded and warm; ``/docs`` is the OpenAPI page.

Bad requests get a 4xx with the reason and never reach the model: a body,
picture or text over its limit (413), a picture path outside the allowed
folders (403: never opened), a row of the wrong shape, a missing file or a
picture that is not an image (422), invalid JSON or base64 (400).
"""
import asyncio
import base64
import binascii
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from PIL import Image
from spacy.language import Language

from ..data.images import load_image
from ..data.rows import Row, doc_or_error, doc_row
from ..errors import ImageLoadError

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("The server needs FastAPI and uvicorn: pip install 'spacy-m3el[serve]'") from err


@dataclass(frozen=True)
class ServerLimits:
    """What one request may hold."""

    max_body_bytes: int = 32 * 2**20
    max_picture_bytes: int = 16 * 2**20
    max_text_chars: int = 100_000
    max_rows: int = 256


@dataclass
class _Job:
    rows: List[Row]
    future: "asyncio.Future[List[Any]]"


@dataclass
class BatchStats:
    """How the micro-batcher has grouped the work so far."""

    requests: int = 0
    rows: int = 0
    model_calls: int = 0
    largest_batch: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class MicroBatcher:
    """Collects the rows of concurrent requests and links them together on
    one model thread: a batch closes at ``max_batch`` rows or ``max_wait_ms``
    after its first row arrived."""

    def __init__(self, nlp: Language, *, max_batch: int, max_wait_ms: float, top_k: int) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.nlp = nlp
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.top_k = top_k
        self.stats = BatchStats()
        self.queue: "asyncio.Queue[_Job]" = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3el-model")
        self.task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    async def link(self, rows: List[Row]) -> List[Any]:
        """Each row's output row, or the ``ValueError`` that makes it unusable."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(rows, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].rows)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.rows)
            try:
                results = await loop.run_in_executor(self.model_thread, self._link_jobs, jobs)
            except Exception as error:
                if len(jobs) == 1:
                    _settle(jobs[0], error=error)
                    continue
                # One request's rows broke the batch: each request again on its own.
                for job in jobs:
                    try:
                        (result,) = await loop.run_in_executor(self.model_thread, self._link_jobs, [job])
                    except Exception as job_error:
                        _settle(job, error=job_error)
                    else:
                        _settle(job, result=result)
                continue
            for job, result in zip(jobs, results):
                _settle(job, result=result)

    def _link_jobs(self, jobs: Sequence[_Job]) -> List[List[Any]]:
        docs, places = [], []
        results: List[List[Any]] = [[None] * len(job.rows) for job in jobs]
        for j, job in enumerate(jobs):
            for r, row in enumerate(job.rows):
                picture = row.get(PICTURE)
                doc, error = doc_or_error(self.nlp, r, {k: v for k, v in row.items() if k != PICTURE}, None)
                if doc is None:
                    results[j][r] = ValueError(error)
                else:
                    if picture is not None:
                        doc._.image = picture
                    docs.append(doc)
                    places.append((j, r))
        for doc, (j, r) in zip(self.nlp.pipe(docs, batch_size=max(len(docs), 1)), places):
            results[j][r] = doc_row(doc, jobs[j].rows[r].get("id"), top_k=self.top_k)
        with self.stats.lock:
            self.stats.requests += len(jobs)
            self.stats.rows += len(docs)
            self.stats.model_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(docs))
        return results


def _settle(job: _Job, *, result: Any = None, error: Optional[BaseException] = None) -> None:
    if job.future.done():  # the client went away
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


#: A checked row's picture, decoded once when it was checked (a PIL image).
PICTURE = "_picture"


class RequestChecker:
    """Turns a request body into rows the model may see, or an HTTP error."""

    def __init__(self, allowed_image_dirs: Sequence[Path], limits: ServerLimits) -> None:
        self.allowed = [Path(folder).resolve() for folder in allowed_image_dirs]
        self.limits = limits

    def rows(self, body: bytes) -> Tuple[List[Row], bool]:
        """The rows of a body, and whether it was a list."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"the body is not valid JSON: {err}") from None
        many = isinstance(data, list)
        rows = data if many else [data]
        if many and not rows:
            raise HTTPException(422, "an empty list of rows")
        if len(rows) > self.limits.max_rows:
            raise HTTPException(413, f"{len(rows)} rows in one request; at most {self.limits.max_rows}")
        return [self.row(row, i if many else None) for i, row in enumerate(rows)], many

    def row(self, row: Any, index: Optional[int]) -> Row:
        where = f"row {index}: " if index is not None else ""
        if not isinstance(row, dict):
            raise HTTPException(422, f"{where}a row must be a JSON object, got {type(row).__name__}")
        text = row.get("text")
        if not isinstance(text, str):
            raise HTTPException(422, f"{where}'text' must be a string")
        if len(text) > self.limits.max_text_chars:
            raise HTTPException(413, f"{where}the text has {len(text)} characters; at most {self.limits.max_text_chars}")
        if row.get("image") is not None and row.get("image_base64") is not None:
            raise HTTPException(422, f"{where}give 'image' (a path) or 'image_base64', not both")
        checked = {key: value for key, value in row.items() if key not in ("image", "image_base64", PICTURE)}
        if row.get("image") is not None:
            checked[PICTURE] = self.picture_path(row["image"], where)
        elif row.get("image_base64") is not None:
            checked[PICTURE] = self.picture_bytes(row["image_base64"], where)
        return checked  # spans are checked where the doc is made, as `link` checks them

    def picture_path(self, value: Any, where: str) -> Image.Image:
        if not isinstance(value, str):
            raise HTTPException(422, f"{where}'image' must be a path (a string); send bytes as 'image_base64'")
        if not self.allowed:
            raise HTTPException(403, f"{where}this server reads no picture paths (start it with "
                                     "--allowed-image-dir); send the picture as 'image_base64'")
        if "\x00" in value:
            raise HTTPException(422, f"{where}the picture path has a NUL character")
        path = Path(value)
        candidates = [path] if path.is_absolute() else [folder / path for folder in self.allowed]
        # Resolved first ('..' and symlinks followed), checked after: nothing outside is ever opened.
        inside = [resolved for resolved in (c.resolve() for c in candidates)
                  if any(resolved.is_relative_to(folder) for folder in self.allowed)]
        if not inside:
            raise HTTPException(403, f"{where}the picture path is outside the allowed image folders")
        for resolved in inside:
            if resolved.is_file():
                if resolved.stat().st_size > self.limits.max_picture_bytes:
                    raise HTTPException(413, f"{where}the picture is over {self.limits.max_picture_bytes} bytes")
                return self._decoded(str(resolved), where)
        raise HTTPException(422, f"{where}picture '{value}' not found in the allowed image folders")

    def picture_bytes(self, value: Any, where: str) -> Image.Image:
        if not isinstance(value, str):
            raise HTTPException(422, f"{where}'image_base64' must be a base64 string")
        if len(value) > self.limits.max_picture_bytes * 4 // 3 + 4:
            raise HTTPException(413, f"{where}the picture is over {self.limits.max_picture_bytes} bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise HTTPException(400, f"{where}'image_base64' is not valid base64: {err}") from None
        return self._decoded(data, where)

    def _decoded(self, source: Any, where: str) -> Image.Image:
        """The picture, decoded here (off the model thread, once: the model takes the decoded image)."""
        try:
            return load_image(source)
        except ImageLoadError as err:
            raise HTTPException(422, f"{where}the picture is not an image: {err.reason}") from None


def create_app(
    nlp: Language,
    *,
    allowed_image_dirs: Sequence[Path] = (),
    max_batch: int = 32,
    max_wait_ms: float = 10.0,
    top_k: int = 5,
    limits: ServerLimits = ServerLimits(),
) -> FastAPI:
    """The FastAPI application serving ``nlp`` (its linker set to link a
    picture that fails to decode on text alone, as ``link`` does)."""
    from ..pipeline.linker import find_linker

    find_linker(nlp).configure(on_bad_image="warn")
    checker = RequestChecker(allowed_image_dirs, limits)
    state: Dict[str, Any] = {"ready": False, "batcher": None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(nlp, max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k)
        batcher.start()
        state["batcher"] = batcher
        # Warm: the first call pays for lazy set-up (the entity index, the backbones' first run).
        started = time.perf_counter()
        await batcher.link([{"text": "warm up"}])
        state["warm_up_s"] = time.perf_counter() - started
        state["ready"] = True
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="spacy-m3el", description="Multimodal entity linking: text and picture in, KB ids out.",
                  lifespan=lifespan)
    app.state.m3el = state

    @app.get("/health")
    async def health() -> Dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """The pipeline is loaded and warm (503 until then)."""
        batcher = state["batcher"]
        body = {"ready": state["ready"], "pipeline": nlp.meta.get("name"), "pipes": nlp.pipe_names}
        if batcher is not None:
            stats = batcher.stats
            body["batching"] = {"requests": stats.requests, "rows": stats.rows, "model_calls": stats.model_calls,
                                "largest_batch": stats.largest_batch}
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.post("/link")
    async def link(request: Request) -> JSONResponse:
        """One row or a list of rows in the ``link`` format; the linked
        row(s) as ``link`` writes them."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise HTTPException(413, f"the body is over {limits.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise HTTPException(413, f"the body is over {limits.max_body_bytes} bytes")
        rows, many = await run_in_threadpool(checker.rows, bytes(body))
        if state["batcher"] is None:
            raise HTTPException(503, "the pipeline is not loaded yet")
        results = await state["batcher"].link(rows)
        for i, result in enumerate(results):
            if isinstance(result, ValueError):
                raise HTTPException(422, f"{f'row {i}: ' if many else ''}{result}")
        return JSONResponse(results if many else results[0])

    return app
