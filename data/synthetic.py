"""Built-in synthetic VOC-format demo set: occluding objects of 20 classes with true depth.

Three families: colour (each class its own hue and shape), depth-cue (objects camouflaged as
the ground behind them) and bands (class = a silhouette group x the depth band the object stands in: depth tells
the class, the image only through perspective). Besides train and val, `num_extra` depth-only scenes (image and
pseudo depth, no labels, split `extra`) stand in for unlabelled photos."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.voc import IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE

NUM_CLASSES = len(VOC_CLASSES)

# Bump when the scene generator changes: an older set is regenerated (prepare_root) or refused (make_synthetic).
GENERATOR_VERSION = 2
JPEG_QUALITY = 95
MIN_SIZE = 16  # smaller images leave objects only a boundary band wide
SPLITS = ("train", "val")
EXTRA_SPLIT = "extra"  # depth-only scenes (no SegmentationClass / SegmentationObject), per-image seed index 2
DEFAULTS = {"num_train": 1000, "num_val": 200, "size": 96}  # the demo set: trains to fg_mIoU > 0.6 in minutes
DEPTH_MAX_CODE = 65535  # 16-bit code of the nearest pixel (inverse depth 1)

# Class appearance is fixed across seeds so that "class 7" looks alike in every set. Each class has its own hue
# (18 degrees apart, saturated) and its own shape: the colour family is a demo a model learns in minutes from
# scratch. Backgrounds are nearly grey. With --depth-cue an object instead takes the look of what is behind it.
SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring")
ASPECTS = (1.0, 0.6, 1.7, 0.4)  # width / height; 5 shapes x 4 aspects = 20 classes
CLASS_HUES = np.arange(NUM_CLASSES - 1) / (NUM_CLASSES - 1)  # (20,) hue of class k + 1, a turn apart / 20
CLASS_SATURATION, CLASS_VALUE = 0.75, 0.8
HUE_JITTER = 0.008  # std in turns (~3 degrees); the class hues are 0.05 apart
SAT_JITTER, VALUE_JITTER = 0.08, 0.08  # std of the per-object saturation and value
BG_SATURATION = (0.0, 0.2)  # backgrounds stay nearly grey, so saturated objects stand out
BG_VALUE = (0.3, 0.85)
ROTATION_MAX_DEG = 25.0  # small, so the aspect ratio stays a class cue
RING_INNER = 0.55  # inner / outer radius of the ring shape
STAR_INNER = 0.5  # inner / outer radius of the star shape
ELLIPSE_VERTICES = 48
RECT_HALF = 0.85  # half side of the unit rectangle: its area is close to the unit ellipse's

# Metric depth (arbitrary units): objects always lie in front of the background.
MIN_OBJECTS, MAX_OBJECTS = 2, 6
OBJECT_DEPTHS = np.geomspace(2.0, 7.0, 12)  # depth slots, ~12% apart, so objects never touch in depth
DEPTH_JITTER = 0.03  # relative jitter within a slot, below half the slot spacing
MAX_SLOPE = 0.04  # relative depth change per image width: near-fronto-parallel objects
BG_NEAR, BG_FAR = 10.0, 40.0  # background depth at the bottom and the top row
BG_CURVE = 1.5  # >1: depth grows slowly near the bottom and fast towards the top
BG_TILT = 0.05  # relative left-right depth tilt of the background
BG_STRIPE_PERIOD = (1.0, 4.0)  # ground stripe spacing in depth units
OBJECT_SCALE = 0.6  # apparent radius = OBJECT_SCALE * size / depth (perspective)
SIZE_JITTER = (0.75, 1.3)  # per-object size factor: apparent size is a depth cue, not an oracle
CENTRE_MARGIN = 0.1  # object centres keep this fraction of the image from the border
GROUND_TOP, GROUND_SPAN, GROUND_JITTER = 0.35, 0.5, 0.12  # centre row (fraction): far objects high, near low

# Nuisance: strong enough that a model must look at more than one pixel, weak enough to learn in minutes.
TEXTURE_AMP = (0.0, 12.0)  # stripe amplitude range (grey levels)
TEXTURE_PERIOD = 0.6  # stripe period = TEXTURE_PERIOD * apparent radius
SHADE_AMP = 0.15  # relative brightness change across an object (lighting direction)
NOISE_CELLS = 6  # coarse grid of the smooth blotch / light fields
BG_BLOTCH_AMP = 12.0  # grey levels of the smooth background colour blotches
LIGHT_GAIN = (0.85, 1.15)  # global brightness per image
LIGHT_FIELD_AMP = 0.06  # relative smooth illumination change across the image
PIXEL_NOISE = 3.0  # std of i.i.d. sensor noise (grey levels)
# --depth-cue S: the ground's stripes have this amplitude (grey levels) and each object's look is blended the
# fraction S towards the ground's, striped as the ground would be at the object's depth: the depth step (seen as a
# break in the stripes) outlines it where its colour no longer does.
CUE_STRIPE_AMP = 30.0
CUE_TESTBED = 0.7  # --depth-cue alone: still learnable from scratch in minutes (fg_mIoU 0.27 after 300 steps at 96 px),
# where 1 (full camouflage: shape and the stripe break alone) gave 0.01
# --bands: the positive control of the depth-first question. Class k + 1 = silhouette group k // 4 (a shape and a hue
# of its own: BAND_GROUP_SHAPES, 72 degrees apart) x depth band k % 4 (BAND_DEPTHS, each +-BAND_JITTER, apart by more
# than that): the four classes of a group look alike but for what depth tells. The depth map shows the band plainly;
# the image only through perspective: apparent size (blurred by SIZE_JITTER, which spans more than a band's step),
# height on the ground, and stripes of a fixed world period (BAND_TEXTURE_PERIOD depth units), finer the farther.
BAND_GROUP_SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring")
BAND_DEPTHS = np.geomspace(2.2, 8.0, 4)  # band centres, 1.54x apart
BAND_JITTER = 0.08  # relative spread of depths within a band
BAND_TEXTURE_PERIOD = 0.45  # stripe period x image size / depth = pixels: 13 px (nearest) .. 3.6 px (farthest) at 64 px
BAND_TEXTURE_AMP = 18.0  # grey levels
# The ground reaches nearer than every object (its bottom row), so that the per-image normalisation of the stored
# inverse depth (its nearest pixel = 1) is the same in every scene and a band is a range of stored values
# (about 0.67, 0.42, 0.26, 0.16 for the four centres), as a metric depth would be, not relative to the nearest object.
BAND_GROUND_NEAR = 1.5


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (each in 0..1, hue in turns) to RGB in 0..255, shape (..., 3)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6 * np.asarray(h)[..., None]) % 6
    rgb = np.asarray(v)[..., None] * (1 - np.asarray(s)[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return 255.0 * rgb


def _smooth_field(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """Return a (size, size, channels) smooth random field in [-1, 1] by bilinear upsampling."""
    pos = np.linspace(0, NOISE_CELLS - 1, size)
    lo = np.minimum(pos.astype(int), NOISE_CELLS - 2)
    frac = pos - lo
    interp = np.zeros((size, NOISE_CELLS))
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    grid = rng.uniform(-1, 1, (NOISE_CELLS, NOISE_CELLS, channels))
    return (interp @ grid.transpose(2, 0, 1) @ interp.T).transpose(1, 2, 0)


def _outline(shape: str, radius: float, aspect: float, angle: float, cx: float, cy: float) -> list[list[tuple]]:
    """Return the polygons of a shape (a second polygon is a hole to cut out)."""
    if shape == "ellipse" or shape == "ring":
        t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
        unit = [np.stack([np.cos(t), np.sin(t)], 1)]
        if shape == "ring":
            unit.append(unit[0] * RING_INNER)
    elif shape == "rectangle":
        unit = [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * RECT_HALF]
    elif shape == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        unit = [np.stack([np.cos(t), -np.sin(t)], 1)]
    else:  # star: 5 spikes alternating outer / inner radius
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        unit = [np.stack([r * np.cos(t), -r * np.sin(t)], 1)]
    scale = np.array([radius * np.sqrt(aspect), radius / np.sqrt(aspect)])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [[tuple(p) for p in (u * scale) @ rot.T + (cx, cy)] for u in unit]


def _object_mask(shape: str, radius: float, aspect: float, angle: float, cx: float, cy: float, size: int) -> np.ndarray:
    """Rasterise one object into a boolean (size, size) mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    polys = _outline(shape, radius, aspect, angle, cx, cy)
    draw.polygon(polys[0], fill=1)
    for hole in polys[1:]:
        draw.polygon(hole, fill=0)
    return np.asarray(canvas, dtype=bool)


def _boundary_band(instances: np.ndarray) -> np.ndarray:
    """Return a 2 px band (1 px each side) along every instance / background edge, as VOC has."""
    band = np.zeros(instances.shape, dtype=bool)
    dx = instances[:, 1:] != instances[:, :-1]
    dy = instances[1:, :] != instances[:-1, :]
    band[:, 1:] |= dx
    band[:, :-1] |= dx
    band[1:, :] |= dy
    band[:-1, :] |= dy
    return band


def _background(rng: np.random.Generator, size: int, depth_cue: float, near: float = BG_NEAR) -> dict[str, np.ndarray]:
    """Return the background scene: image (H, W, 3), metric depth (H, W) from `near` at the bottom row, and its look
    (for camouflage)."""
    rows = np.linspace(0, 1, size)[:, None]  # 0 = top
    cols = np.linspace(-0.5, 0.5, size)[None, :]
    depth = near * (BG_FAR / near) ** ((1 - rows) ** BG_CURVE)
    depth = depth * (1 + rng.uniform(-BG_TILT, BG_TILT) * cols)
    top, bottom = _hsv_to_rgb(rng.uniform(0, 1, 2), rng.uniform(*BG_SATURATION, 2), rng.uniform(*BG_VALUE, 2))
    base = top + (bottom - top) * rows[..., None] + BG_BLOTCH_AMP * _smooth_field(rng, size, 3)
    # Ground stripes fixed in world distance shrink with depth: a perspective cue.
    period, phase, amp = rng.uniform(*BG_STRIPE_PERIOD), rng.uniform(0, 2 * np.pi), rng.uniform(*TEXTURE_AMP)
    look = {"base": base, "period": period, "phase": phase, "amp": CUE_STRIPE_AMP if depth_cue > 0 else amp}
    image = base + look["amp"] * _stripes(depth, look)[..., None]
    return {"image": image, "depth": depth, "look": look}


def _stripes(depth: np.ndarray, look: dict) -> np.ndarray:
    """The ground's stripe pattern at the given metric depths, in [-1, 1]."""
    return np.sin(2 * np.pi * depth / look["period"] + look["phase"])


def _place(rng: np.random.Generator, size: int, slot: int) -> tuple[float, float, float, float, float]:
    """Draw an object's base depth in its slot, apparent radius, centre and rotation: (z, radius, cx, cy, angle)."""
    z = OBJECT_DEPTHS[slot] * (1 + rng.uniform(-DEPTH_JITTER, DEPTH_JITTER))
    near = 1 - slot / (len(OBJECT_DEPTHS) - 1)  # 1 = nearest slot
    radius = OBJECT_SCALE * size / z * rng.uniform(*SIZE_JITTER)
    cx = rng.uniform(CENTRE_MARGIN, 1 - CENTRE_MARGIN) * size
    # Nearer objects stand lower in the frame, as on a ground plane.
    cy = np.clip(GROUND_TOP + GROUND_SPAN * near + rng.normal(0, GROUND_JITTER), CENTRE_MARGIN, 1 - CENTRE_MARGIN)
    return z, radius, cx, cy * size, np.deg2rad(rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG))


def _paint_object(rng: np.random.Generator, scene: dict, k: int, cls: int, slot: int, light: np.ndarray,
                  depth_cue: float) -> None:
    """Paint instance k of class cls (shape, depth slot, texture) over whatever is already in scene."""
    size = scene["label"].shape[0]
    z, radius, cx, cy, angle = _place(rng, size, slot)
    shape, aspect = SHAPES[(cls - 1) % len(SHAPES)], ASPECTS[(cls - 1) // len(SHAPES)]
    ys, xs = np.nonzero(_object_mask(shape, radius, aspect, angle, cx, cy, size))
    dx, dy = (xs - cx) / size, (ys - cy) / size
    slope = rng.uniform(-MAX_SLOPE, MAX_SLOPE, 2)
    depth = z * (1 + slope[0] * dx + slope[1] * dy)
    scene["depth"][ys, xs] = depth
    # Every draw happens in both families, so one seed gives the same geometry, classes and depth in each.
    hsv = (CLASS_HUES[cls - 1] + rng.normal(0, HUE_JITTER), CLASS_SATURATION + rng.normal(0, SAT_JITTER),
           CLASS_VALUE + rng.normal(0, VALUE_JITTER))
    colour = _hsv_to_rgb(*(np.clip(c, 0, 1) if i else c for i, c in enumerate(hsv)))
    theta, phase, amp = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(*TEXTURE_AMP)
    stripes = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / (TEXTURE_PERIOD * radius) + phase)
    pixels = colour + amp * stripes[:, None]
    shade = 1 + SHADE_AMP * np.clip((dx * light[0] + dy * light[1]) * size / radius, -1, 1)
    if depth_cue > 0:  # blend towards the look of the ground behind it, wearing its stripes at the object's depth
        look = scene["look"]
        ground = look["base"][ys, xs] + look["amp"] * _stripes(depth, look)[:, None]
        pixels = (1 - depth_cue) * pixels + depth_cue * ground
    scene["image"][ys, xs] = pixels * shade[:, None]
    scene["label"][ys, xs] = cls
    scene["instances"][ys, xs] = k


def _paint_banded(rng: np.random.Generator, scene: dict, k: int, cls: int, z: float, light: np.ndarray) -> None:
    """The bands family's object of class cls at depth z: its group's shape and hue, stripes of a world period."""
    size = scene["label"].shape[0]
    group = (cls - 1) // len(BAND_DEPTHS)
    radius = OBJECT_SCALE * size / z * rng.uniform(*SIZE_JITTER)
    near = np.log(BAND_DEPTHS[-1] / z) / np.log(BAND_DEPTHS[-1] / BAND_DEPTHS[0])  # 1 = nearest band's centre
    cx = rng.uniform(CENTRE_MARGIN, 1 - CENTRE_MARGIN) * size
    cy = np.clip(GROUND_TOP + GROUND_SPAN * near + rng.normal(0, GROUND_JITTER), CENTRE_MARGIN, 1 - CENTRE_MARGIN) * size
    angle = np.deg2rad(rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG))
    ys, xs = np.nonzero(_object_mask(BAND_GROUP_SHAPES[group], radius, 1.0, angle, cx, cy, size))
    scene["depth"][ys, xs] = z
    hsv = (group / len(BAND_GROUP_SHAPES) + rng.normal(0, HUE_JITTER), CLASS_SATURATION + rng.normal(0, SAT_JITTER),
           CLASS_VALUE + rng.normal(0, VALUE_JITTER))
    colour = _hsv_to_rgb(*(np.clip(c, 0, 1) if i else c for i, c in enumerate(hsv)))
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    period = BAND_TEXTURE_PERIOD * size / z  # pixels: a fixed period in the world looks finer the farther it is
    stripes = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase)
    dx, dy = (xs - cx) / size, (ys - cy) / size
    shade = 1 + SHADE_AMP * np.clip((dx * light[0] + dy * light[1]) * size / radius, -1, 1)
    scene["image"][ys, xs] = (colour + BAND_TEXTURE_AMP * stripes[:, None]) * shade[:, None]
    scene["label"][ys, xs] = cls
    scene["instances"][ys, xs] = k


def _render_scene(rng: np.random.Generator, size: int, depth_cue: float = 0.0, bands: bool = False) -> dict[str, np.ndarray]:
    """Paint one scene far to near; return uint8 image, label, instances (with 255 band) and depth."""
    scene = _background(rng, size, depth_cue, BAND_GROUND_NEAR if bands else BG_NEAR)
    scene.update(label=np.zeros((size, size), np.uint8), instances=np.zeros((size, size), np.uint8))
    num = rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)
    if bands:  # the class sets the depth: drawn first, each object at a depth in its class's band
        classes = rng.integers(1, NUM_CLASSES, num)
        depths = BAND_DEPTHS[(classes - 1) % len(BAND_DEPTHS)] * (1 + rng.uniform(-BAND_JITTER, BAND_JITTER, num))
    else:
        slots = np.sort(rng.choice(len(OBJECT_DEPTHS), num, replace=False))[::-1]
    light = rng.normal(size=2)
    light /= np.linalg.norm(light)
    if bands:
        for k, i in enumerate(np.argsort(-depths), start=1):  # far to near: nearer objects occlude
            _paint_banded(rng, scene, k, int(classes[i]), float(depths[i]), light)
    else:
        for k, slot in enumerate(slots, start=1):
            _paint_object(rng, scene, k, int(rng.integers(1, NUM_CLASSES)), slot, light, depth_cue)
    del scene["look"]
    image = scene["image"] * rng.uniform(*LIGHT_GAIN) * (1 + LIGHT_FIELD_AMP * _smooth_field(rng, size, 1))
    scene["image"] = np.clip(image + rng.normal(0, PIXEL_NOISE, image.shape), 0, 255).round().astype(np.uint8)
    band = _boundary_band(scene["instances"])
    scene["label"][band] = IGNORE_INDEX
    # Renumber the instances that stayed visible to 1..K, keeping painting order.
    visible = np.unique(scene["instances"][~band & (scene["instances"] > 0)])
    lut = np.zeros(256, np.uint8)
    lut[visible] = np.arange(1, len(visible) + 1)
    scene["instances"] = lut[scene["instances"]]
    scene["instances"][band] = IGNORE_INDEX
    return scene


def depth_to_code(depth: np.ndarray) -> np.ndarray:
    """Convert metric depth to the stored convention: min-max normalised inverse depth in 0..65535."""
    inv = 1.0 / depth
    inv = (inv - inv.min()) / max(inv.max() - inv.min(), np.finfo(float).tiny)
    return np.round(inv * DEPTH_MAX_CODE).astype(np.uint16)


def _save_palette(array: np.ndarray, path: Path) -> None:
    """Save a uint8 index map as a palette PNG with the VOC colormap."""
    image = Image.fromarray(array)
    image.putpalette(VOC_PALETTE)
    image.save(path)


def _write_set(root: Path, params: dict) -> None:
    """Generate every image of both splits (and the depth-only extra scenes) into root."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "PseudoDepth", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    lists = {}
    for split_index, split in enumerate((*SPLITS, EXTRA_SPLIT)):  # extra: index 2, after train and val
        ids = [f"syn_{split}_{i:05d}" for i in range(params.get(f"num_{split}", 0))]
        for i, name in enumerate(ids):
            # Per-image seed: each image is independent of the split sizes.
            rng = np.random.default_rng([params["seed"], split_index, i])
            scene = _render_scene(rng, params["size"], params["depth_cue"], params.get("bands", False))
            Image.fromarray(scene["image"]).save(root / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
            if split != EXTRA_SPLIT:  # extra scenes are unlabelled photos: image and pseudo depth only
                _save_palette(scene["label"], root / "SegmentationClass" / f"{name}.png")
                _save_palette(scene["instances"], root / "SegmentationObject" / f"{name}.png")
            Image.fromarray(depth_to_code(scene["depth"])).save(root / "PseudoDepth" / f"{name}.png")
        lists[split] = ids
    extra = lists.pop(EXTRA_SPLIT)
    lists["trainval"] = lists["train"] + lists["val"]
    if extra:  # listed last and only when there are any: a set without extras is as before
        lists[EXTRA_SPLIT] = extra
    for split, ids in lists.items():
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    meta = {"model": "synthetic-ground-truth", "native_output": "metric_depth",
            "conversion": "inverse, per-image min-max to 0..65535", "count": len(lists["trainval"]) + len(extra),
            "dtype": "uint16", "nearest": DEPTH_MAX_CODE, "generator": "data/synthetic.py"}
    (root / "PseudoDepth" / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # Written last: its presence marks a complete set.
    (root / "SYNTHETIC.json").write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def regenerate_if_old(out: str | Path) -> bool:
    """Regenerate a synthetic set of an older generator version with its own parameters; True if it did."""
    existing = _read_params(Path(out))
    if existing is None or existing.get("version") == GENERATOR_VERSION:
        return False
    params = {k: existing[k] for k in ("num_train", "num_val", "num_extra", "size", "seed", "bands") if k in existing}
    make_synthetic(out, **params, depth_cue=existing.get("depth_cue", 0.0), overwrite=True)
    return True


def _read_params(out: Path) -> dict | None:
    """Return the generator params of an existing set, or None if out holds none."""
    try:
        return json.loads((out / "SYNTHETIC.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def make_synthetic(out: str | Path, num_train: int = DEFAULTS["num_train"], num_val: int = DEFAULTS["num_val"],
                   size: int = DEFAULTS["size"], seed: int = 0, depth_cue: float = 0.0, overwrite: bool = False,
                   num_extra: int = 0, bands: bool = False) -> Path:
    """Generate the synthetic VOC-format set at out (atomically); a no-op if it already matches.
    num_extra: depth-only scenes (split `extra`); bands: the bands family (class = silhouette group x depth band)."""
    out = Path(out)
    params = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed, "depth_cue": depth_cue,
              "version": GENERATOR_VERSION}
    # Keys only when not at their default: a set made before they existed keeps matching its SYNTHETIC.json.
    params.update({k: v for k, v in (("num_extra", num_extra), ("bands", bool(bands))) if v})
    if num_train < 1 or num_val < 1 or num_extra < 0 or size < MIN_SIZE or not 0.0 <= depth_cue <= 1.0:
        raise ValueError(f"need num_train >= 1, num_val >= 1, num_extra >= 0, size >= {MIN_SIZE} and depth_cue in "
                         f"0..1, got {params}")
    if depth_cue and bands:
        raise ValueError(f"depth_cue ({depth_cue}) and bands are two families; choose one")
    existing = _read_params(out)
    if existing == params:
        return out
    if out.exists():
        if existing is None and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a synthetic set (no SYNTHETIC.json); refusing to touch it")
        if existing is not None and not overwrite:
            old = existing.get("version")
            why = (f"was made by generator version {old}, this code makes version {GENERATOR_VERSION}"
                   if old != GENERATOR_VERSION else f"was made with {existing}, not {params}")
            raise ValueError(f"{out} holds a synthetic set that {why}; pass overwrite=True (--overwrite) "
                             "or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_set(tmp, params)
        if _read_params(out) == params:  # another process (e.g. another rank) finished it meanwhile
            return out
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process moved its copy into place between our check and the rename.
            if _read_params(out) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
