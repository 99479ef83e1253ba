"""The M3EL matcher: features -> per-branch scores -> loss.

The matcher works on encoder outputs (:class:`EncodedItems`), so it can be
trained on cached features of a frozen encoder or end to end. Entities are
turned into an *entity side* once (:meth:`M3ELMatcher.entity_side`); the same
side serves in-batch training, candidate reranking and the retrieval vectors
of the two-stage search (see ``spacy_m3el.pipeline.linking``).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .compression import pool_queries
from .config import M3ELConfig
from .contrastive import branches_contrastive_loss
from .matching import CrossModalMatching, IntraModalMatching, Side


@dataclass
class EncodedItems:
    """Encoder output for N mentions or entities.

    ``text_mask`` is True on real tokens; ``image_mask`` is True where the
    item has an image. Features under a False mask are ignored.
    """

    text_global: torch.Tensor  # [N, dt]
    text_tokens: torch.Tensor  # [N, L, dt]
    text_mask: torch.Tensor  # [N, L] bool
    image_global: torch.Tensor  # [N, image_global_dim]
    image_tokens: torch.Tensor  # [N, P, image_token_dim]
    image_mask: torch.Tensor  # [N] bool

    def __len__(self) -> int:
        return self.text_global.shape[0]

    def to(self, device) -> "EncodedItems":
        return EncodedItems(**{k: v.to(device) for k, v in self.__dict__.items()})

    def select(self, index: torch.Tensor) -> "EncodedItems":
        return EncodedItems(**{k: v[index] for k, v in self.__dict__.items()})


def _gather(side: Side, candidates: torch.Tensor) -> Side:
    """Index every entity tensor [E, ...] by candidates [B, K] -> [B, K, ...]."""
    return {name: value[candidates] for name, value in side.items()}


class M3ELMatcher(nn.Module):
    """Scores mentions against entities with M3EL's multi-level matching."""

    def __init__(self, config: M3ELConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.uses_image = cfg.use_image or cfg.use_t2v or cfg.use_v2t
        self.text_global_norm = nn.LayerNorm(cfg.text_dim)
        self.text_tokens_norm = nn.LayerNorm(cfg.text_dim)
        if self.uses_image:
            self.image_global_proj = nn.Linear(cfg.image_global_dim, cfg.image_dim)
            self.image_tokens_proj = nn.Linear(cfg.image_token_dim, cfg.image_dim)
            self.image_global_norm = nn.LayerNorm(cfg.image_dim)
            self.image_tokens_norm = nn.LayerNorm(cfg.image_dim)
        if cfg.use_text:
            self.text_matching = IntraModalMatching(cfg.text_dim, cfg.hidden_dim, use_g2l=cfg.use_g2l)
        if cfg.use_image:
            self.image_matching = IntraModalMatching(cfg.image_dim, cfg.hidden_dim, use_g2l=cfg.use_g2l)
        if cfg.use_t2v or cfg.use_v2t:
            self.cross_matching = CrossModalMatching(
                cfg.text_dim,
                cfg.image_dim,
                cfg.hidden_dim,
                temperatures=cfg.csra_temperatures,
                lam=cfg.csra_lambda,
                bidirectional=cfg.cross_modal == "bidirectional",
            )

    # ------------------------------------------------------------------ features
    def features(self, items: EncodedItems) -> Dict[str, torch.Tensor]:
        """Project and LayerNorm encoder outputs; zero what the masks exclude."""
        text_mask = items.text_mask.to(torch.bool)
        feats = {
            "text_global_raw": items.text_global,
            "text_global": self.text_global_norm(items.text_global),
            "text_tokens": self.text_tokens_norm(items.text_tokens)
            * text_mask.unsqueeze(-1).to(items.text_tokens.dtype),
            "text_mask": text_mask,
        }
        if self.uses_image:
            has_image = items.image_mask.to(torch.bool)
            present = has_image.to(items.image_global.dtype)
            image_global_raw = self.image_global_proj(items.image_global) * present[:, None]
            image_tokens = self.image_tokens_proj(items.image_tokens)
            feats["image_global_raw"] = image_global_raw
            feats["image_global"] = self.image_global_norm(image_global_raw) * present[:, None]
            feats["image_tokens"] = self.image_tokens_norm(image_tokens) * present[:, None, None]
            feats["image_token_mask"] = has_image[:, None].expand(image_tokens.shape[:2])
            feats["has_image"] = has_image
        return feats

    def _sides(self, feats: Dict[str, torch.Tensor], *, entity: bool) -> Side:
        cfg = self.config
        side: Side = {}
        if cfg.use_text:
            make = self.text_matching.entity_side if entity else self.text_matching.mention_side
            part = make(feats["text_global"], feats["text_tokens"], feats["text_mask"])
            side.update({f"text_{k}": v for k, v in part.items()})
        if cfg.use_image:
            make = self.image_matching.entity_side if entity else self.image_matching.mention_side
            part = make(feats["image_global"], feats["image_tokens"], feats["image_token_mask"])
            side.update({f"image_{k}": v for k, v in part.items()})
        if self.uses_image:
            side["has_image"] = feats["has_image"]
        if cfg.use_t2v or cfg.use_v2t:
            side.update(
                self.cross_matching.side(
                    feats["text_global"],
                    feats["text_tokens"],
                    feats["text_mask"],
                    feats["image_global"],
                    feats["image_tokens"],
                    feats["image_token_mask"],
                    use_t2v=cfg.use_t2v,
                    use_v2t=cfg.use_v2t,
                )
            )
        return side

    def entity_side(self, items: EncodedItems) -> Side:
        """Everything about the entities that does not depend on a mention."""
        return self._sides(self.features(items), entity=True)

    def mention_side(self, items: EncodedItems) -> Side:
        return self._sides(self.features(items), entity=False)

    # ------------------------------------------------------------------ scoring
    def branch_weights(self) -> Dict[str, float]:
        """Weight of every elementary score in the final score (their mean)."""
        cfg = self.config
        branch = 1.0 / len(cfg.branches)
        level = 1.0 / max(len(cfg.intra_levels), 1)
        weights = {}
        for modality in ("text", "image"):
            if modality in cfg.branches:
                for lvl in cfg.intra_levels:
                    weights[f"{modality}_{lvl}"] = branch * level
        for name in ("t2v", "v2t"):
            if name in cfg.branches:
                weights[name] = branch
        return weights

    def _g2l(self, modality: str, mention: Side, entity: Side, pairwise: bool) -> torch.Tensor:
        prefix = modality + "_"
        m_part = {k[len(prefix):]: v for k, v in mention.items() if k.startswith(prefix)}
        e_part = {k[len(prefix):]: v for k, v in entity.items() if k.startswith(prefix)}
        module = self.text_matching if modality == "text" else self.image_matching
        g2l = module.g2l(m_part, e_part, pairwise)
        if modality == "image":
            # No image on either side: no image evidence at all.
            m_img, e_img = mention["has_image"], entity["has_image"]
            both = (m_img[:, None] & e_img[None, :]) if pairwise else (m_img[:, None] & e_img)
            g2l = g2l * both.to(g2l.dtype)
        return g2l

    def scores(
        self, mention: Side, entity: Side, candidates: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Per-branch and final scores.

        With ``candidates=None`` every mention is scored against every entity
        ([B, E]); otherwise ``candidates`` [B, K] holds entity row indices per
        mention and the result is [B, K].
        """
        if candidates is None:
            return self._scores(mention, entity, pairwise=True)
        return self._scores(mention, _gather(entity, candidates), pairwise=False)

    def pair_scores(self, mention_items: EncodedItems, entity_items: EncodedItems) -> Dict[str, torch.Tensor]:
        """[B, E] scores of every mention against every entity, from encoder outputs."""
        return self.scores(self.mention_side(mention_items), self.entity_side(entity_items))

    def candidate_scores(self, mention: Side, candidates: Side) -> Dict[str, torch.Tensor]:
        """Scores [B, K] against an entity side already gathered per mention
        ([B, K, ...], e.g. read from a memory-mapped cache)."""
        return self._scores(mention, candidates, pairwise=False)

    def _scores(self, mention: Side, ent: Side, *, pairwise: bool) -> Dict[str, torch.Tensor]:
        cfg = self.config

        def dot(m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            return m @ e.T if pairwise else torch.einsum("bd,bkd->bk", m, e)

        out: Dict[str, torch.Tensor] = {}
        for modality in ("text", "image"):
            if modality not in cfg.branches:
                continue
            if cfg.use_g2g:
                key = f"{modality}_global"
                out[f"{modality}_g2g"] = dot(mention[key], ent[key])
            if cfg.use_g2l:
                out[f"{modality}_g2l"] = self._g2l(modality, mention, ent, pairwise)
            levels = [out[f"{modality}_{lvl}"] for lvl in cfg.intra_levels]
            out[modality] = torch.stack(levels).mean(dim=0)
        for name in ("t2v", "v2t"):
            if name in cfg.branches:
                out[name] = dot(mention[name], ent[name])
        out["score"] = torch.stack([out[name] for name in cfg.branches]).mean(dim=0)
        return out

    # ------------------------------------------------------- decomposition (3.5)
    def _decomposable_parts(self) -> List[str]:
        return [name for name in self.branch_weights() if not name.endswith("_g2l")]

    @staticmethod
    def _part_key(name: str) -> str:
        return name.replace("_g2g", "_global")

    def retrieval_parts(self) -> List[str]:
        """Entity-side keys that :meth:`entity_retrieval_vectors` concatenates, in order."""
        return [self._part_key(n) for n in self._decomposable_parts()]

    def cached_entity_keys(self) -> List[str]:
        """Entity-side keys stored in the entity index besides the retrieval
        parts: the G2L queries, their weights and the class vectors, and
        ``has_image``."""
        keys = []
        if self.config.use_g2l:
            for modality in ("text", "image"):
                if modality in self.config.branches:
                    keys += [f"{modality}_query", f"{modality}_query_weight", f"{modality}_cls"]
        return keys + (["has_image"] if self.uses_image else [])

    def compress_entity_side(self, entity: Side, max_queries: int) -> Side:
        """The entity side with each modality's G2L queries pooled to at most
        ``max_queries`` weighted centroids (see :mod:`.compression`): a much
        smaller cache for an approximate G2L score; every other part is exact."""
        out = dict(entity)
        for modality in ("text", "image"):
            query = f"{modality}_query"
            if query in out:
                out[query], out[f"{modality}_query_weight"] = pool_queries(
                    out[query], out[f"{modality}_query_weight"], max_queries
                )
        return out

    def mention_retrieval_vectors(self, mention: Side) -> torch.Tensor:
        """[B, D]: weighted concatenation whose inner product with
        :meth:`entity_retrieval_vectors` is the decomposable part of the score."""
        weights = self.branch_weights()
        parts = [weights[n] * mention[self._part_key(n)] for n in self._decomposable_parts()]
        return torch.cat(parts, dim=-1)

    def entity_retrieval_vectors(self, entity: Side) -> torch.Tensor:
        return torch.cat([entity[key] for key in self.retrieval_parts()], dim=-1)

    def late_interaction_scores(
        self, mention: Side, entity: Side, candidates: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The part of the final score that needs the (mention, entity) pair: G2L.

        ``retrieval_vectors(m) . retrieval_vectors(e) + late == scores()["score"]``.
        """
        pairwise = candidates is None
        ent = entity if pairwise else _gather(entity, candidates)
        batch = next(iter(mention.values())).shape[0]
        width = next(iter(entity.values())).shape[0] if pairwise else candidates.shape[1]
        total = next(iter(mention.values())).new_zeros((batch, width), dtype=torch.float32)
        for name, weight in self.branch_weights().items():
            if name.endswith("_g2l"):
                total = total + weight * self._g2l(name[: -len("_g2l")], mention, ent, pairwise)
        return total

    # ------------------------------------------------------------------ training
    def loss(self, mention_items: EncodedItems, entity_items: EncodedItems,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Training loss with in-batch negatives: ``labels`` [B] gives each
        mention's gold row in ``entity_items``, whose rows are the candidates
        of every mention (the batch's gold entities, plus any extra negatives)."""
        return self.loss_and_scores(mention_items, entity_items, labels)[0]

    def loss_and_scores(self, mention_items: EncodedItems, entity_items: EncodedItems,
                        labels: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """:meth:`loss` and the [B, E] scores it was computed from, for a
        scorer trained on top of them."""
        cfg = self.config
        m_feats = self.features(mention_items)
        e_feats = self.features(entity_items)
        scores = self.scores(self._sides(m_feats, entity=False), self._sides(e_feats, entity=True))
        losses = {"score": F.cross_entropy(scores["score"].float(), labels)}
        for name in cfg.branches:
            losses[name] = F.cross_entropy(scores[name].float(), labels)
        if cfg.use_contrastive and {"text", "image"} & set(cfg.branches):
            losses["contrastive"] = branches_contrastive_loss(cfg, m_feats, e_feats, labels)
        losses["loss"] = sum(losses.values())
        return losses, scores
