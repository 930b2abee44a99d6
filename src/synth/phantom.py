"""Head-CT phantom in HU (pure numpy): anatomy, normal hyperdense mimics and 3D hemorrhages per study."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from src.constants import SUBTYPES

# Head-local frame in mm: x = patient left, y = posterior, z = superior; origin near the head centre.
EPIDURAL, INTRAPARENCHYMAL, INTRAVENTRICULAR, SUBARACHNOID, SUBDURAL = range(len(SUBTYPES))
# Share of lesions by subtype (index as above): close to the real mix, epidural rare.
SUBTYPE_WEIGHTS = np.array([0.06, 0.26, 0.14, 0.26, 0.28])


@dataclass
class Lesion:
    """One bleed; `kind` indexes SUBTYPES, `hu` is its density (38-55 HU = subacute, nearly isodense)."""

    kind: int
    hu: float
    small: bool
    direction: np.ndarray = field(default_factory=lambda: np.zeros(3))
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    thickness: float = 0.0  # mm, epidural/subdural maximum thickness; intraparenchymal radius
    extent: float = 0.0  # rad, angular half-width on the skull (epidural/subdural/subarachnoid)
    z_range: tuple[float, float] = (-1e9, 1e9)  # mm, clips spread along z (subarachnoid / intraventricular)
    level: float = 0.0  # intraventricular: fluid level (y); subarachnoid: 1 = basal cisterns
    oedema: float = 0.0  # mm, hypodense rim of an intraparenchymal bleed
    shape: np.ndarray = field(default_factory=lambda: np.zeros(6))  # irregularity phases


@dataclass
class Anatomy:
    """Per-study anatomy: head size and shape, tissue densities, ventricles and the normal dense structures."""

    axes: np.ndarray  # outer (scalp) semi-axes in mm
    lobes: np.ndarray  # head-shape modulation amplitudes and phases
    scalp: float
    skull: float
    offset: float  # scanner calibration drift, HU, added to every soft tissue
    grey: float
    white: float
    csf: float
    bone: float
    sulcus_count: int  # sulci around the head
    sulcus_width: float  # mm; wider with atrophy
    sulcus_depth: float  # mm
    waves: np.ndarray  # [k, 4]: sulcal pattern plane waves (kx, ky, kz, phase)
    ventricle_scale: float
    falx_hu: float
    falx_width: float
    sinus_hu: float
    tent_apex: float
    choroid_hu: float
    choroid_calc: float  # 0 = not calcified, else HU of the calcified core
    vessels: np.ndarray  # [n, 7]: segment start xyz, end xyz, radius
    vessel_hu: float
    calcs: np.ndarray  # [n, 5]: centre xyz, radius, HU
    lesions: list[Lesion]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def sample_anatomy(rng: np.random.Generator, n_lesions: int) -> Anatomy:
    """Draw one head; `n_lesions` bleeds (0 = negative study). Negatives carry more calcification mimics."""
    axes = np.array([rng.uniform(66, 80), rng.uniform(84, 100), rng.uniform(70, 84)])
    calcs = []
    p_calc = 0.35 if n_lesions == 0 else 0.2
    if rng.random() < p_calc:  # basal ganglia, bilateral
        r, hu = rng.uniform(1.5, 3.5), rng.uniform(100, 300)
        calcs += [[s * rng.uniform(15, 20), rng.uniform(-6, 2), rng.uniform(-4, 4), r, hu] for s in (-1, 1)]
    if rng.random() < 0.5:  # pineal
        calcs.append([0, rng.uniform(10, 16), rng.uniform(-2, 4), rng.uniform(1.5, 3.5), rng.uniform(120, 400)])
    for _ in range(rng.poisson(0.6 if n_lesions == 0 else 0.25)):  # dystrophic
        calcs.append([*(rng.uniform(-0.55, 0.55, 3) * axes), rng.uniform(1.0, 3.0), rng.uniform(100, 400)])
    vessels = []
    for _ in range(rng.integers(2, 12)):
        a = np.array([rng.uniform(-35, 35), rng.uniform(-25, 15), rng.uniform(-30, 0)])
        b = a + rng.normal(0, 14, 3) * np.array([1.0, 1.0, 0.4])
        vessels.append([*a, *b, rng.uniform(0.7, 1.6)])
    k = rng.normal(0, 1, (7, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(0.35, 0.6, (7, 1))
    anatomy = Anatomy(
        axes=axes,
        lobes=np.array([rng.uniform(0, 0.05), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.03), rng.uniform(0, 6.3)]),
        scalp=rng.uniform(3.5, 7.0),
        skull=rng.uniform(5.0, 9.0),
        offset=rng.normal(0, 3.0),
        grey=rng.uniform(32, 40),
        white=rng.uniform(21, 29),
        csf=rng.uniform(2, 12),
        bone=rng.uniform(900, 1500),
        sulcus_count=int(rng.integers(16, 26)),
        sulcus_width=rng.uniform(1.2, 4.0),
        sulcus_depth=rng.uniform(6.0, 14.0),
        waves=np.concatenate([k, rng.uniform(0, 2 * np.pi, (7, 1))], axis=1),
        ventricle_scale=rng.uniform(0.7, 1.6),
        falx_hu=rng.uniform(42, 80),
        falx_width=rng.uniform(1.0, 3.2),
        sinus_hu=rng.uniform(45, 75),
        tent_apex=rng.uniform(-14, -4),
        choroid_hu=rng.uniform(40, 62),
        choroid_calc=rng.uniform(90, 300) if rng.random() < 0.45 else 0.0,
        vessels=np.array(vessels),
        vessel_hu=rng.uniform(45, 72),
        calcs=np.array(calcs).reshape(-1, 5),
        lesions=[],
    )
    kinds = rng.choice(len(SUBTYPES), size=n_lesions, p=SUBTYPE_WEIGHTS)
    anatomy.lesions = [_sample_lesion(rng, int(kind), axes) for kind in kinds]
    return anatomy


def _sample_lesion(rng: np.random.Generator, kind: int, axes: np.ndarray) -> Lesion:
    small = rng.random() < 0.35
    subacute = rng.random() < 0.25
    hu = rng.uniform(38, 55) if subacute else rng.uniform(52, 88)
    if kind == SUBARACHNOID and not subacute:
        hu = rng.uniform(45, 75)  # mixed with CSF
    les = Lesion(kind=kind, hu=hu, small=small, shape=rng.uniform(0, 2 * np.pi, 6))
    side = rng.choice([-1.0, 1.0])
    les.direction = _unit(np.array([side * rng.uniform(0.5, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.2, 0.75)]))
    if kind == EPIDURAL:
        les.thickness = rng.uniform(3, 6) if small else rng.uniform(8, 22)
        les.extent = rng.uniform(0.08, 0.16) if small else rng.uniform(0.22, 0.45)
    elif kind == SUBDURAL:
        les.thickness = rng.uniform(1.5, 3.5) if small else rng.uniform(4, 12)
        les.extent = rng.uniform(0.18, 0.35) if small else rng.uniform(0.5, 1.1)
    elif kind == SUBARACHNOID:
        les.level = float(rng.random() < 0.3)
        les.extent = rng.uniform(0.15, 0.3) if small else rng.uniform(0.35, 0.9)
        zc = les.direction[2] * axes[2]
        half = rng.uniform(4, 10) if small else rng.uniform(15, 45)
        cisterns = (-34.0, -34.0 + (10 if small else rng.uniform(14, 30)))  # basal cisterns, low in the head
        les.z_range = cisterns if les.level else (zc - half, zc + half)
    elif kind == INTRAVENTRICULAR:
        les.level = rng.uniform(10, 25) if small else rng.uniform(-10, 15)  # y above which the ventricle fills
        les.centre = np.array([side, 0.0, 0.0])
        les.z_range = (-40.0, rng.uniform(0, 10) if small else 40.0)
        if rng.random() < 0.5:
            les.centre[0] = 0.0  # both sides
    else:
        les.thickness = rng.uniform(2.5, 5) if small else rng.uniform(7, 24)
        deep = rng.random() < 0.45  # hypertensive: basal ganglia / thalamus; else lobar
        if deep:
            les.centre = np.array([side * rng.uniform(12, 26), rng.uniform(-12, 12), rng.uniform(-8, 14)])
        else:
            frac = 1.0 - (les.thickness + 18) / axes.min()
            les.centre = les.direction * axes * rng.uniform(0.3, max(0.31, frac))
        les.oedema = rng.uniform(0, 6) if not small else 0.0
    return les


def _ellipsoid_depth(q: np.ndarray, axes: np.ndarray, lobes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approximate distance (mm) inside the outer surface, and the normalised radius; q is [3, N]."""
    theta = np.arctan2(q[1], q[0])
    mod = 1.0 + lobes[0] * np.cos(2 * theta + lobes[1]) + lobes[2] * np.cos(3 * theta + lobes[3])
    n = q / axes[:, None]
    r = np.sqrt((n**2).sum(0)) / mod
    grad = np.sqrt(((q / axes[:, None] ** 2) ** 2).sum(0)) / np.maximum(r * mod, 1e-6) / mod
    return (1.0 - r) / np.maximum(grad, 1e-6), r


def _segment_distance(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((q - a[:, None]) * ab[:, None]).sum(0) / max(float(ab @ ab), 1e-6), 0, 1)
    return np.sqrt(((q - a[:, None] - t * ab[:, None]) ** 2).sum(0))


def _inside_ellipsoid(q: np.ndarray, centre, semi) -> np.ndarray:
    return (((q - np.asarray(centre, float)[:, None]) / np.asarray(semi, float)[:, None]) ** 2).sum(0) <= 1.0


def render(anat: Anatomy, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU without blood, blood subtype per point (-1 = none) and blood HU, at head-local points q [3, N] (mm)."""
    depth, _ = _ellipsoid_depth(q, anat.axes, anat.lobes)
    inside = depth >= 0
    hu = np.full(q.shape[1], -1000.0, dtype=np.float32)
    kind = np.full(q.shape[1], -1, dtype=np.int8)
    blood = np.zeros(q.shape[1], dtype=np.float32)
    # Air outside the scalp needs no further work: render the head's points only.
    hu[inside], kind[inside], blood[inside] = _render_head(anat, q[:, inside], depth[inside])
    return hu, kind, blood


def _render_head(anat: Anatomy, q: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = q
    n = q.shape[1]
    hu = np.full(n, -1000.0, dtype=np.float32)
    inner = anat.scalp + anat.skull
    head = depth >= 0
    hu[head] = np.where(depth[head] < anat.scalp * 0.45, 30.0, -90.0) + anat.offset  # skin, subcutaneous fat
    # Skull: dense outer/inner tables, softer diploe between; the skull base is thicker and denser.
    skull = (depth >= anat.scalp) & (depth < inner)
    rel = (depth - anat.scalp) / anat.skull
    diploe = np.clip(1.0 - 4.0 * np.abs(rel - 0.5), 0.0, 1.0)
    hu[skull] = (anat.bone * (1.0 - 0.45 * diploe))[skull]
    intracranial = depth >= inner
    brain_depth = depth - inner
    wave = np.zeros(n, dtype=np.float32)
    for kx, ky, kz, phase in anat.waves:
        wave += np.cos(kx * x + ky * y + kz * z + phase)
    wave /= np.sqrt(len(anat.waves) / 2.0)
    # Cortex: sulci (CSF) cut into the grey ribbon; thin CSF layer under the inner table.
    # Sulci run inward from the surface: radial in azimuth, wobbling with the smooth `wave` field.
    azimuth = np.arctan2(y, x)
    phase = (anat.sulcus_count * azimuth / (2 * np.pi) + 0.35 * wave) % 1.0
    spacing = 2 * np.pi * np.sqrt(x**2 + y**2) / anat.sulcus_count  # mm between neighbouring sulci
    cortex = intracranial & (brain_depth < anat.sulcus_depth)
    sulcus = cortex & ((np.abs(phase - 0.5) * spacing < anat.sulcus_width / 2) | (brain_depth < 0.8))
    tissue = np.where(brain_depth < 4.5, anat.grey, anat.white) + anat.offset
    hu[intracranial] = tissue[intracranial]
    deep_grey = np.zeros(n, bool)
    for s in (-1, 1):
        deep_grey |= _inside_ellipsoid(q, (s * 17, -2, 0), (7, 14, 9))  # lentiform
        deep_grey |= _inside_ellipsoid(q, (s * 9, 10, 4), (7, 9, 8))  # thalamus
    hu[intracranial & deep_grey] = anat.grey - 1.0 + anat.offset
    csf_hu = anat.csf + anat.offset
    hu[sulcus] = csf_hu
    vs = anat.ventricle_scale
    ventricles = np.zeros(n, bool)
    for s in (-1, 1):
        ventricles |= _inside_ellipsoid(q, (s * 6 * vs, -2, 14), (4.5 * vs, 30, 7 * vs))  # bodies + frontal horns
        ventricles |= _inside_ellipsoid(q, (s * 14 * vs, 26, 4), (5 * vs, 11, 9 * vs))  # trigones / occipital
    ventricles |= _inside_ellipsoid(q, (0, 4, -4), (1.2 * vs, 12, 8))  # third ventricle
    ventricles |= _inside_ellipsoid(q, (0, 34, -36), (5 * vs, 3.5, 6))  # fourth ventricle
    ventricles &= intracranial
    hu[ventricles] = csf_hu
    # Basal cisterns: CSF ring around the midbrain, low in the head.
    mid_r = np.sqrt((x / 13.0) ** 2 + ((y - 12.0) / 11.0) ** 2)
    cistern = intracranial & (z > -38) & (z < -18) & (mid_r > 1.0) & (mid_r < 1.4)
    hu[cistern] = csf_hu
    _paint_skull_base(anat, q, hu, intracranial)
    _paint_dense_normals(anat, q, hu, depth, inner, intracranial)
    sulcal = sulcus & (brain_depth >= 0.8)  # subarachnoid blood fills sulci, not only the surface film
    blood_kind, blood_hu = _paint_lesions(anat, q, hu, brain_depth, intracranial, sulcal | cistern, ventricles)
    return hu, blood_kind, blood_hu


def _paint_skull_base(anat: Anatomy, q, hu, intracranial) -> None:
    """Petrous ridges, clivus and sphenoid sinus: dense bone and air low in the head (streak sources)."""
    zb = -0.42 * anat.axes[2]
    base = np.zeros(q.shape[1], bool)
    for s in (-1, 1):
        # Petrous ridge: a bar from the lateral skull toward the clivus, running anteromedially.
        a = np.array([s * 0.85 * anat.axes[0], 0.35 * anat.axes[1], zb])
        b = np.array([s * 12.0, 0.02 * anat.axes[1], zb + 6])
        base |= _segment_distance(q, a, b) < 3.0
    base |= _inside_ellipsoid(q, (0, 0.0, zb - 4), (9, 12, 14))  # clivus / sella floor
    hu[base & intracranial] = anat.bone * 0.9
    sinus = _inside_ellipsoid(q, (0, -0.25 * anat.axes[1], zb - 6), (12, 10, 10))
    hu[sinus & intracranial] = -900.0


def _paint_dense_normals(anat: Anatomy, q, hu, depth, inner, intracranial) -> None:
    """Falx, tentorium, venous sinuses, choroid plexus, vessels, calcifications: the 45-75+ HU mimics."""
    x, y, z = q
    brain_depth = depth - inner
    falx = intracranial & (np.abs(x) < anat.falx_width / 2) & ((z > 8) | (np.abs(y) > 40 + 0.5 * np.maximum(-z, 0)))
    hu[falx] = anat.falx_hu + anat.offset
    # Tentorium: a tent sloping down from the incisura (apex) to the occipital bone; notch for the midbrain.
    surf = anat.tent_apex - 0.45 * np.maximum(y - 5.0, 0) - 0.22 * np.abs(x)
    tent = intracranial & (np.abs(z - surf) < 1.1) & (y > 5.0) & ~((np.abs(x) < 11) & (y < 28))
    hu[tent] = anat.falx_hu - 5.0 + anat.offset
    sss = intracranial & (brain_depth < 6.0) & (np.abs(x) < 4.0 - 0.5 * brain_depth) & ((z > 0) | (y > 30))
    transverse = intracranial & (brain_depth < 5.0) & (np.abs(z - surf) < 4.5) & (y > 30)
    straight = intracranial & (np.abs(x) < 2.5) & (np.abs(z - surf) < 2.5) & (y > 20)
    hu[sss | transverse | straight] = anat.sinus_hu + anat.offset
    vs = anat.ventricle_scale
    for s in (-1, 1):
        centre = (s * 14 * vs, 27, 4)
        plexus = _inside_ellipsoid(q, centre, (2.5 * vs, 5, 3.5))
        hu[plexus] = anat.choroid_hu + anat.offset
        if anat.choroid_calc:
            hu[_inside_ellipsoid(q, centre, (1.6, 2.2, 1.8))] = anat.choroid_calc
    low = intracranial & (z < 10)
    for v in anat.vessels:
        close = low & (_segment_distance(q, v[:3], v[3:6]) < v[6])
        hu[close] = anat.vessel_hu + anat.offset
    for cx, cy, cz, r, calc_hu in anat.calcs:
        hu[intracranial & _inside_ellipsoid(q, (cx, cy, cz), (r, r, r))] = calc_hu


def _paint_lesions(anat: Anatomy, q, hu, brain_depth, intracranial, csf_space, ventricles):
    """Blood subtype (-1 = none) and blood HU per point; also paints oedema rims into `hu`."""
    n = q.shape[1]
    kind = np.full(n, -1, dtype=np.int8)
    blood = np.zeros(n, dtype=np.float32)
    if not anat.lesions:
        return kind, blood
    x, y, z = q
    unit = q / anat.axes[:, None]
    unit = unit / np.maximum(np.linalg.norm(unit, axis=0), 1e-6)
    for les in anat.lesions:
        ph = les.shape
        if les.kind in (EPIDURAL, SUBDURAL, SUBARACHNOID):
            ang = np.arccos(np.clip(les.direction @ unit, -1, 1))
            wobble = 1.0 + 0.15 * np.sin(3 * np.arctan2(unit[1], unit[0]) + ph[0]) * np.sin(2 * z / 20 + ph[1])
            a = ang / (les.extent * wobble)
        if les.kind == EPIDURAL:
            # Biconvex lens: thickest at the centre, elliptic profile to the edges.
            region = intracranial & (a < 1) & (brain_depth < les.thickness * np.sqrt(np.clip(1 - a**2, 0, 1)))
        elif les.kind == SUBDURAL:
            # Crescent: nearly constant thickness along the inner table, tapering only at the ends.
            region = intracranial & (a < 1) & (brain_depth < les.thickness * np.clip(1 - a**4, 0, 1) ** 0.5)
        elif les.kind == SUBARACHNOID:
            zone = (a < 1) if not les.level else np.ones(n, bool)
            region = csf_space & zone & (z > les.z_range[0]) & (z < les.z_range[1])
            if les.level:
                region &= np.abs(x) < 45
        elif les.kind == INTRAVENTRICULAR:
            side = (np.sign(x) == les.centre[0]) if les.centre[0] else np.ones(n, bool)
            region = ventricles & side & (y > les.level) & (z > les.z_range[0]) & (z < les.z_range[1])
        else:
            d = q - les.centre[:, None]
            dist = np.sqrt((d**2).sum(0))
            theta, phi = np.arctan2(d[1], d[0]), d[2] / np.maximum(dist, 1e-6)
            rad = les.thickness * (1 + 0.2 * np.sin(2 * theta + ph[2]) + 0.15 * np.sin(3 * phi + ph[3]))
            rad = rad * (1 + 0.1 * np.sin(5 * theta + ph[4]))
            region = intracranial & (dist < rad) & ~ventricles
            if les.oedema:
                rim = intracranial & (dist >= rad) & (dist < rad + les.oedema) & ~ventricles & (hu < 45)
                hu[rim] = np.minimum(hu[rim], anat.white - 8.0 + anat.offset)
        texture = 4.0 * np.sin(0.4 * x + ph[5]) * np.sin(0.35 * y - ph[5])
        fresh = region & (kind < 0)
        kind[fresh] = les.kind
        blood[fresh] = (les.hu + anat.offset * 0.5 + texture)[fresh]
    return kind, blood
