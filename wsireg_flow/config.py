"""Every tunable of wsireg-flow, with its default, in one validated pydantic model.

``configs/default.yaml`` mirrors :class:`Config` exactly (a test keeps them in sync). A YAML
file may set any subset; unknown keys and bad values are refused with a
:class:`~wsireg_flow.errors.ConfigError` that names the file and the dotted key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wsireg_flow.errors import ConfigError

SCHEDULER_ENV = "WSIREG_FLOW_SCHEDULER"
SCHEDULER_NAMES = ("local", "threads", "sync")
# a Dask scheduler address: protocol://host:port (tcp, tls, ucx, ws, wss, inproc) or host:port
SCHEDULER_ADDRESS = re.compile(r"^((tcp|tls|ucx|ws|wss)://\S+:\d+|inproc://\S+|[\w.-]+:\d+)$")
SCHEDULER_HELP = (
    "{value!r} is not 'local', 'threads', 'sync' or a scheduler address such as tcp://host:8786"
)


def is_scheduler(value: str) -> bool:
    """True for a scheduler name (local, threads, sync) or a Dask scheduler address."""
    return value in SCHEDULER_NAMES or SCHEDULER_ADDRESS.match(value) is not None


def _default_scheduler() -> str:
    """``$WSIREG_FLOW_SCHEDULER`` when set (checked here, naming the variable), else local."""
    value = os.environ.get(SCHEDULER_ENV) or "local"
    if not is_scheduler(value):
        raise ConfigError(f"${SCHEDULER_ENV}: " + SCHEDULER_HELP.format(value=value))
    return value


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


class IOConfig(_Section):
    """Reading slides and writing OME-Zarr pyramids."""

    pixel_size_um: float | None = Field(
        None, gt=0, description="Micrometres per level-0 pixel; overrides (or supplies) metadata."
    )
    chunk: int = Field(
        1024, ge=64, le=8192, description="Zarr chunk side (px) of (c, y, x) chunks."
    )
    pyramid_max_side: int = Field(
        1024,
        ge=64,
        le=4096,
        description="Downsample by 2 until the longest side is at most this (px). At most "
        "4096: QC previews read a pyramid's coarsest level whole.",
    )
    codec: Literal["lz4", "zstd"] = Field(
        "lz4", description="Blosc codec: lz4 (fast, no shuffle) or zstd (smaller, bit-shuffle)."
    )
    registration_min_side: int = Field(
        128,
        ge=32,
        description="Pyramids ingested for registration go down to this longest side (px), so "
        "that coarse working levels exist even for small images.",
    )


class TissueConfig(_Section):
    """Tissue mask and stain-independent intensity image at low resolution."""

    max_side: int = Field(1024, ge=128, description="Longest side (px) of the mask image.")
    min_area_fraction: float = Field(
        0.0005,
        ge=0,
        lt=1,
        description="Connected tissue pieces smaller than this share are dropped.",
    )
    min_tissue_fraction: float = Field(
        0.001, ge=0, lt=1, description="Below this tissue share an image counts as blank."
    )


class RigidConfig(_Section):
    """Coarse alignment at a low-resolution level."""

    max_side: int = Field(1024, ge=256, le=4096, description="Working level longest side (px).")
    model: Literal["similarity", "affine"] = "affine"
    detector: Literal["sift", "orb"] = "sift"
    n_features: int = Field(5000, ge=100)
    ratio: float = Field(0.8, gt=0, lt=1, description="Lowe's ratio test threshold.")
    ransac_px: float = Field(
        0.01,
        gt=0,
        lt=0.2,
        description="RANSAC inlier threshold as a fraction of the image diagonal.",
    )
    rotation_step_deg: float = Field(
        15.0, gt=0, le=90, description="Step of the rotation search used when features fail."
    )
    try_flip: bool = Field(True, description="Also test a horizontally mirrored source.")
    min_inliers: int = Field(12, ge=4)
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(2.0, gt=0)
    max_shear: float = Field(0.15, ge=0, description="Largest accepted |shear| of an affine.")
    refine: Literal["ecc", "none"] = Field("ecc", description="Intensity-based refinement.")

    @model_validator(mode="after")
    def _scale_order(self) -> RigidConfig:
        if self.scale_min >= self.scale_max:
            raise ValueError("scale_min must be smaller than scale_max")
        return self


class NonrigidConfig(_Section):
    """Tile-wise non-rigid registration, coarse to fine."""

    max_side: int = Field(
        4096,
        ge=64,
        description="Finest working level: the finest pyramid level whose longest side is at "
        "most this (px).",
    )
    levels: int = Field(
        2, ge=1, le=6, description="Working levels, coarse to fine, each 2x finer than the last."
    )
    tile: int = Field(512, ge=64, le=4096, description="Tile side (px) at the working level.")
    overlap: int = Field(128, ge=0, description="Overlap (px) between neighbouring tiles.")
    margin: int = Field(32, ge=0, description="Extra source crop margin (px) around a tile.")
    method: Literal["dis+variational", "dis", "variational", "farneback"] = Field(
        "dis+variational",
        description="Tile flow: the mean of DIS and a coarse-to-fine variational flow, or one "
        "of them, or Farneback (see wsireg_flow.nonrigid.estimate_flow).",
    )
    min_tile_tissue: float = Field(
        0.05, ge=0, le=1, description="Tiles with less tissue are skipped."
    )
    min_confidence: float = Field(
        0.2, ge=0, le=1, description="Tiles below this keep the coarse map."
    )
    min_stain: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="In the stitching weight, tissue-mask pixels whose normalised intensity "
        "(0 = the tissue's 1st OD percentile, 1 = its 99th) is below this count as empty "
        "(glass, lumen, alveolar space) and keep only the off-tissue weight.",
    )
    max_displacement_frac: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Largest residual displacement as a fraction of the tile side.",
    )
    smooth_sigma: float = Field(
        5.0, ge=0, description="Gaussian sigma (px, working level) applied to the stitched field."
    )

    @model_validator(mode="after")
    def _overlap_fits(self) -> NonrigidConfig:
        if self.overlap * 2 >= self.tile:
            raise ValueError("overlap must be less than half the tile size")
        return self


class DaskConfig(_Section):
    """Where tile work runs."""

    scheduler: str = Field(
        default_factory=_default_scheduler,
        description="'local' (a LocalCluster sized to the machine), 'threads', 'sync' or a "
        f"scheduler address; when unset, ${SCHEDULER_ENV} or 'local'.",
    )
    n_workers: int | None = Field(None, ge=1, description="LocalCluster workers (None: cores).")

    @field_validator("scheduler")
    @classmethod
    def _scheduler_known(cls, value: str) -> str:
        if not is_scheduler(value):
            raise ValueError(SCHEDULER_HELP.format(value=value))
        return value

    memory_limit: str = Field(
        "auto",
        description="Per-worker memory limit of a LocalCluster ('auto': the machine's memory "
        "divided among the workers; a share such as '0.5'; '0': none; or a size such as '4GB').",
    )

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit_bytes(cls, value: str) -> str:
        """As Dask reads it: 'auto', a share of the machine's memory (0 < f <= 1), 0 for no
        limit, or a size with its unit; a bare number above 1 would be bytes (a forgotten
        unit), refused."""
        from dask.utils import parse_bytes

        if value == "auto":
            return value
        try:
            share = float(value)
        except ValueError:
            share = None
        if share is not None:
            if 0 <= share <= 1:
                return value
            raise ValueError("must be 'auto', a share of memory in (0, 1], 0 or a size with a unit")
        try:
            size = parse_bytes(value)
        except (ValueError, TypeError):
            size = 0
        if size < 2**27:
            raise ValueError("must be 'auto', a share of memory or a size of at least 128MiB")
        return value


class Config(_Section):
    """All settings of a run."""

    io: IOConfig = Field(default_factory=IOConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    rigid: RigidConfig = Field(default_factory=RigidConfig)
    nonrigid: NonrigidConfig = Field(default_factory=NonrigidConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)


def _closest_key(loc: tuple[Any, ...]) -> str | None:
    """The known key closest to the unknown last key of ``loc`` (a typo), among the keys of
    the section it is in; None when none is close."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return close[0] if close else None


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            close = _closest_key(tuple(err["loc"]))
            hint = f" (did you mean {close!r}?)" if close else ""
            parts.append(f"unknown key {key!r}{hint}")  # repr: one line whatever the key
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = err["msg"].removeprefix("Value error, ")  # pydantic's wrapping of ValueError
            parts.append(f"{key!r}: {msg}{shown}")
    return "; ".join(parts)


def config_from_dict(data: dict[str, Any], source: str | os.PathLike[str] | None = None) -> Config:
    """Validate a nested dict into a :class:`Config` (unknown keys refused)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_format_errors(exc)}", source) from None


def _refuse_duplicate_keys(node: yaml.Node, loader: yaml.SafeLoader, seen_nodes: set[int]) -> None:
    """Raise ``yaml.YAMLError`` when a mapping under ``node`` gives a key twice (PyYAML keeps
    the last and drops the first without a word: a second ``nonrigid:`` block silently undid
    the first). Keys are compared as ``loader`` reads them (``yes`` and ``true``, ``1`` and
    ``1.0`` are one); merge keys (``<<: *anchor``) may still be overridden."""
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[Any] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                as_read = loader.construct_object(key)
                if as_read in keys:
                    raise yaml.YAMLError(
                        f"key {key.value!r} is given twice (line {key.start_mark.line + 1})"
                    )
                keys.add(as_read)
            _refuse_duplicate_keys(value, loader, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, loader, seen_nodes)


def load_yaml(text: str) -> Any:
    """Parse YAML with the safe loader, refusing duplicate keys (raises ``yaml.YAMLError``).

    One parse, as ``yaml.safe_load`` does it, with the node tree checked before the document
    is constructed from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, loader, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load a YAML config (safe loader); ``None`` gives the defaults.

    Raises
    ------
    ConfigError
        Missing or unreadable file, YAML syntax error, non-mapping document, unknown key or bad
        value; the message names the file and the dotted key.
    """
    if path is None:
        return Config()
    p = Path(path)
    if p.is_dir():
        raise ConfigError("is a directory, not a config file", p)
    if not p.is_file():
        raise ConfigError("config file not found", p)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"not valid YAML ({first})", p) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}", p)
    return config_from_dict(data, p)


def config_to_yaml(config: Config) -> str:
    """The config as YAML text (every key, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
