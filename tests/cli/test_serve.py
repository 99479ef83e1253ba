"""The HTTP server: the rows `link` writes, micro-batched across clients,
and a 4xx with the reason for every bad request (never a 5xx)."""
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from spacy_m3el.cli.serve import ServerLimits, create_app  # noqa: E402
from spacy_m3el.data.rows import doc_row, row_doc  # noqa: E402
from tests.pipeline.test_linker import train_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def nlp(picture_dir):
    nlp, _ = train_pipeline(picture_dir, epochs=3)
    ruler = nlp.add_pipe("entity_ruler", before="m3el_linker")
    ruler.add_patterns([{"label": "THING", "pattern": "item"}])
    return nlp


@pytest.fixture(scope="module")
def client(nlp, picture_dir):
    app = create_app(nlp, allowed_image_dirs=[picture_dir],
                     limits=ServerLimits(max_body_bytes=200_000, max_picture_bytes=60_000, max_text_chars=500,
                                         max_rows=8))
    with TestClient(app) as client:
        yield client


def test_answers_are_the_rows_link_writes(client, nlp, picture_dir):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    row = {"id": "a", "text": "They showed me the item.", "image": "item3_alt.png"}
    answer = client.post("/link", json=row)
    assert answer.status_code == 200
    expected = doc_row(nlp(row_doc(nlp, row, image_dir=picture_dir)), "a")
    assert answer.json()["ents"][0]["kb_id"] == expected["ents"][0]["kb_id"]
    assert answer.json()["ents"][0]["score"] == pytest.approx(expected["ents"][0]["score"], rel=1e-4)
    picture = base64.b64encode((picture_dir / "item3_alt.png").read_bytes()).decode()
    many = client.post("/link", json=[{"id": "b", "text": "The item.", "image_base64": picture},
                                      {"id": "c", "text": "Look at the item.", "spans": [[8, 12, "THING"]]},
                                      {"id": "d", "text": "Nothing to link here."}])
    assert many.status_code == 200
    b, c, d = many.json()
    assert b["ents"][0]["modalities"] == ["text", "image"] and c["ents"][0]["modalities"] == ["text"]
    assert b["ents"][0]["kb_id"] == expected["ents"][0]["kb_id"] and d["ents"] == []
    assert "/link" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body,status,reason", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps([]).encode(), 422, "an empty list"),
    (json.dumps(5).encode(), 422, "a row must be a JSON object"),
    (json.dumps({"image": "item1.png"}).encode(), 422, "'text' must be a string"),
    (json.dumps({"text": "x" * 501}).encode(), 413, "at most 500"),
    (json.dumps([{"text": "item"}] * 9).encode(), 413, "at most 8"),
    (json.dumps({"text": "item", "spans": 5}).encode(), 422, "'spans' must be a list"),
    (json.dumps({"text": "item", "spans": [[0]]}).encode(), 422, "a span must be [start, end]"),
    (json.dumps({"text": "item", "image": 42}).encode(), 422, "'image' must be a path"),
    (json.dumps({"text": "item", "image": "/etc/passwd"}).encode(), 403, "outside the allowed image folders"),
    (json.dumps({"text": "item", "image": "../../../etc/passwd"}).encode(), 403, "outside the allowed"),
    (json.dumps({"text": "item", "image": "nope.png"}).encode(), 422, "not found"),
    (json.dumps({"text": "item", "image_base64": "%%%"}).encode(), 400, "not valid base64"),
    (json.dumps({"text": "item", "image_base64": base64.b64encode(b"not a picture").decode()}).encode(), 422,
     "not an image"),
    (json.dumps({"text": "item", "image": "a.png", "image_base64": "AAAA"}).encode(), 422, "not both"),
    (json.dumps({"text": "item" * 60_000}).encode(), 413, "over 200000 bytes"),
])
def test_a_bad_request_gets_a_4xx_with_the_reason(client, body, status, reason):
    answer = client.post("/link", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["detail"]


def test_a_picture_path_is_never_read_outside_the_allowed_folders(nlp, picture_dir, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes((picture_dir / "item1.png").read_bytes())
    (picture_dir / "escape.png").unlink(missing_ok=True)
    (picture_dir / "escape.png").symlink_to(secret)  # a link inside that points outside
    try:
        with TestClient(create_app(nlp, allowed_image_dirs=[picture_dir])) as client:
            answer = client.post("/link", json={"text": "The item.", "image": "escape.png"})
            assert answer.status_code == 403
        with TestClient(create_app(nlp)) as client:  # no allowed folder: no path at all
            answer = client.post("/link", json={"text": "The item.", "image": str(picture_dir / "item1.png")})
            assert answer.status_code == 403 and "image_base64" in answer.json()["detail"]
    finally:
        (picture_dir / "escape.png").unlink()


def test_concurrent_requests_share_model_calls(nlp, picture_dir):
    app = create_app(nlp, allowed_image_dirs=[picture_dir], max_batch=64, max_wait_ms=300)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (server.started and app.state.m3el["ready"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        rows = [{"id": i, "text": "They showed me the item.", "image": f"item{i % 10}_alt.png"} for i in range(12)]

        def post(row):
            return httpx.post(f"http://127.0.0.1:{port}/link", json=row, timeout=30)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, rows))
        assert [a.status_code for a in answers] == [200] * 12
        assert [a.json()["id"] for a in answers] == list(range(12))
        batching = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).json()["batching"]
        # 12 requests in far fewer model calls (the warm-up is one of them).
        assert batching["requests"] == 13 and batching["model_calls"] <= 6 and batching["largest_batch"] >= 3
    finally:
        server.should_exit = True
        thread.join(timeout=30)
