"""Building a large entity cache: streamed, in parallel, resumable.

KB images are decoded and resized by ``image_workers`` DataLoader worker
processes while the main process runs the frozen backbone (under autocast in
the linker's ``inference_precision``, channels-last images) and the matcher
on one batch after another; or, with ``build_processes`` > 1, that many
forked processes with one torch thread each encode every N-th shard.
Finished entities go to disk in shards of ``shard_size`` rows; after a
crash or a kill the same call finds the shards that are complete (written
under a temporary name, then renamed) and encodes only the rest. At the end
the shards are copied, in KB order, into the cache's ``.npy`` files with
plain file writes, so memory stays bounded by one shard (per process)
whatever the KB's size.

The backbone's feature cache is not used: it would keep every entity's
features, which is what this path exists to avoid.
"""
import dataclasses
import hashlib
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy
import torch
from wasabi import msg

from .encoders.base import ImageFeatures, TextFeatures, float_features, inference_autocast, join_features
from .entity_cache import EntityCache, build_cache_arrays, cache_settings
from .errors import KBError
from .fileio import read_json, write_json
from .images import ImageLoadError, load_image
from .kb import MultimodalKB

BUILD_META = "build.json"
SHARDS = "shards"
#: Entities per shard (rounded up to whole entity batches).
DEFAULT_SHARD_SIZE = 4096


class _EntityBatches(torch.utils.data.Dataset):
    """Batch i of the entities to encode: texts and preprocessed images (run
    in DataLoader workers). Unreadable images become absent ones,
    reported back with the entity's id and the reason."""

    def __init__(self, encoder: Any, items: Sequence[Tuple[str, str, Optional[str]]],
                 batches: Sequence[Tuple[int, int]], allow_urls: bool) -> None:
        self.encoder = encoder
        self.items = items
        self.batches = batches
        self.allow_urls = allow_urls

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        start, end = self.batches[index]
        chunk = self.items[start:end]
        images, unreadable = [], []
        for entity_id, _, source in chunk:
            image = None
            if source is not None:
                try:
                    image = load_image(source, allow_urls=self.allow_urls)
                except ImageLoadError as err:
                    unreadable.append((entity_id, f"{err} (image of KB entity '{entity_id}')"))
            images.append(image)
        pixels, image_mask = self.encoder.preprocess_images(images)
        # Texts are tokenized by the main process: a forked fast tokenizer turns its threads off.
        return {"start": start, "end": end, "pixels": pixels, "image_mask": image_mask,
                "texts": [text for _, text, _ in chunk], "unreadable": unreadable}


def kb_items(kb: MultimodalKB, encoder: Any) -> List[Tuple[str, str, Optional[str]]]:
    """(id, ``name [SEP] description``, first image or None) per KB row: the
    inputs the exact cache is built from."""
    return [(kb.entity_id(row), encoder.text_for_entity(kb.name(row), kb.description(row)),
             (kb.images(row) or [None])[0]) for row in range(len(kb))]


def kb_digest(kb: MultimodalKB) -> str:
    """Identifies the KB's entities and their order (for resuming)."""
    digest = hashlib.sha1()
    for entity_id in kb.entity_ids:
        digest.update(entity_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class StreamedCacheBuild:
    """One build of a KB's entity cache for a network, into ``folder``.

    ``folder`` holds ``build.json`` (what is being built), ``shards/`` while
    the build runs and, when it is done, the cache itself (``meta.json`` and
    one ``.npy`` per array, the format :meth:`EntityCache.load` reads).
    """

    def __init__(self, network: Any, kb: MultimodalKB, settings: Any, folder: Path, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> None:
        self.network = network
        self.kb = kb
        self.settings = settings
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
        return {**cache_settings(self.settings.max_cached_queries), "fingerprint": self.network.fingerprint(),
                "n_entities": len(self.kb), "kb": kb_digest(self.kb), "shard_size": self.shard_size,
                "entity_batch_size": self.settings.entity_batch_size}

    def _prepare_folder(self, identity: Dict[str, Any], previous: Optional[Dict[str, Any]]) -> None:
        """Start or resume: shards of an identical earlier build (``previous``
        is its ``build.json``) are kept, anything else in the folder is an
        error (never deleted silently)."""
        meta_path = self.folder / BUILD_META
        if previous is not None:
            if previous.get("identity") != identity:
                raise KBError(f"{self.folder} holds a cache build of another KB, model or settings "
                              f"({meta_path}); delete it or choose another folder")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise KBError(f"{self.folder} is not empty and holds no cache build ({BUILD_META}): refusing to "
                          "write into it")
        (self.folder / SHARDS).mkdir(parents=True, exist_ok=True)
        write_json(meta_path, {"identity": identity, "done": False})

    def _shard_path(self, index: int) -> Path:
        return self.folder / SHARDS / f"{index:06d}.npz"

    def _write_shard(self, index: int, arrays: Dict[str, numpy.ndarray], meta: Dict[str, Any],
                     unreadable: List[Tuple[str, str]]) -> None:
        path = self._shard_path(index)
        temporary = path.with_suffix(".tmp.npz")
        numpy.savez(temporary, **arrays)
        write_json(path.with_suffix(".json"), {"meta": meta, "unreadable": unreadable,
                                               "shapes": {k: list(v.shape) for k, v in arrays.items()}})
        os.replace(temporary, path)  # a shard exists only once it is complete

    def _finished_shards(self, count: int) -> Set[int]:
        """Shards complete on disk (their JSON is read once, at assembly)."""
        return {index for index in range(count)
                if self._shard_path(index).is_file() and self._shard_path(index).with_suffix(".json").is_file()}

    # ------------------------------------------------------------ the build
    def run(self) -> EntityCache:
        """Encode what is not on disk yet, assemble the cache, and return it
        (memory-mapped from ``folder``)."""
        build_meta = self.folder / BUILD_META
        previous = read_json(build_meta) if build_meta.is_file() else None
        identity = self._identity()
        if previous is not None and previous.get("done") and previous.get("identity") == identity:
            self.loaded = True
            return EntityCache.load(self.folder, n_entities=len(self.kb))
        self._prepare_folder(identity, previous)
        total = len(self.kb)
        shards = [(start, min(start + self.shard_size, total)) for start in range(0, total, self.shard_size)]
        finished = self._finished_shards(len(shards))
        self.reused_shards = len(finished)
        todo = [i for i in range(len(shards)) if i not in finished]
        if finished:
            msg.info(f"Resuming the entity cache build in {self.folder}: {len(finished)} of {len(shards)} "
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
            from .progress import progress_bar

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
        """Run the image tower once on a blank image, so graphs it compiles
        lazily (the bfloat16 TorchScript one) exist before the processes fork."""
        encoder = self.network.encoder
        device = encoder.device
        blank = torch.zeros((1, 3, encoder.image_size, encoder.image_size), device=device)
        with torch.inference_mode(), inference_autocast(self.settings.inference_precision, device):
            encoder.encode_image(blank)

    def _encode_group(self, spans: List[Tuple[int, int]], indices: List[int]) -> None:
        """The body of one forked encoding process: one torch thread, images
        decoded in the process itself."""
        torch.set_num_threads(1)
        self.progress = False
        self.settings = dataclasses.replace(self.settings, image_workers=0)
        self._encode_shards(spans, indices, done=0)

    def _loader(self, spans: Sequence[Tuple[int, int]]) -> Iterator[Dict[str, Any]]:
        encoder = self.network.encoder
        size = self.settings.entity_batch_size
        batches = [(s, min(s + size, end)) for start, end in spans for s in range(start, end, size)]
        dataset = _EntityBatches(encoder, kb_items(self.kb, encoder), batches,
                                 bool(self.settings.allow_image_urls))
        workers = self.settings.image_workers
        if workers:
            # A fast tokenizer that has run threads warns in every forked child; ours tokenize
            # nothing (texts are tokenized here), and batches of 64 short texts need no threads.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
            persistent_workers=False)
        return iter(loader)

    def _encode_shards(self, spans: List[Tuple[int, int]], indices: List[int], *, done: int) -> None:
        network = self.network
        network.eval()
        bar = None
        if self.progress:
            from .progress import progress_bar

            bar = progress_bar(total=len(self.kb), initial=done, desc="Encoding KB entities", unit="entity",
                               smoothing=0.1)
        shard_of = {start: index for (start, _), index in zip(spans, indices)}
        ends = {index: end for (_, end), index in zip(spans, indices)}
        # torch keeps all its threads: the image workers' decoding takes a
        # fifth of the CPU time, and measured faster (wall) than giving them a core each.
        try:
            self._encode_loop(spans, shard_of, ends, bar, network.encoder.device)
        finally:
            if bar is not None:
                bar.close()

    def _encode_loop(self, spans: List[Tuple[int, int]], shard_of: Dict[int, int], ends: Dict[int, int],
                     bar: Any, device: torch.device) -> None:
        """Encode the batches of ``spans``, writing each shard when its last batch is done."""
        network = self.network
        current: Optional[int] = None
        sides: List[Dict[str, torch.Tensor]] = []
        unreadable: List[Tuple[str, str]] = []
        with torch.inference_mode():
            for batch in self._loader(spans):
                if batch["start"] in shard_of:
                    current, sides, unreadable = shard_of[batch["start"]], [], []
                sides.append(self._entity_side(batch, device))
                unreadable.extend(tuple(pair) for pair in batch["unreadable"])
                if bar is not None:
                    bar.update(batch["end"] - batch["start"])
                if batch["end"] == ends[current]:
                    arrays, meta = build_cache_arrays(network.matcher, sides,
                                                      max_queries=self.settings.max_cached_queries)
                    self._write_shard(current, arrays, meta, unreadable)

    def _entity_side(self, batch: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
        """The matcher's entity side of one prepared batch."""
        encoder, matcher = self.network.encoder, self.network.matcher
        tokens = encoder.tokenize(batch["texts"])
        mask = tokens["attention_mask"].to(device)
        image_mask = batch["image_mask"].to(device)
        with inference_autocast(self.settings.inference_precision, device):
            text_global, text_tokens = encoder.encode_text(tokens["input_ids"].to(device), mask)
            image_global, image_tokens = encoder.encode_image_masked(batch["pixels"].to(device), image_mask)
        text_global, text_tokens, image_global, image_tokens = float_features(
            text_global, text_tokens, image_global, image_tokens)
        items = join_features(TextFeatures(text_global, text_tokens, mask.bool()),
                              ImageFeatures(image_global, image_tokens, image_mask))
        return matcher.entity_side(items.to(next(matcher.parameters()).device))

    # ------------------------------------------------------------ assembling
    def _assemble(self, count: int, identity: Dict[str, Any]) -> EntityCache:
        """Copy the shards, in order, into one ``.npy`` per array (padding the
        token axis to the widest shard), then write the meta and drop the shards."""
        infos = [read_json(self._shard_path(i).with_suffix(".json")) for i in range(count)]
        self.unreadable = [tuple(pair) for info in infos for pair in info["unreadable"]]
        shapes: Dict[str, List[int]] = {}
        for info in infos:
            for name, shape in info["shapes"].items():
                known = shapes.setdefault(name, [0] + shape[1:])
                known[0] += shape[0]
                for axis in range(1, len(shape)):
                    known[axis] = max(known[axis], shape[axis])
        checksums = {}
        for name, shape in shapes.items():
            checksums[name] = self._write_array(name, shape, count)
        meta = {**infos[0]["meta"], "fingerprint": identity["fingerprint"],
                "unreadable_kb_images": {"count": len(self.unreadable),
                                         "ids": [entity_id for entity_id, _ in self.unreadable[:20]]},
                "encode_precision": self.settings.inference_precision,
                "n_entities": len(self.kb), "arrays": sorted(shapes), "checksums": checksums}
        write_json(self.folder / "meta.json", meta)
        shutil.rmtree(self.folder / SHARDS)
        write_json(self.folder / BUILD_META, {"identity": identity, "done": True})
        return EntityCache.load(self.folder, n_entities=len(self.kb))

    def _write_array(self, name: str, shape: List[int], count: int) -> int:
        """Stream one array's shards into ``<name>.npy``; returns its CRC-32."""
        checksum = 0
        path = self.folder / f"{name}.npy"
        dtype = None
        with open(path, "wb") as out:
            for index in range(count):
                with numpy.load(self._shard_path(index), allow_pickle=False) as shard:
                    part = shard[name]
                if dtype is None:
                    dtype = part.dtype
                    numpy.lib.format.write_array_header_2_0(
                        out, {"descr": numpy.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": tuple(shape)})
                if part.ndim >= 2 and part.shape[1] < shape[1]:
                    part = numpy.pad(part, [(0, 0), (0, shape[1] - part.shape[1])] + [(0, 0)] * (part.ndim - 2))
                data = numpy.ascontiguousarray(part).view(numpy.uint8).reshape(-1)
                checksum = zlib.crc32(data, checksum)
                out.write(data.tobytes())
        return checksum
