"""Hyper-parameters and ablation switches of the M3EL matching network."""
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, List, Tuple

CROSS_MODAL_MODES = ("bidirectional", "unidirectional")


@dataclass
class M3ELConfig:
    """Shapes and switches of :class:`M3ELMatcher`.

    ``text_dim`` is the width of the encoder's text global and text tokens;
    ``image_global_dim`` / ``image_token_dim`` are the raw widths of the image
    global and patches before the linear layers that project them to
    ``image_dim`` (dv, 96 in the paper).
    """

    text_dim: int
    image_global_dim: int
    image_token_dim: int
    image_dim: int = 96
    hidden_dim: int = 96
    temperature: float = 0.03
    inter_weight: float = 1.0
    intra_weight: float = 0.8
    csra_temperatures: Tuple[float, ...] = (2.0, 2.5, 3.5, 4.5, float("inf"))
    csra_lambda: float = 1.0
    use_contrastive: bool = True
    use_g2g: bool = True
    use_g2l: bool = True
    use_text: bool = True
    use_image: bool = True
    use_t2v: bool = True
    use_v2t: bool = True
    cross_modal: str = "bidirectional"

    def __post_init__(self) -> None:
        self.csra_temperatures = tuple(float(t) for t in self.csra_temperatures)
        if self.cross_modal not in CROSS_MODAL_MODES:
            raise ValueError(
                f"cross_modal must be one of {CROSS_MODAL_MODES}, got {self.cross_modal!r}"
            )
        if self.cross_modal == "unidirectional" and self.use_v2t:
            # The unidirectional variant of the paper's code has no V2T branch.
            self.use_v2t = False
        if (self.use_text or self.use_image) and not (self.use_g2g or self.use_g2l):
            raise ValueError(
                "Intra-modal branches (use_text/use_image) need use_g2g or use_g2l; "
                "disable use_text and use_image instead of both matching levels."
            )
        if not self.branches:
            raise ValueError("M3ELConfig enables no scoring branch: enable at least one "
                             "of use_text, use_image, use_t2v, use_v2t.")
        for name in ("text_dim", "image_global_dim", "image_token_dim", "image_dim", "hidden_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"M3ELConfig.{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"M3ELConfig.temperature must be positive, got {self.temperature}")
        if not self.csra_temperatures:
            raise ValueError("M3ELConfig.csra_temperatures needs at least one head")

    @property
    def branches(self) -> List[str]:
        """Names of the enabled score branches, in a fixed order."""
        names = []
        if self.use_text:
            names.append("text")
        if self.use_image:
            names.append("image")
        if self.use_t2v:
            names.append("t2v")
        if self.use_v2t:
            names.append("v2t")
        return names

    @property
    def intra_levels(self) -> List[str]:
        return [name for name, on in (("g2g", self.use_g2g), ("g2l", self.use_g2l)) if on]

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        # JSON has no infinity: store it as a string and read it back.
        data["csra_temperatures"] = [
            "inf" if t == float("inf") else t for t in self.csra_temperatures
        ]
        return data

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Default of every field that has one, JSON-safe (infinity as "inf")."""
        return {
            f.name: ["inf" if t == float("inf") else t for t in f.default] if f.name == "csra_temperatures"
            else f.default
            for f in fields(cls)
            if f.default is not MISSING
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "M3ELConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown M3ELConfig fields: {sorted(unknown)}")
        return cls(**data)
