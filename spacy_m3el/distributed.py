"""Linking a corpus, and encoding a KB, beyond one process: on Ray Data
(``pip install 'spacy-m3el[ray]'``).

Each Ray actor loads the pipeline once (its entity index memory-mapped from the
pipeline directory, which every worker must be able to read) and links
batches of rows; the driver writes the output and errors files. Ray retries
the batches of a worker that dies, and a batch's rows are written only when
it comes back, so every input row appears exactly once in the output or in
the errors file. Output rows come in completion order: compare runs by ``id``.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from .data.rows import Row, link_rows, parse_line
from .errors import warn

#: Environment variable naming a file whose presence makes the next batch's
#: worker exit at once (the file is removed first): for fault-tolerance tests.
FAIL_ONCE_ENV = "SPACY_M3EL_FAIL_ONCE"
#: Environment variable: a worker exits whenever its batch holds a row with
#: this text (a row that kills every worker, as a crash in native code would).
FAIL_ON_TEXT_ENV = "SPACY_M3EL_FAIL_ON_TEXT"
#: How often a lost worker is restarted, and its batch tried again, before the job fails.
DEFAULT_MAX_RETRIES = 3


class BatchLedger:
    """A Ray actor: which batches workers started and finished, so that a
    batch that keeps killing its worker can be named when Ray gives up."""

    def __init__(self) -> None:
        self.started: Dict[str, List[Any]] = {}
        self.finished: set = set()

    def start(self, key: str, description: str) -> None:
        self.started.setdefault(key, [description, 0])[1] += 1

    def finish(self, key: str) -> None:
        self.finished.add(key)

    def unfinished(self) -> List[Tuple[str, int]]:
        """(rows, times started) of every batch started and never finished, most tried first."""
        return sorted(((description, tries) for key, (description, tries) in self.started.items()
                       if key not in self.finished), key=lambda item: -item[1])


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError("Distributed linking needs Ray Data: pip install 'spacy-m3el[ray]'") from err
    return ray


def start_ray(address: Optional[str] = None, *, num_cpus: Optional[int] = None) -> None:
    """Join the cluster at ``address`` ("auto", "ray://host:port"), or start
    a local Ray on this machine (``num_cpus`` CPUs) when it is None."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


class LinkWorker:
    """A Ray Data actor: one loaded pipeline, linking batches of raw rows."""

    def __init__(self, pipeline: str, image_dir: Optional[str], top_k: int, ledger: Any = None) -> None:
        import spacy
        import torch

        from .pipeline.linker import find_linker

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.nlp = _load_pipeline(spacy, pipeline)
        find_linker(self.nlp).configure(on_bad_image="warn")  # one bad image must not stop the job
        self.image_dir = Path(image_dir) if image_dir else None
        self.top_k = top_k
        self.ledger = ledger

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        rows = list(_batch_rows(batch))
        key = description = None
        if self.ledger is not None:
            import ray

            names = [str(where) for where, _, _ in rows]
            key = hashlib.sha1("\n".join(names).encode()).hexdigest()  # the same in every worker process
            description = f"{len(rows)} rows, {names[0][:60]!r} to {names[-1][:60]!r}" if names else "0 rows"
            ray.get(self.ledger.start.remote(key, description))
        marker = os.environ.get(FAIL_ONCE_ENV)
        if marker and Path(marker).exists():
            Path(marker).unlink()
            os._exit(1)  # a worker lost mid-batch, as a node failure would
        poison = os.environ.get(FAIL_ON_TEXT_ENV)
        if poison and any(row is not None and poison in str(row.get("text")) for _, row, _ in rows):
            os._exit(1)
        errors: List[Row] = []
        linked = [json.dumps(row, ensure_ascii=False)
                  for row in link_rows(self.nlp, rows, errors.append, image_dir=self.image_dir, top_k=self.top_k)]
        # A worker sees no line numbers: the row is named by its id, or its text when it is not JSON.
        failed = [json.dumps({"row": error.pop("line"), **error}, ensure_ascii=False) for error in errors]
        if self.ledger is not None:  # no wait: only a start must be on record before a crash could follow
            self.ledger.finish.remote(key)
        return {"kind": ["row"] * len(linked) + ["error"] * len(failed), "json": linked + failed}


def _batch_rows(batch: Dict[str, Any]) -> Iterator[Tuple[Any, Optional[Row], Optional[str]]]:
    """``(where, row, error)`` per row of a batch: raw JSONL lines (``line``
    column) are parsed here, so a bad line is reported, not fatal; Parquet
    rows arrive as columns."""
    if "line" in batch:
        for raw in batch["line"]:
            row, error = parse_line(str(raw))
            yield (str(raw)[:200] if error else row.get("id")), row, error
        return
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    for i in range(size):
        row = {name: _plain(batch[name][i]) for name in columns}
        if isinstance(row.get("spans"), list):  # Arrow has no mixed lists: spans are {start, end, label} structs
            row["spans"] = [[s["start"], s["end"], *([s["label"]] if s.get("label") else [])]
                            if isinstance(s, dict) else s for s in row["spans"]]
        yield row.get("id"), row, None


def _plain(value: Any) -> Any:
    """numpy/pyarrow values of a Parquet batch as JSON-ready Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def has_entity_index(pipeline: Union[str, Path]) -> bool:
    """Does the saved pipeline directory hold an entity index (its linker's
    ``index/``, or ``kb/cache/`` in pipelines saved before)?"""
    return any(Path(pipeline).glob("*/index/meta.json")) or any(Path(pipeline).glob("*/kb/cache/meta.json"))


def read_dataset(path: Union[str, Path]):
    """A Ray dataset of input rows: JSONL (one ``line`` per row, parsed by
    the workers) or Parquet (columns ``id``, ``text``, ``image`` and
    optionally ``spans``, a list of ``{start, end, label}`` structs)."""
    ray = _ray()
    path = str(path)
    if path.endswith(".parquet") or Path(path).is_dir():
        return ray.data.read_parquet(path)
    return ray.data.read_text(path, drop_empty_lines=True).rename_columns({"text": "line"})


def link(
    data: Union[str, Path, Any],
    pipeline: str,
    output: Union[str, Path],
    *,
    errors: Optional[Union[str, Path]] = None,
    image_dir: Optional[Union[str, Path]] = None,
    address: Optional[str] = None,
    num_workers: int = 2,
    batch_size: int = 32,
    gpus_per_worker: float = 0.0,
    top_k: int = 5,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> Dict[str, int]:
    """Link every row of ``data`` (a JSONL/Parquet path or a Ray dataset)
    with ``num_workers`` Ray actors, each holding one loaded ``pipeline``;
    write one row per linked row to ``output`` (JSONL, or Parquet when it
    ends with ``.parquet``) and unusable rows to ``errors`` (JSONL; default:
    OUTPUT.errors.jsonl). Returns the counts. A lost worker is restarted and
    its batch tried again up to ``max_retries`` times; then the job fails
    with a ``RuntimeError`` naming the batch that kept failing."""
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    # One CPU per worker plus one for reading the input, which would otherwise wait forever.
    start_ray(address, num_cpus=None if address else max(num_workers, 1) + 1)
    ray = _ray()
    dataset = data if not isinstance(data, (str, Path)) else read_dataset(data)
    output = Path(output)
    errors = Path(errors) if errors else output.with_name(output.name + ".errors.jsonl")
    # Workers do not share the driver's working directory: local paths go to them absolute.
    if Path(pipeline).exists():
        pipeline = str(Path(pipeline).resolve())
        if not has_entity_index(pipeline):
            warn(f"{pipeline} has no entity index: each of the {num_workers} workers encodes the whole KB at its "
                 "first batch. Build it once first: python -m spacy_m3el build-cache PIPELINE OUTPUT")
    ledger = ray.remote(num_cpus=0)(BatchLedger).remote()
    linked = dataset.map_batches(
        LinkWorker,
        fn_constructor_kwargs={"pipeline": str(pipeline), "top_k": top_k, "ledger": ledger,
                               "image_dir": str(Path(image_dir).resolve()) if image_dir else None},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=1,
        num_gpus=gpus_per_worker or None,
        batch_format="numpy",
        # Ray Data's default for actor pools is to retry forever: a row that kills every worker would never end.
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )
    counts = {"linked": 0, "errors": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    with _RowWriter(output) as out, errors.open("w", encoding="utf8") as bad:
        try:
            for batch in linked.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [text for kind, text in zip(batch["kind"], batch["json"]) if kind == "row"]
                out.write(rows)
                counts["linked"] += len(rows)
                for kind, text in zip(batch["kind"], batch["json"]):
                    if kind != "row":
                        bad.write(f"{text}\n")
                        counts["errors"] += 1
        except Exception as error:
            # Batches started and never finished, the most tried first: the one that kept failing leads.
            unfinished = ray.get(ledger.unfinished.remote())
            if not unfinished:  # no batch to blame (a worker that cannot start, say): Ray's own error says why
                raise
            named = "; ".join(f"{rows} (started {tries} times)" for rows, tries in unfinished[:3])
            raise RuntimeError(
                f"Ray linking failed after {max_retries} retries ({type(error).__name__}): the batch of {named} "
                f"kept killing its worker. {counts['linked']} rows were written to {output} before it stopped; "
                "remove or fix the rows named and run again.") from error
    return counts


def output_schema():
    """The Parquet schema of output rows (ids written as strings)."""
    import pyarrow as pa

    candidate = pa.struct([("id", pa.string()), ("prob", pa.float64()), ("score", pa.float64())])
    ent = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("text", pa.string()), ("label", pa.string()),
                     ("kb_id", pa.string()), ("score", pa.float64()), ("nil_prob", pa.float64()),
                     ("modalities", pa.list_(pa.string())), ("candidates", pa.list_(candidate))])
    return pa.schema([("id", pa.string()), ("text", pa.string()), ("ents", pa.list_(ent))])


class _RowWriter:
    """Output rows (JSON texts) to JSONL, or to Parquet when the path ends
    with ``.parquet`` (one row group per batch, schema :func:`output_schema`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parquet = path.suffix == ".parquet"

    def __enter__(self) -> "_RowWriter":
        if self.parquet:
            import pyarrow.parquet as pq

            self.schema = output_schema()
            self.file = pq.ParquetWriter(str(self.path), self.schema)
        else:
            self.file = self.path.open("w", encoding="utf8")
        return self

    def write(self, rows: List[str]) -> None:
        if not self.parquet:
            self.file.write("".join(f"{text}\n" for text in rows))
            return
        import pyarrow as pa

        parsed = [json.loads(text) for text in rows]
        for row in parsed:
            row["id"] = None if row.get("id") is None else str(row["id"])
        self.file.write_table(pa.Table.from_pylist(parsed, schema=self.schema))

    def __exit__(self, *exc) -> None:
        self.file.close()


class IndexWorker:
    """A Ray Data actor: one loaded pipeline, encoding ranges of KB rows into
    entity index arrays (returned as ``.npz`` bytes) by the route every build takes."""

    def __init__(self, pipeline: str) -> None:
        import spacy

        from .pipeline.linker import find_linker

        self.linker = find_linker(_load_pipeline(spacy, pipeline))

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        import io

        import numpy

        starts, blobs, unreadable, layouts = [], [], [], []
        linker = self.linker
        for start, end in zip(batch["start"], batch["end"]):
            part = linker.index_keeper.encoding.encode(linker.kb, range(int(start), int(end)),
                                                       max_queries=linker.settings.max_cached_queries)
            buffer = io.BytesIO()
            numpy.savez(buffer, **part.arrays)
            starts.append(int(start))
            blobs.append(buffer.getvalue())
            unreadable.append(json.dumps(part.meta.get("unreadable_kb_images", {}).get("ids", [])))
            layouts.append(json.dumps(part.meta["retrieval_parts"]))
        return {"start": starts, "npz": blobs, "unreadable": unreadable, "layout": layouts}


def _load_pipeline(spacy, pipeline: str):
    """``spacy.load`` in a worker, saying what a worker needs when it fails."""
    if Path(pipeline).exists() and not os.access(pipeline, os.R_OK):
        raise PermissionError(f"The pipeline directory {pipeline} is not readable by this Ray worker")
    try:
        return spacy.load(pipeline)
    except OSError as err:
        raise OSError(f"A Ray worker cannot load the pipeline {pipeline!r}: it must be a directory every worker "
                      f"can read (shared storage) or a package installed on every node ({err})") from err


def build_kb_cache(
    pipeline: Union[str, Path],
    output: Union[str, Path],
    *,
    address: Optional[str] = None,
    num_workers: int = 2,
    shards_per_worker: int = 4,
) -> Dict[str, Any]:
    """Encode the KB entities of ``pipeline``'s linker on ``num_workers``
    Ray actors (row ranges on entity-batch boundaries, so every batch is the
    one a single-machine build encodes), merge the arrays in KB order into
    one entity index, and save the pipeline with it to ``output``."""
    import io

    import numpy
    import spacy

    from .index.entity_index import EntityIndex
    from .index.store import concatenate
    from .pipeline.linker import find_linker

    start_ray(address, num_cpus=None if address else max(num_workers, 1) + 1)
    ray = _ray()
    if Path(pipeline).exists():
        pipeline = str(Path(pipeline).resolve())
    nlp = _load_pipeline(spacy, str(pipeline))
    linker = find_linker(nlp)
    size, total = linker.settings.entity_batch_size, len(linker.kb)
    if total == 0:
        raise ValueError(f"The pipeline {pipeline} has an empty KB: there is nothing to encode")
    shard = -(-total // max(1, num_workers * shards_per_worker))
    shard = -(-shard // size) * size
    ranges = [{"start": start, "end": min(start + shard, total)} for start in range(0, total, shard)]
    encoded = ray.data.from_items(ranges).map_batches(
        IndexWorker, fn_constructor_kwargs={"pipeline": str(pipeline)}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=1, batch_format="numpy",
    )
    parts: Dict[int, Dict[str, numpy.ndarray]] = {}
    unreadable: List[str] = []
    layout = None
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        layout = json.loads(batch["layout"][0])
        for start, blob, ids in zip(batch["start"], batch["npz"], batch["unreadable"]):
            with numpy.load(io.BytesIO(blob), allow_pickle=False) as arrays:
                parts[int(start)] = {name: arrays[name] for name in arrays.files}
            unreadable.extend(json.loads(ids))
    if sorted(parts) != [r["start"] for r in ranges]:
        raise RuntimeError(f"Ray returned {len(parts)} of {len(ranges)} KB shards")
    ordered = [parts[start] for start in sorted(parts)]
    arrays = {name: concatenate([part[name] for part in ordered]) for name in ordered[0]}
    keeper = linker.index_keeper
    index = EntityIndex(arrays, keeper.encoding.meta(linker.kb, layout, max_queries=linker.settings.max_cached_queries,
                                                     unreadable=unreadable))
    keeper.report(linker.kb, index, unreadable)
    keeper.adopt(linker.kb, index, where="the entity index built on Ray")
    nlp.to_disk(output)
    return {"entities": total, "shards": len(ranges), "unreadable_kb_images": len(unreadable)}
