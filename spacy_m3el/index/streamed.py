"""Building a large entity index: streamed, in parallel, resumable.

The rows go through :class:`~.encoding.EntityEncoding`, the route every
index build takes; this module only schedules them. KB images are decoded
and resized by ``image_workers`` DataLoader worker processes while the main
process runs the frozen backbone (under autocast in the linker's
``inference_precision``, channels-last images) and the matcher on one batch
after another; or, with ``build_processes`` > 1, that many
forked processes with one torch thread each encode every N-th shard.
Finished entities go to disk in shards of ``shard_size`` rows; after a
crash or a kill the same call finds the shards that are complete (written
under a temporary name, then renamed) and encodes only the rest. At the end
the shards are copied, in KB order, into the index's files by
:func:`.store.write_arrays`, so memory stays bounded by one shard (per
process) whatever the KB's size.

The backbone's feature cache is not used: it would keep every entity's
features, which is what this path exists to avoid.
"""
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy
import torch
from wasabi import msg

from ..errors import KBError
from ..fileio import read_json, write_json
from ..kb.base import MultimodalKB
from ..progress import progress_bar
from .encoding import EntityEncoding, EntityRows, index_arrays, streaming_loader
from .entity_index import EntityIndex
from .store import joined_shape, write_arrays, write_meta

BUILD_META = "build.json"
SHARDS = "shards"
#: Entities per shard (rounded up to whole entity batches).
DEFAULT_SHARD_SIZE = 4096


class _EntityBatches(torch.utils.data.Dataset):
    """Batch i of the entities to encode, its images decoded and
    preprocessed (in DataLoader workers) by the one entity route."""

    def __init__(self, encoding: EntityEncoding, kb: MultimodalKB, batches: Sequence[Tuple[int, int]]) -> None:
        self.encoding = encoding
        self.kb = kb
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> EntityRows:
        start, end = self.batches[index]
        # Texts are tokenized by the main process: a forked fast tokenizer turns its threads off.
        return self.encoding.rows(self.kb, range(start, end), decode=True)


class StreamedBuild:
    """One build of a KB's entity index by ``encoding``, into ``folder``.

    ``folder`` holds ``build.json`` (what is being built), ``shards/`` while
    the build runs and, when it is done, the index itself (the files
    :mod:`.store` writes and :meth:`EntityIndex.load` reads).
    """

    def __init__(self, encoding: EntityEncoding, kb: MultimodalKB, folder: Path, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> None:
        # Its own KB image loader: streaming every KB image must not churn the shared LRU.
        self.encoding = EntityEncoding(encoding.network, encoding.settings, streaming_loader(encoding.settings))
        self.network = encoding.network
        self.kb = kb
        self.settings = settings = encoding.settings
        self.folder = Path(folder)
        batch = settings.entity_batch_size
        self.shard_size = max(batch, -(-shard_size // batch) * batch)
        self.progress = progress
        self.unreadable: List[Tuple[str, str]] = []
        self.reused_shards = 0
        #: True when the folder held this build, finished: it was loaded, not encoded.
        self.loaded = False

    # ------------------------------------------------------------ bookkeeping
    def _identity(self) -> Dict[str, Any]:
        return {**self.encoding.identity(self.kb, max_queries=self.settings.max_cached_queries),
                "shard_size": self.shard_size, "entity_batch_size": self.settings.entity_batch_size}

    def _prepare_folder(self, identity: Dict[str, Any], previous: Optional[Dict[str, Any]]) -> None:
        """Start or resume: shards of an identical earlier build (``previous``
        is its ``build.json``) are kept, anything else in the folder is an
        error (never deleted silently)."""
        meta_path = self.folder / BUILD_META
        if previous is not None:
            if previous.get("identity") != identity:
                raise KBError(f"{self.folder} holds an index build of another KB, model or settings "
                              f"({meta_path}); delete it or choose another folder")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise KBError(f"{self.folder} is not empty and holds no index build ({BUILD_META}): refusing to "
                          "write into it")
        (self.folder / SHARDS).mkdir(parents=True, exist_ok=True)
        write_json(meta_path, {"identity": identity, "done": False})

    def _shard_path(self, index: int) -> Path:
        return self.folder / SHARDS / f"{index:06d}.npz"

    def _write_shard(self, index: int, arrays: Dict[str, numpy.ndarray], layout: List[List[Any]],
                     unreadable: List[Tuple[str, str]]) -> None:
        path = self._shard_path(index)
        temporary = path.with_suffix(".tmp.npz")
        numpy.savez(temporary, **arrays)
        write_json(path.with_suffix(".json"), {"layout": layout, "unreadable": unreadable,
                                               "shapes": {k: list(v.shape) for k, v in arrays.items()}})
        os.replace(temporary, path)  # a shard exists only once it is complete

    def _finished_shards(self, count: int) -> Set[int]:
        """Shards complete on disk (their JSON is read once, at assembly)."""
        return {index for index in range(count)
                if self._shard_path(index).is_file() and self._shard_path(index).with_suffix(".json").is_file()}

    # ------------------------------------------------------------ the build
    def run(self) -> EntityIndex:
        """Encode what is not on disk yet, assemble the index, and return it
        (memory-mapped from ``folder``)."""
        build_meta = self.folder / BUILD_META
        previous = read_json(build_meta) if build_meta.is_file() else None
        identity = self._identity()
        if previous is not None and previous.get("done") and previous.get("identity") == identity:
            self.loaded = True
            return EntityIndex.load(self.folder, n_entities=len(self.kb))
        self._prepare_folder(identity, previous)
        total = len(self.kb)
        shards = [(start, min(start + self.shard_size, total)) for start in range(0, total, self.shard_size)]
        finished = self._finished_shards(len(shards))
        self.reused_shards = len(finished)
        todo = [i for i in range(len(shards)) if i not in finished]
        if finished:
            msg.info(f"Resuming the entity index build in {self.folder}: {len(finished)} of {len(shards)} "
                     "shards are done")
        if todo:
            done = sum(end - start for i, (start, end) in enumerate(shards) if i in finished)
            processes = min(self.settings.build_processes, len(todo))
            if processes > 1:
                self._encode_in_processes([shards[i] for i in todo], todo, processes, done=done)
            else:
                self._encode_shards([shards[i] for i in todo], todo, done=done)
        return self._assemble(len(shards), identity)

    def _encode_in_processes(self, spans: List[Tuple[int, int]], indices: List[int], processes: int, *,
                             done: int) -> None:
        """Encode the shards on ``processes`` forked processes (one torch
        thread each: on CPU that beats one process with many threads), each
        writing its own shards; a failure keeps what the others finished."""
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._warm_up()  # once here rather than once per process
        jobs = list(zip(spans, indices))
        workers = [context.Process(target=self._encode_group, daemon=True,
                                   args=([s for s, _ in jobs[w::processes]], [i for _, i in jobs[w::processes]]))
                   for w in range(processes)]
        bar = None
        if self.progress:
            from ..progress import progress_bar

            bar = progress_bar(total=len(self.kb), initial=done, desc=f"Encoding KB entities ({processes} processes)",
                               unit="entity", smoothing=0.1)
        try:
            for worker in workers:
                worker.start()
            while any(worker.is_alive() for worker in workers):
                time.sleep(0.5)
                if bar is not None:
                    bar.update(done + sum(end - start for (start, end), index in jobs
                                          if self._shard_path(index).is_file()) - bar.n)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
            if bar is not None:
                bar.close()
        failed = [worker.exitcode for worker in workers if worker.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} of {processes} entity encoding processes failed (exit codes "
                               f"{failed}; their errors are printed above). The finished shards are kept in "
                               f"{self.folder / SHARDS}: run the same build again to resume")

    def _warm_up(self) -> None:
        """Run both towers once (a blank image, a short text), so what they
        build lazily (the bfloat16 TorchScript graph, the OpenVINO
        conversions: 1-2 s) exists before the processes fork; each then only
        compiles its one-thread OpenVINO towers."""
        encoder = self.network.encoder
        device = encoder.device
        blank = torch.zeros((1, encoder.image_size, encoder.image_size, 3), dtype=torch.uint8, device=device)
        with torch.inference_mode(), self.network.backbone_autocast():
            encoder.encode_pixels(blank)
            if encoder.caches_text:  # a borrowed text model (shared transformer) is not this build's to run
                encoder.encode_texts(["warm up"])

    def _encode_group(self, spans: List[Tuple[int, int]], indices: List[int]) -> None:
        """The body of one forked encoding process: one torch thread, images
        decoded in the process itself."""
        torch.set_num_threads(1)
        self.progress = False
        self.settings = dataclasses.replace(self.settings, image_workers=0)
        self._encode_shards(spans, indices, done=0)

    def _loader(self, spans: Sequence[Tuple[int, int]]) -> Iterator[EntityRows]:
        size = self.settings.entity_batch_size
        batches = [(s, min(s + size, end)) for start, end in spans for s in range(start, end, size)]
        workers = self.settings.image_workers
        if workers:
            # A fast tokenizer that has run threads warns in every forked child; ours tokenize
            # nothing (texts are tokenized here), and batches of 64 short texts need no threads.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(
            _EntityBatches(self.encoding, self.kb, batches), batch_size=None, num_workers=workers,
            prefetch_factor=4 if workers else None, persistent_workers=False, collate_fn=lambda batch: batch)
        return iter(loader)

    def _encode_shards(self, spans: List[Tuple[int, int]], indices: List[int], *, done: int) -> None:
        self.network.eval()
        bar = None
        if self.progress:
            bar = progress_bar(total=len(self.kb), initial=done, desc="Encoding KB entities", unit="entity",
                               smoothing=0.1)
        shard_of = {start: index for (start, _), index in zip(spans, indices)}
        ends = {index: end for (_, end), index in zip(spans, indices)}
        # torch keeps all its threads: the image workers' decoding takes a
        # fifth of the CPU time, and measured faster (wall) than giving them a core each.
        try:
            self._encode_loop(spans, shard_of, ends, bar)
        finally:
            if bar is not None:
                bar.close()

    def _encode_loop(self, spans: List[Tuple[int, int]], shard_of: Dict[int, int], ends: Dict[int, int],
                     bar: Any) -> None:
        """Encode the batches of ``spans``, writing each shard when its last batch is done."""
        current: Optional[int] = None
        sides: List[Dict[str, torch.Tensor]] = []
        unreadable: List[Tuple[str, str]] = []
        with torch.inference_mode():
            for batch in self._loader(spans):
                start, end = batch.rows[0], batch.rows[-1] + 1
                if start in shard_of:
                    current, sides, unreadable = shard_of[start], [], []
                sides.append(self.encoding.side(self.kb, batch))
                unreadable.extend(tuple(pair) for pair in batch.unreadable)
                if bar is not None:
                    bar.update(end - start)
                if end == ends[current]:
                    arrays, layout = index_arrays(self.network.matcher, sides,
                                                  max_queries=self.settings.max_cached_queries)
                    self._write_shard(current, arrays, layout, unreadable)

    # ------------------------------------------------------------ assembling
    def _assemble(self, count: int, identity: Dict[str, Any]) -> EntityIndex:
        """Copy the shards, in order, into the index's files (the token axis
        padded to the widest shard), then drop the shards."""
        infos = [read_json(self._shard_path(i).with_suffix(".json")) for i in range(count)]
        self.unreadable = [tuple(pair) for info in infos for pair in info["unreadable"]]
        names = list(infos[0]["shapes"])
        shapes = {name: joined_shape([info["shapes"][name] for info in infos]) for name in names}

        def chunks(name: str) -> Iterator[numpy.ndarray]:
            for index in range(count):
                with numpy.load(self._shard_path(index), allow_pickle=False) as shard:
                    yield shard[name]

        checksums = write_arrays(self.folder, shapes, chunks)
        # Shards of a build begun before the layout had its own field carry it in their meta.
        layout = infos[0].get("layout") or infos[0]["meta"]["retrieval_parts"]
        meta = self.encoding.meta(self.kb, layout, max_queries=self.settings.max_cached_queries,
                                  unreadable=[entity_id for entity_id, _ in self.unreadable])
        write_meta(self.folder, {**meta, "n_entities": len(self.kb), "arrays": sorted(shapes),
                                 "checksums": checksums})
        shutil.rmtree(self.folder / SHARDS)
        write_json(self.folder / BUILD_META, {"identity": identity, "done": True})
        return EntityIndex.load(self.folder, n_entities=len(self.kb))
