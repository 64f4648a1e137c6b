"""Synthetic lumbar spine MRI studies with true 3-D DICOM geometry, in the RSNA 2024 competition layout.

For training and testing a level localiser (which finds each labelled point from the images and
their DICOM tags) and a crop classifier (which grades a crop around the point). It writes:

    ROOT/train.csv                        study_id + 25 {condition}_{level} severities
    ROOT/train_series_descriptions.csv    study_id, series_id, series_description
    ROOT/train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    ROOT/test_series_descriptions.csv
    ROOT/sample_submission.csv            row_id, normal_mild, moderate, severe (test studies)
    ROOT/train_images/{study_id}/{series_id}/{instance_number}.dcm, ROOT/test_images/... likewise
    ROOT/_truth/test_label_coordinates.csv and ROOT/_truth/test_labels.csv (wide), for scoring

The phantom
-----------
Each study is one 3-D phantom in patient coordinates (LPS, mm: +x the patient's left, +y
posterior, +z the head). The spine lies in the mid-sagittal plane x = x_mid. The back of the
vertebral bodies follows a circular arc in that plane (the lordosis): near the sacrum it leans
forward by 28-42 degrees, and it turns backwards by 35-55 degrees on its way up. Every tissue is a
simple shape in the spine's own coordinates (s, a, l): s is the arc length up that line from the
top of the sacrum, a the distance behind it and l the distance left of the midline. Along s lie
the sacrum (s < 0), then in turn a disc and a vertebral body from L5/S1 and L5 up to T11/T12 and
T11, with per-study heights (bodies 25-32 mm, discs 8-12 mm). Because s and a are polar
coordinates about the arc's centre, the bodies and discs are wedges, taller in front, as real
lordotic ones are. Around them:

- vertebral bodies: marrow with a dark cortical rim and endplates; discs: a dark annulus around a
  nucleus that is bright on T2;
- the spinal canal behind the bodies (a = 0 .. 12-18 mm): an oval dural sac of CSF (bright on T2,
  dark on T1) in epidural fat, with a lobe at each lateral recess (6-9 mm either side of the
  midline, at the canal's front) holding a traversing nerve root;
- lateral masses (pedicles and articular pillars, bone) 11-23 mm either side, pierced at each disc
  level by a neural foramen: an ellipsoid of fat (bright on T1) with a dark nerve root in its upper
  part, 15-19.5 mm from the midline (the lower foramina further out);
- laminae, ligamenta flava, spinous processes and facet joints behind the canal;
- muscle, abdominal viscera and a subcutaneous fat layer inside an elliptical body outline, air
  outside it.

Severity draws are 60 % Normal/Mild, 25 % Moderate and 15 % Severe, independent per study,
condition and level. Each grade changes only its own level and side, and always more with the
grade, over the disc's height and 3.5 mm beyond it along s (the next level is 33-44 mm away):

- spinal canal stenosis pinches the dural sac at the disc level from front and back (disc bulge and
  ligamentum flavum, dark): its AP size shrinks by 0-15 %, 45-60 % or 78-90 %;
- neural foraminal narrowing shrinks that foramen's fat to 85-100 %, 45-60 % or 12-25 % of its size,
  dark fibrous tissue filling the rest;
- subarticular stenosis pushes a dark disc (facet and ligament hypertrophy) of radius 0-2, 5-6 or
  8.5-9.5 mm into that lateral recess from behind and outside, stopping short of the foramen; the
  Severe one covers the recess.

Every pixel of every slice is rendered by mapping it to the world with the slice's own DICOM tags
(P = ImagePositionPatient + x * column spacing * row direction + y * row spacing * column
direction) and sampling the phantom there, then blurred slightly, multiplied by a smooth bias field
and given Gaussian noise. So the images and the tags agree exactly, whatever the slice tilt.

The label points are the phantom's own: the canal centre at each disc level (on the Sagittal
T2/STIR instance nearest to it along the slice normal), each foramen centre (Sagittal T1) and each
lateral recess at the disc's mid-plane (Axial T2), projected onto that slice. Train points carry
0.5-1.5 mm of in-plane label noise; the test truth in _truth/ has none.

Studies vary deterministically with their position in the train or test set, so any set of four
or more studies holds both instance orders and both axial layouts (see study_plan). The same
arguments always give byte-identical files, whatever the number of worker processes.

What a localiser meets: sagittal pixels of 0.7-0.9 mm (288 or 320 rows, head at the top, anterior
on the left) and axial ones of 0.5-0.9 mm (anterior at the top, the patient's left on the right);
15-19 sagittal slices 3-4.5 mm apart, numbered towards the patient's left or right, with the
midline within 1.5 slices of the middle one. The slices are tilted by up to 2 degrees, so a study's
five canal points lie up to 2 instances from the middle and, in about a third of studies, on two
instances; the foramina lie 2-7 (mostly 4-5) slices from the middle. Axial T2 is one stack of 33-50
parallel slices or one block of 3-5 slices per disc, parallel to it; one study in six splits the
levels over two axial series. SliceThickness and SpacingBetweenSlices are only in some train
series, never in test ones. With image_size forced, spacing grows to keep the field of view.

From the command line:

    python tests/anatomy_synthetic.py --out DIR --train-studies 80 --test-studies 20 --seed 0
"""

import argparse
import concurrent.futures
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MRImageStorage, RLELossless, generate_uid

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from script import CONDITIONS, LEVELS, SEVERITY_NAMES, WIDE_LABEL_COLUMNS  # noqa: E402  (needs the path above)

SEVERITY_MIX = (0.6, 0.25, 0.15)
SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2 = "Sagittal T1", "Sagittal T2/STIR", "Axial T2"
DESCRIPTIONS = (SAGITTAL_T2, SAGITTAL_T1, AXIAL_T2)
# The series each condition is labelled on, as in the competition.
LABEL_SERIES = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}
COORDINATE_COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]

# Image sizes when not forced. Sagittal rows run head to foot and must hold L1 to S1 (up to about
# 260 mm) at 0.9 mm per pixel or finer.
SAGITTAL_ROWS = (288, 320)
SAGITTAL_COLUMNS = (256, 288, 320)
AXIAL_SIZES = (192, 224, 256, 320)
MAX_PIXEL_SPACING = 0.9
MIN_PIXEL_SPACING = 0.5
AXIAL_FIELD_MM = 140.0  # The smallest axial field of view: canal, body and posterior elements.
LABEL_NOISE_MM = (0.5, 1.5)
DISCS = 7  # L5/S1 up to T11/T12; the lowest five are labelled (disc k is LEVELS[4 - k]).

# Tissues and their intensities on T1 and T2 (arbitrary units; each study scales them a little).
TISSUES = (
    "air",
    "fat",
    "muscle",
    "viscera",
    "marrow",
    "cortex",
    "annulus",
    "nucleus",
    "bone",
    "joint",
    "ligament",
    "epidural_fat",
    "csf",
    "nerve",
    "foraminal_fat",
    "fibrosis",
)
(
    AIR,
    FAT,
    MUSCLE,
    VISCERA,
    MARROW,
    CORTEX,
    ANNULUS,
    NUCLEUS,
    BONE,
    JOINT,
    LIGAMENT,
    EPIDURAL_FAT,
    CSF,
    NERVE,
    FORAMINAL_FAT,
    FIBROSIS,
) = range(len(TISSUES))
T1_INTENSITY = (0, 920, 330, 480, 620, 90, 260, 330, 560, 300, 220, 880, 160, 300, 950, 200)
T2_INTENSITY = (0, 520, 260, 430, 420, 70, 240, 820, 380, 650, 170, 450, 1000, 330, 480, 180)
FATTY = (FAT, MARROW, EPIDURAL_FAT, FORAMINAL_FAT, BONE)  # Dimmed on STIR, which suppresses fat.

# What each grade does, as a (low, high) range a per-label draw picks from (see the docstring).
CANAL_NARROWING = ((0.0, 0.15), (0.45, 0.6), (0.78, 0.9))  # Share of the sac's AP size lost.
FORAMEN_SCALE = ((0.85, 1.0), (0.45, 0.6), (0.12, 0.25))  # Foraminal fat's size, share of normal.
RECESS_INTRUSION_MM = ((0.0, 2.0), (5.0, 6.0), (8.5, 9.5))  # Radius of the hypertrophy disc.


def rotation(axis, degrees):
    """The 3x3 matrix that turns vectors by an angle about the x, y or z axis."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = cos, -sin, sin, cos
    return matrix


@dataclass
class Spine:
    """One study's 3-D phantom; see the module docstring. Lengths in mm, angles in radians."""

    x_mid: float  # The mid-sagittal plane.
    centre: tuple  # (y, z) of the centre of the arc the back of the vertebral bodies follows.
    radius: float
    theta0: float  # Tilt of the arc's tangent at s = 0 from +z towards +y (negative: forward).
    edges: np.ndarray  # s of disc and body boundaries from the top of the sacrum up, 2 * DISCS + 1.
    body_depth: float
    body_half_width: float
    canal_ap: float
    canal_half_width: float
    recess_lateral: float
    foramen_lateral: np.ndarray  # Per disc, bottom up: the lower foramina lie further out.
    foramen_radii: tuple  # Along s, a and l.
    skin: tuple  # (a of the back, a of the belly, half width, fat thickness).
    severities: np.ndarray  # Grades 0..2, CONDITIONS x LEVELS.
    jitter: np.ndarray  # Uniform 0..1 per label: where in its grade's range the effect lies.
    t1: np.ndarray  # Intensity per tissue.
    t2: np.ndarray
    stir: bool  # Whether the Sagittal T2/STIR series suppresses fat.

    @property
    def curvature(self):
        return 1.0 / self.radius

    @property
    def disc_centres(self):
        return (self.edges[0:-1:2] + self.edges[1::2]) / 2

    @property
    def disc_heights(self):
        return self.edges[1::2] - self.edges[0:-1:2]

    @property
    def canal_centre(self):
        """a of the dural sac's centre; its front lies 1 mm behind the bodies."""
        return 1.0 + self.canal_ap / 2

    @property
    def recess_depth(self):
        """a of the lateral recesses, at the sac's front edge."""
        return 3.5

    @property
    def foramen_depth(self):
        return 1.0 + 0.45 * self.canal_ap

    def foramen_centres(self):
        """s of each foramen's centre: a little above its disc's centre, between the pedicles."""
        return self.disc_centres + 2.0

    def with_severities(self, severities):
        """The same phantom with other grades (CONDITIONS x LEVELS), e.g. to see what a grade changes."""
        return replace(self, severities=np.asarray(severities, dtype=int))

    def effect(self, condition, ranges):
        """Per disc (bottom up) and, for sided conditions, per side (left, right): each grade's effect."""
        rows = [CONDITIONS.index(name) for name in condition]
        values = np.empty((DISCS, len(rows)))
        for column, row in enumerate(rows):
            grades = self.severities[row]
            low = np.array([ranges[grade][0] for grade in grades])
            high = np.array([ranges[grade][1] for grade in grades])
            by_level = low + self.jitter[row] * (high - low)
            # Discs above L1/L2 are unlabelled and normal.
            values[:, column] = np.concatenate([by_level[::-1], np.full(DISCS - len(LEVELS), ranges[0][0])])
        return values

    def world(self, s, a, l):
        """World (x, y, z) of spine coordinates (s, a, l)."""
        theta = self.theta0 + self.curvature * np.asarray(s, dtype=float)
        distance = self.radius - np.asarray(a, dtype=float)
        return np.stack(
            np.broadcast_arrays(
                self.x_mid + np.asarray(l, dtype=float),
                self.centre[0] - distance * np.cos(theta),
                self.centre[1] + distance * np.sin(theta),
            ),
            axis=-1,
        )

    def local(self, x, y, z):
        """Spine coordinates (s, a, l) of world points."""
        vy, vz = y - self.centre[0], z - self.centre[1]
        s = (np.arctan2(vz, -vy) - self.theta0) * self.radius
        return s, self.radius - np.hypot(vy, vz), x - self.x_mid

    def tangent(self, s):
        """Unit vector up the spine at s: the normal of the disc plane there."""
        theta = self.theta0 + self.curvature * s
        return np.array([0.0, math.sin(theta), math.cos(theta)])

    def label_point(self, condition, level):
        """World point the label of one condition at one level marks."""
        k = len(LEVELS) - 1 - LEVELS.index(level)
        side = 1.0 if condition.startswith("left") else -1.0
        if condition == "spinal_canal_stenosis":
            return self.world(self.disc_centres[k], self.canal_centre, 0.0)
        if "foraminal" in condition:
            return self.world(self.foramen_centres()[k], self.foramen_depth, side * self.foramen_lateral[k])
        return self.world(self.disc_centres[k], self.recess_depth, side * self.recess_lateral)

    def tissues(self, x, y, z):
        """Tissue index at world points (arrays of one shape)."""
        s, a, l = self.local(x, y, z)
        # Body outline with its subcutaneous fat: muscle behind the bodies' middle and in the psoas
        # either side of them, viscera elsewhere.
        back, belly, half_width, fat = self.skin
        middle, half_depth = (back + belly) / 2, (back - belly) / 2
        outline = ((a - middle) / half_depth) ** 2 + (l / half_width) ** 2
        inner = ((a - middle) / (half_depth - fat)) ** 2 + (l / (half_width - fat)) ** 2
        depth, width = self.body_depth, self.body_half_width
        psoas = ((a + depth / 2) / (0.4 * depth)) ** 2 + ((np.abs(l) - width - 14.0) / 14.0) ** 2 <= 1
        tissue = np.where(outline <= 1, FAT, AIR).astype(np.int8)
        tissue[inner <= 1] = VISCERA
        tissue[(inner <= 1) & ((a > -depth / 2) | psoas)] = MUSCLE
        # Only the few pixels near the spine need the rest.
        near = (a > -depth - 1.0) & (a < self.canal_ap + 46.0) & (np.abs(l) < 40.0) & (s > -90.0)
        tissue[near] = self.spine_tissues(s[near], a[near], l[near], tissue[near])
        return tissue

    def spine_tissues(self, s, a, l, tissue):
        """Tissue index at points near the spine, given in spine coordinates, over the soft tissue there."""
        lateral = np.abs(l)
        side = (l < 0).astype(np.intp)  # 0: left (+x), 1: right.
        segment = np.minimum(np.searchsorted(self.edges, s, side="right") - 1, len(self.edges) - 2)
        in_disc = (segment >= 0) & (segment % 2 == 0)
        in_body = (segment >= 0) & (segment % 2 == 1)
        in_sacrum = (segment < 0) & (s > -85.0)
        disc_centres = self.disc_centres
        nearest = np.clip(np.searchsorted((disc_centres[1:] + disc_centres[:-1]) / 2, s), 0, DISCS - 1)
        from_disc = s - disc_centres[nearest]
        disc_height = self.disc_heights[nearest]
        # Each grade acts over about its disc's height along the spine, and not at all past 3.5 mm
        # beyond the disc, so the next level's point (33-44 mm away) never sees it.
        bump = np.clip(1 - (from_disc / (0.5 * disc_height + 3.5)) ** 2, 0, None) ** 2

        # Vertebral bodies, discs and the sacrum share one rounded cross-section.
        depth, width = self.body_depth, self.body_half_width
        section = ((a + depth / 2) / (depth / 2)) ** 2 + (l / width) ** 4
        in_section = section <= 1
        low_edge = self.edges[np.clip(segment, 0, None)]
        # The topmost body (T11) runs on past the last edge.
        high_edge = np.where(segment == len(self.edges) - 2, np.inf, self.edges[np.clip(segment, 0, None) + 1])
        near_endplate = np.minimum(s - low_edge, high_edge - s) < 1.2
        cortex = (section > 0.82) | (near_endplate & in_body) | (in_sacrum & (s > -1.2))
        tissue = np.where(in_section & (in_body | in_sacrum), np.where(cortex, CORTEX, MARROW), tissue)
        nucleus = (section < 0.5) & (np.abs(from_disc) < 0.32 * disc_height)
        tissue = np.where(in_section & in_disc, np.where(nucleus, NUCLEUS, ANNULUS), tissue)

        # Posterior elements: pillars of bone either side of the canal, with a facet joint at each
        # disc level; laminae with ligamenta flava between them; spinous processes; the sacrum's back.
        ap, canal_width = self.canal_ap, self.canal_half_width
        spine_level = s > -85.0
        pillar = spine_level & (lateral > canal_width + 0.5) & (lateral < canal_width + 12) & (a >= 0) & (a < ap + 14)
        facet_joint = pillar & (a > ap + 2) & (np.abs(from_disc) < 1.0)
        tissue = np.where(pillar, np.where(facet_joint, JOINT, BONE), tissue)
        between_laminae = np.abs(from_disc) < 0.5 * disc_height + 2.0
        lamina = spine_level & (lateral <= canal_width + 2) & (a >= ap + 1.5) & (a < ap + 7)
        tissue = np.where(lamina, np.where(between_laminae & ~in_sacrum, LIGAMENT, BONE), tissue)
        # Spinous processes hang lower than their bodies.
        hanging = np.searchsorted(self.edges, s + 8.0, side="right") - 1
        spinous = spine_level & (lateral < 4) & (a >= ap + 7) & (a < ap + 45)
        tissue = np.where(spinous, np.where((hanging % 2 == 1) | (hanging < 0), BONE, LIGAMENT), tissue)
        tissue = np.where(in_sacrum & (lateral < 35) & (a >= 0) & (a < ap + 12), BONE, tissue)

        # Neural foramina: fat with a nerve root, shrunk by its grade with fibrous tissue around.
        scale = self.effect(("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"), FORAMEN_SCALE)[
            nearest, side
        ]
        radius_s, radius_a, radius_l = self.foramen_radii
        along = s - self.foramen_centres()[nearest]
        across = a - self.foramen_depth
        out = lateral - self.foramen_lateral[nearest]
        foramen = spine_level & ((along / radius_s) ** 2 + (across / radius_a) ** 2 + (out / radius_l) ** 2 <= 1)
        open_fat = (along / (radius_s * scale)) ** 2 + (across / (radius_a * scale)) ** 2 + (
            out / (radius_l * (0.4 + 0.6 * scale))
        ) ** 2 <= 1
        root = ((along - 0.35 * radius_s) / 2.2) ** 2 + ((across + 0.15 * radius_a) / 2.2) ** 2 + (
            out / radius_l
        ) ** 2 <= 1
        tissue = np.where(foramen, np.where(root, NERVE, np.where(open_fat, FORAMINAL_FAT, FIBROSIS)), tissue)

        # The canal: epidural fat around the dural sac, whose lumen the canal grade pinches, and a
        # lateral recess either side at the sac's front.
        from_centre = a - self.canal_centre
        recess_out, recess_back = lateral - self.recess_lateral, a - self.recess_depth
        canal = spine_level & (
            ((from_centre / (ap / 2 + 1.5)) ** 2 + (l / (canal_width + 1.0)) ** 2 <= 1)
            | ((recess_out / 4.5) ** 2 + (recess_back / 3.5) ** 2 <= 1) & (a >= 0)
        )
        narrowing = self.effect(("spinal_canal_stenosis",), CANAL_NARROWING)[nearest, 0] * bump
        sac = (from_centre / (ap / 2)) ** 2 + (l / canal_width) ** 2 <= 1
        lumen = (from_centre / (ap / 2 * (1 - narrowing))) ** 2 + (l / (canal_width * (1 - 0.3 * narrowing))) ** 2 <= 1
        recess = (recess_out / 3.5) ** 2 + (recess_back / 2.5) ** 2 <= 1
        recess_root = (recess_out - 1.0) ** 2 + (recess_back - 0.5) ** 2 <= 1.3**2
        thecal = s > -25.0  # The dural sac ends at about S2; below it the canal holds fat only.
        canal_tissue = np.where(sac & thecal, LIGAMENT, EPIDURAL_FAT)
        canal_tissue = np.where((lumen | recess) & thecal, CSF, canal_tissue)
        canal_tissue = np.where(recess_root & thecal, NERVE, canal_tissue)
        tissue = np.where(canal, canal_tissue, tissue)
        # Subarticular stenosis: a dark disc (facet and ligament hypertrophy) pushed into the recess
        # from behind and outside.
        intrusion = (
            self.effect(("left_subarticular_stenosis", "right_subarticular_stenosis"), RECESS_INTRUSION_MM)[
                nearest, side
            ]
            * bump
        )
        # It stays medial of the foramen, so a foraminal crop does not show it.
        hypertrophy = (
            spine_level
            & (a >= 0)
            & (lateral <= self.recess_lateral + 4.5)
            & ((recess_out - 4.0) ** 2 + (recess_back - 4.5) ** 2 <= intrusion**2)
        )
        return np.where(hypertrophy, LIGAMENT, tissue)

    def signal(self, x, y, z, sequence):
        """Noise-free intensity at world points on a T1, T2 or STIR sequence."""
        table = self.t1 if sequence == "T1" else self.t2
        if sequence == "STIR":
            table = table.copy()
            table[list(FATTY)] *= 0.3
        return table[self.tissues(x, y, z)]


def random_spine(rng):
    """A random study phantom with random severities."""
    scale = rng.uniform(0.93, 1.07)
    bodies = rng.uniform(25.0, 32.0) * rng.uniform(0.97, 1.03, DISCS)
    discs = np.clip(rng.uniform(8.0, 12.0) * rng.uniform(0.92, 1.08, DISCS), 8.0, 12.0)
    edges = np.concatenate([[0.0], np.cumsum(np.ravel(np.column_stack([discs, bodies])))])
    lumbar_length = edges[2 * len(LEVELS)]
    theta0 = math.radians(rng.uniform(-42.0, -28.0))
    radius = lumbar_length / math.radians(rng.uniform(35.0, 55.0))
    sacrum = np.array([rng.uniform(-20.0, 20.0), rng.uniform(-60.0, 20.0)])  # (y, z) of S1's top, at its back.
    centre = (sacrum[0] + radius * math.cos(theta0), sacrum[1] - radius * math.sin(theta0))
    canal_ap = rng.uniform(12.0, 18.0)
    canal_half_width = rng.uniform(10.0, 12.0) * scale
    recess_lateral = rng.uniform(6.5, 8.5) * scale
    lower = 0.5 * (len(LEVELS) - 1 - np.arange(DISCS))  # L5/S1 2 mm further out than L1/L2.
    foramen_lateral = rng.uniform(max(15.0, canal_half_width + 4.5), 17.5) + lower
    foramen_radii = (rng.uniform(7.5, 9.0) * scale, 0.3 * canal_ap + 1.0, 5.0 * scale)
    body_depth = rng.uniform(30.0, 35.0) * scale
    skin = (
        canal_ap + rng.uniform(55.0, 80.0),
        -body_depth - rng.uniform(90.0, 140.0),
        rng.uniform(130.0, 170.0),
        rng.uniform(10.0, 20.0),
    )
    severities = rng.choice(len(SEVERITY_NAMES), size=(len(CONDITIONS), len(LEVELS)), p=SEVERITY_MIX)
    jitter = rng.uniform(size=(len(CONDITIONS), len(LEVELS)))
    return Spine(
        x_mid=rng.uniform(-12.0, 12.0),
        centre=centre,
        radius=radius,
        theta0=theta0,
        edges=edges,
        body_depth=body_depth,
        body_half_width=rng.uniform(21.0, 24.0) * scale,
        canal_ap=canal_ap,
        canal_half_width=canal_half_width,
        recess_lateral=recess_lateral,
        foramen_lateral=foramen_lateral,
        foramen_radii=foramen_radii,
        skin=skin,
        severities=severities,
        jitter=jitter,
        t1=np.array(T1_INTENSITY, float) * rng.uniform(0.9, 1.1, len(TISSUES)),
        t2=np.array(T2_INTENSITY, float) * rng.uniform(0.9, 1.1, len(TISSUES)),
        stir=bool(rng.uniform() < 0.35),
    )


def decimal_strings(values, decimals):
    """DICOM decimal-string texts of some numbers, and the numbers they read back as."""
    texts = [f"{value:.{decimals}f}" for value in np.ravel(values)]
    texts = ["0" if float(text) == 0 else text for text in texts]  # No "-0.000000".
    return texts, np.array([float(text) for text in texts])


@dataclass
class Slice:
    """One instance's geometry, exactly as its DICOM tags state it."""

    instance_number: int
    position: np.ndarray  # ImagePositionPatient: the world point of the centre of pixel (0, 0).
    orientation: np.ndarray  # ImageOrientationPatient: row direction r, then column direction c.
    position_texts: list
    orientation_texts: list

    @property
    def normal(self):
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        return normal / np.linalg.norm(normal)


@dataclass
class Series:
    """One series as written: its tags and slices."""

    study_id: int
    series_id: int
    description: str
    sequence: str  # T1, T2 or STIR: the phantom's contrast.
    order: str  # ascending or descending: instance numbers along +x (sagittal) or +z (axial).
    layout: str  # contiguous or per-level blocks.
    rows: int
    columns: int
    spacing: np.ndarray  # PixelSpacing: (row spacing, column spacing), as read back.
    spacing_texts: list
    slice_spacing: float
    slices: list = field(default_factory=list)
    levels: tuple = LEVELS  # Levels whose discs an axial series shows.
    slice_thickness: bool = True  # Whether SliceThickness is written.
    spacing_between_slices: bool = True
    rle: bool = False
    rescale: tuple = (1.0, 0.0)  # RescaleSlope, RescaleIntercept.

    def project(self, slice_, point):
        """(x, y, distance along the normal) of a world point relative to a slice."""
        offset = point - slice_.position
        r, c = slice_.orientation[:3], slice_.orientation[3:]
        return offset @ r / self.spacing[1], offset @ c / self.spacing[0], offset @ slice_.normal

    def contains(self, x, y):
        return 0 <= x <= self.columns - 1 and 0 <= y <= self.rows - 1


def pixel_spacing(rng, rows, columns, needed):
    """Square pixels' (row, column) spacing for a field of view of at least needed = (height, width) mm."""
    smallest = max(needed[0] / rows, needed[1] / columns, MIN_PIXEL_SPACING)
    if smallest >= MAX_PIXEL_SPACING:  # Only with a small forced image size.
        return smallest, smallest
    spacing = rng.uniform(smallest, MAX_PIXEL_SPACING)
    return spacing, spacing


def make_slices(series, centres, directions, first_instance, order_key):
    """Fill a series' slices from image centres and (r, c) directions, numbered by order_key."""
    rank = np.argsort(np.argsort(order_key, kind="stable"), kind="stable")
    for index, (centre, (r, c)) in enumerate(zip(centres, directions)):
        orientation_texts, orientation = decimal_strings(np.concatenate([r, c]), 7)
        # The tags are rounded; position the image so its centre still lands on the intended point.
        half = ((series.columns - 1) / 2 * series.spacing[1], (series.rows - 1) / 2 * series.spacing[0])
        corner = centre - half[0] * orientation[:3] - half[1] * orientation[3:]
        position_texts, position = decimal_strings(corner, 4)
        series.slices.append(
            Slice(first_instance + int(rank[index]), position, orientation, position_texts, orientation_texts)
        )
    series.slices.sort(key=lambda slice_: slice_.instance_number)


def first_instance_number(rng):
    return int(rng.choice([1, 1, 1, 5, 17, 33]))


def sagittal_series(spine, rng, plan, description, series_id, image_size):
    """A sagittal stack along +x through the whole lumbar spine, the midline within 1.5 slices of its middle."""
    count = int(rng.integers(15, 20))
    # Both foramina must lie well inside the stack, wherever the midline falls.
    needed_spacing = (spine.foramen_lateral.max() + 5.0) / ((count - 1) / 2 - 1.5)
    slice_spacing = rng.uniform(max(3.0, needed_spacing), 4.5) if needed_spacing < 4.5 else needed_spacing
    turn = rotation("z", rng.uniform(-2.0, 2.0)) @ rotation("y", rng.uniform(-1.0, 1.0))
    r, c = turn @ np.array([0.0, 1.0, 0.0]), turn @ np.array([0.0, 0.0, -1.0])
    # Field of view: L1 to S1 with a few mm of the neighbours, from in front of the bodies to the skin.
    s = np.linspace(-10.0, spine.edges[2 * len(LEVELS)] + 8.0, 40)
    outline = np.concatenate([spine.world(s, a, 0.0) for a in (-spine.body_depth - 8.0, spine.canal_ap + 45.0)])
    low, high = outline[:, 1:].min(axis=0), outline[:, 1:].max(axis=0)  # (y, z)
    span = high - low + 10.0
    if image_size:
        rows = columns = image_size
    else:
        fitting = [size for size in SAGITTAL_ROWS if span[1] / size <= MAX_PIXEL_SPACING]
        rows, columns = int(rng.choice(fitting or SAGITTAL_ROWS[-1:])), int(rng.choice(SAGITTAL_COLUMNS))
    spacing = pixel_spacing(rng, rows, columns, (span[1], span[0]))
    field_of_view = np.array([columns * spacing[1], rows * spacing[0]])  # (y, z)
    slack = np.maximum(field_of_view - span, 0.0) / 2
    middle = (low + high) / 2 + rng.uniform(-1, 1, 2) * np.minimum(slack, 15.0)
    spacing_texts, spacing = decimal_strings(spacing, 6)
    ascending = plan[description]["order"] == "ascending"
    series = Series(
        plan["study_id"],
        series_id,
        description,
        plan[description]["sequence"],
        plan[description]["order"],
        "contiguous",
        rows,
        columns,
        spacing,
        spacing_texts,
        slice_spacing,
        slice_thickness=plan["slice_thickness"][description],
        spacing_between_slices=plan["spacing_between_slices"][description],
        rle=plan[description].get("rle", False),
    )
    # The midline lies up to 1.5 slices off the stack's middle.
    stack_middle = spine.x_mid - rng.uniform(-1.5, 1.5) * slice_spacing
    step = -np.cross(r, c)  # The slice normal points to the patient's right; step left.
    steps = np.arange(count) - (count - 1) / 2
    centres = [np.array([stack_middle, *middle]) + k * slice_spacing * step for k in steps]
    make_slices(series, centres, [(r, c)] * count, first_instance_number(rng), steps if ascending else -steps)
    return series


def axial_frame(theta_degrees, yaw_degrees):
    """Row and column directions of an axial slice tilted about x (normal (0, sin t, cos t)), then turned about z."""
    turn = rotation("z", yaw_degrees) @ rotation("x", -theta_degrees)
    return turn @ np.array([1.0, 0.0, 0.0]), turn @ np.array([0.0, 1.0, 0.0])


def axial_series(spine, rng, plan, series_id, levels, image_size):
    """An Axial T2 series through some levels, contiguous or in one tilted block per disc."""
    description = AXIAL_T2
    if image_size:
        rows = columns = image_size
    else:
        rows, columns = (int(size) for size in rng.choice(AXIAL_SIZES, 2))
    spacing = pixel_spacing(rng, rows, columns, (AXIAL_FIELD_MM, AXIAL_FIELD_MM))
    if not image_size and rng.uniform() < 0.25:  # Some scanners' pixels are not square.
        smallest = max(MIN_PIXEL_SPACING, AXIAL_FIELD_MM / columns)
        column_spacing = np.clip(spacing[0] * rng.uniform(0.92, 1.08), smallest, max(smallest, MAX_PIXEL_SPACING))
        spacing = (spacing[0], float(column_spacing))
    spacing_texts, spacing = decimal_strings(spacing, 6)
    layout, order = plan[description]["layout"], plan[description]["order"]
    series = Series(
        plan["study_id"],
        series_id,
        description,
        "T2",
        order,
        layout,
        rows,
        columns,
        spacing,
        spacing_texts,
        0.0,
        levels=tuple(levels),
        slice_thickness=plan["slice_thickness"][description],
        spacing_between_slices=plan["spacing_between_slices"][description] and layout == "contiguous",
    )
    discs = [len(LEVELS) - 1 - LEVELS.index(level) for level in levels]
    disc_s = spine.disc_centres[discs]
    side_shift = rng.uniform(-6.0, 6.0)
    centres, directions, keys = [], [], []
    if layout == "contiguous":
        series.slice_spacing = rng.uniform(3.5, 4.5)
        r, c = axial_frame(rng.uniform(-5.0, 5.0), rng.uniform(-2.0, 2.0))
        normal = np.cross(r, c)
        points = spine.world(disc_s, spine.canal_centre, 0.0)
        reference = points.mean(axis=0) + np.array([side_shift, rng.uniform(0.0, 10.0), 0.0])
        heights = (points - reference) @ normal
        # Cover every disc with 8 mm to spare above and below.
        low, high = heights.min() - 8.0, heights.max() + 8.0
        count = math.ceil((high - low) / series.slice_spacing) + 1
        start = (low + high) / 2 - (count - 1) / 2 * series.slice_spacing
        for index in range(count):
            centres.append(reference + (start + index * series.slice_spacing) * normal)
            directions.append((r, c))
            keys.append(start + index * series.slice_spacing)
    else:
        series.slice_spacing = rng.uniform(3.0, 4.0)
        for disc, s in zip(discs, disc_s):
            tangent = spine.tangent(s)
            theta = math.degrees(math.atan2(tangent[1], tangent[2])) + rng.uniform(-3.0, 3.0)
            r, c = axial_frame(theta, rng.uniform(-2.0, 2.0))
            normal = np.cross(r, c)
            count = int(rng.integers(3, 6))
            middle = spine.world(s, rng.uniform(0.0, 10.0), side_shift) + rng.uniform(-0.5, 0.5) * normal
            for index in np.arange(count) - (count - 1) / 2:
                centres.append(middle + index * series.slice_spacing * normal)
                directions.append((r, c))
                keys.append(disc * 100.0 + index)  # Blocks bottom up, and up within each block.
    keys = np.array(keys)
    make_slices(series, centres, directions, first_instance_number(rng), keys if order == "ascending" else -keys)
    return series


def study_plan(index, study_id, split):
    """What kind of study the index-th one of its set is. Repeats every few studies, so any set of
    4 or more holds both instance orders of every series kind and both axial layouts, 5 or more a
    study without a series and 6 or more a study with two axial series."""
    missing = DESCRIPTIONS[::-1][(index // 5) % 3] if index % 5 == 3 else None  # Axial T2 first.
    train = split == "train"
    return {
        "study_id": study_id,
        "missing": missing,
        SAGITTAL_T2: {"order": "ascending" if index % 2 == 0 else "descending"},
        SAGITTAL_T1: {"order": "ascending" if index % 2 == 1 else "descending", "rle": index % 3 == 2},
        AXIAL_T2: {
            "order": "descending" if (index // 2) % 2 == 0 else "ascending",
            "layout": "per-level blocks" if index % 4 in (1, 2) else "contiguous",
            "series": 2 if index % 6 == 4 else 1,
        },
        # The hidden test set lacks these tags, so only train series carry them, and not all.
        "slice_thickness": {name: train and (index + kind) % 3 != 0 for kind, name in enumerate(DESCRIPTIONS)},
        "spacing_between_slices": {name: train and (index + kind) % 2 == 0 for kind, name in enumerate(DESCRIPTIONS)},
    }


def plan_series(spine, rng, plan, image_size):
    """Every series of a study, in the order SAGITTAL_T2, SAGITTAL_T1, AXIAL_T2 (one or two)."""
    plan[SAGITTAL_T2]["sequence"] = "STIR" if spine.stir else "T2"
    plan[SAGITTAL_T1]["sequence"] = "T1"
    series_ids = []
    while len(series_ids) < 4:  # Unique within the study, like the competition's.
        candidate = int(rng.integers(10**8, 4 * 10**9))
        if candidate not in series_ids:
            series_ids.append(candidate)
    series = [
        sagittal_series(spine, rng, plan, SAGITTAL_T2, series_ids[0], image_size),
        sagittal_series(spine, rng, plan, SAGITTAL_T1, series_ids[1], image_size),
    ]
    if plan[AXIAL_T2]["series"] == 1:
        groups = [LEVELS]
    else:
        split = int(rng.choice([2, 3]))
        groups = [LEVELS[:split], LEVELS[split:]]
    series += [
        axial_series(spine, rng, plan, series_ids[2 + index], group, image_size) for index, group in enumerate(groups)
    ]
    return [item for item in series if item.description != plan["missing"]]


def render_slice(spine, series, slice_, rng, bias):
    """One slice's displayed intensities: the phantom at every pixel, blurred, biased and noisy."""
    columns = np.arange(series.columns, dtype=np.float32)[None, :]
    rows = np.arange(series.rows, dtype=np.float32)[:, None]
    # Single precision is exact to well under a micrometre over the field of view, and twice as fast.
    step_right = slice_.orientation[:3] * series.spacing[1]  # World step from one column to the next.
    step_down = slice_.orientation[3:] * series.spacing[0]
    x, y, z = (
        np.float32(origin) + np.float32(right) * columns + np.float32(down) * rows
        for origin, right, down in zip(slice_.position, step_right, step_down)
    )
    image = spine.signal(x, y, z, series.sequence).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    u, v = columns / series.columns * 2 - 1, rows / series.rows * 2 - 1
    field_ = 1 + bias[0] * u + bias[1] * v + bias[2] * u * v + bias[3] * u**2 + bias[4] * v**2
    noise = rng.normal(0.0, 0.025 * spine.t2[CSF], image.shape)
    return image * (field_ * rng.uniform(0.97, 1.03)) + noise


def write_slice(path, series, slice_, stored):
    """Write one instance as an MR image storage file."""
    study_id, series_id, instance = series.study_id, series.series_id, slice_.instance_number
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    dataset.SOPClassUID = MRImageStorage
    # Deterministic UIDs, so that the same arguments give the same bytes.
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=[str(study_id), str(series_id), str(instance)])
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=[str(study_id)])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[str(study_id), str(series_id)])
    dataset.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(study_id), "frame"])
    dataset.Modality = "MR"
    dataset.PatientID = str(study_id)
    dataset.PatientPosition = "HFS"
    dataset.SeriesNumber = DESCRIPTIONS.index(series.description) + 1
    dataset.SeriesDescription = series.description
    dataset.InstanceNumber = instance
    dataset.ImagePositionPatient = slice_.position_texts
    dataset.ImageOrientationPatient = slice_.orientation_texts
    dataset.PixelSpacing = series.spacing_texts
    if series.slice_thickness:
        dataset.SliceThickness = f"{series.slice_spacing * 0.9:.2f}"
    if series.spacing_between_slices:
        dataset.SpacingBetweenSlices = f"{series.slice_spacing:.4f}"
    dataset.RescaleSlope = f"{series.rescale[0]:g}"
    dataset.RescaleIntercept = f"{series.rescale[1]:g}"
    dataset.set_pixel_data(stored, "MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    if series.rle:
        dataset.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def write_series(images_dir, spine, series, rng):
    """Render and write every slice of a series."""
    gain = rng.uniform(0.8, 2.5)  # Scanners store intensities on their own scales.
    series.rescale = (float(rng.choice([1.0, 1.0, 2.0])), float(rng.choice([0.0, 0.0, -64.0])))
    bias = rng.uniform(-0.12, 0.12, 5)
    for slice_ in series.slices:
        displayed = render_slice(spine, series, slice_, rng, bias) * gain
        stored = np.clip(np.round((displayed - series.rescale[1]) / series.rescale[0]), 0, 4095).astype(np.uint16)
        path = images_dir / str(series.study_id) / str(series.series_id) / f"{slice_.instance_number}.dcm"
        write_slice(path, series, slice_, stored)


def nearest_slice(series_list, point):
    """(series, slice, x, y, distance) of the slice nearest a world point along its normal, among
    those whose image holds the point's projection; None if none does."""
    best = None
    for series in series_list:
        for slice_ in series.slices:
            x, y, distance = series.project(slice_, point)
            if series.contains(x, y) and (best is None or abs(distance) < abs(best[4])):
                best = (series, slice_, x, y, distance)
    return best


def label_rows(spine, series_list, study_id, rng, noise):
    """Coordinate rows (competition spelling) and 3-D truth rows of one study."""
    coordinates, points = [], []
    for condition in CONDITIONS:
        candidates = [series for series in series_list if series.description == LABEL_SERIES[condition]]
        for level in LEVELS:
            point = spine.label_point(condition, level)
            found = nearest_slice(candidates, point)
            points.append(
                {
                    "study_id": study_id,
                    "condition": condition,
                    "level": level,
                    "series_description": LABEL_SERIES[condition],
                    "world_x": point[0],
                    "world_y": point[1],
                    "world_z": point[2],
                    "series_id": found[0].series_id if found else None,
                    "instance_number": found[1].instance_number if found else None,
                    "distance_to_slice": abs(found[4]) if found else None,
                }
            )
            if found is None:
                continue
            series, slice_, x, y, _ = found
            if noise:
                size, angle = rng.uniform(*LABEL_NOISE_MM), rng.uniform(0, 2 * math.pi)
                x += size * math.cos(angle) / series.spacing[1]
                y += size * math.sin(angle) / series.spacing[0]
            coordinates.append(
                {
                    "study_id": study_id,
                    "series_id": series.series_id,
                    "instance_number": slice_.instance_number,
                    "condition": condition.replace("_", " ").title(),
                    "level": level.upper().replace("_", "/"),
                    "x": round(x, 6),
                    "y": round(y, 6),
                }
            )
    return coordinates, points


@dataclass
class StudyResult:
    """What writing one study gives back for the CSVs and the truth."""

    split: str
    coordinates: list  # train_label_coordinates.csv rows.
    points: list  # 3-D truth rows; see AnatomicalCompetition.points.
    series: list  # One row per series written.
    labels: dict  # One train.csv row.
    phantom: Spine


def write_study(task):
    """Write one study's images (task: images_dir, split, seed, index in its set, study_id, image_size)."""
    images_dir, split, seed, index, study_id, image_size = task
    # Each study draws from its own stream, so parallel workers write the same files as one.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    spine = random_spine(rng)
    plan = study_plan(index, study_id, split)
    series_list = plan_series(spine, rng, plan, image_size)
    for series in series_list:
        write_series(images_dir, spine, series, rng)
    coordinates, points = label_rows(spine, series_list, study_id, rng, noise=split == "train")
    series_rows = [
        {
            "split": split,
            "study_id": study_id,
            "series_id": series.series_id,
            "description": series.description,
            "order": series.order,
            "layout": series.layout,
            "slices": len(series.slices),
            "first_instance": series.slices[0].instance_number,
            "rows": series.rows,
            "columns": series.columns,
            "row_spacing": series.spacing[0],
            "column_spacing": series.spacing[1],
            "slice_spacing": round(series.slice_spacing, 4),
            "levels": " ".join(series.levels) if series.description == AXIAL_T2 else "",
            "transfer_syntax": "RLELossless" if series.rle else "ExplicitVRLittleEndian",
            "slice_thickness": series.slice_thickness,
        }
        for series in series_list
    ]
    labels = {"study_id": study_id}
    labels.update(
        {
            f"{condition}_{level}": SEVERITY_NAMES[spine.severities[row, column]]
            for row, condition in enumerate(CONDITIONS)
            for column, level in enumerate(LEVELS)
        }
    )
    return StudyResult(split, coordinates, points, series_rows, labels, spine)


@dataclass
class AnatomicalCompetition:
    """Where the synthetic competition was written and its hidden truth."""

    root: Path
    train_study_ids: list
    test_study_ids: list
    test_coordinates: pd.DataFrame  # train_label_coordinates.csv's format, without label noise.
    test_labels: pd.DataFrame  # train.csv's wide format.
    train_labels: pd.DataFrame
    # One row per series written: split, study_id, series_id, description, order (ascending or
    # descending), layout (contiguous or per-level blocks), slices, first_instance, rows, columns,
    # row_spacing, column_spacing, slice_spacing, levels (axial), transfer_syntax, slice_thickness.
    series: pd.DataFrame
    # One row per study, condition and level: row_id, the phantom's world point (world_x, _y, _z),
    # the series_id and instance_number it is labelled on (empty where that series is missing) and
    # its distance_to_slice along the slice normal.
    points: pd.DataFrame
    phantoms: dict = field(default_factory=dict)  # study_id -> Spine


def study_ids(seed, train_studies, test_studies):
    """Distinct random 7-to-9-digit study ids, sorted within each set, as the competition's are."""
    ids = np.random.default_rng([seed, 2]).choice(10**9 - 10**6, train_studies + test_studies, replace=False) + 10**6
    return sorted(int(value) for value in ids[:train_studies]), sorted(int(value) for value in ids[train_studies:])


def write_anatomical_competition(root, train_studies=12, test_studies=3, seed=0, image_size=None, workers=1):
    """Write a synthetic competition folder under root (new or empty); see the module docstring.

    image_size forces every image to image_size x image_size pixels; the pixel spacing then grows
    as needed for the field of view to hold the spine. workers > 1 writes studies in parallel
    processes, with the same files.
    """
    root = Path(root)
    if train_studies < 1 or test_studies < 0:
        raise ValueError("need at least one train study and no negative number of test studies")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; old files would mix with new ones")
    train_ids, test_ids = study_ids(seed, train_studies, test_studies)
    tasks = [
        (root / f"{split}_images", split, seed, index, study_id, image_size)
        for split, ids in (("train", train_ids), ("test", test_ids))
        for index, study_id in enumerate(ids)
    ]
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as executor:
            results = list(executor.map(write_study, tasks))
    else:
        results = [write_study(task) for task in tasks]

    def table(split, rows_of, columns=None):
        return pd.DataFrame(
            [row for result in results if result.split == split for row in rows_of(result)], columns=columns
        )

    coordinates = {
        split: table(split, lambda result: result.coordinates, COORDINATE_COLUMNS) for split in ("train", "test")
    }
    labels = {
        split: table(split, lambda result: [result.labels], ["study_id", *WIDE_LABEL_COLUMNS])
        for split in ("train", "test")
    }
    series = pd.DataFrame([row for result in results for row in result.series])
    points = pd.DataFrame([row for result in results for row in result.points])
    points.insert(0, "row_id", points["study_id"].astype(str) + "_" + points["condition"] + "_" + points["level"])

    for split in ("train", "test"):
        descriptions = series[series["split"] == split].sort_values(["study_id", "series_id"])
        descriptions = descriptions.rename(columns={"description": "series_description"})
        descriptions[["study_id", "series_id", "series_description"]].to_csv(
            root / f"{split}_series_descriptions.csv", index=False
        )
    labels["train"].to_csv(root / "train.csv", index=False)
    coordinates["train"].to_csv(root / "train_label_coordinates.csv", index=False)
    row_ids = [f"{study_id}_{column}" for study_id in test_ids for column in WIDE_LABEL_COLUMNS]
    submission = pd.DataFrame({"row_id": row_ids, "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3})
    submission.to_csv(root / "sample_submission.csv", index=False, float_format="%.6f")
    (root / "_truth").mkdir()
    coordinates["test"].to_csv(root / "_truth" / "test_label_coordinates.csv", index=False)
    labels["test"].to_csv(root / "_truth" / "test_labels.csv", index=False)
    return AnatomicalCompetition(
        root,
        train_ids,
        test_ids,
        coordinates["test"],
        labels["test"],
        labels["train"],
        series,
        points,
        {result.labels["study_id"]: result.phantom for result in results},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="New or empty folder to write into.")
    parser.add_argument("--train-studies", type=int, default=80)
    parser.add_argument("--test-studies", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="Force square images of this many pixels.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Parallel processes.")
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    competition = write_anatomical_competition(
        arguments.out,
        arguments.train_studies,
        arguments.test_studies,
        arguments.seed,
        arguments.image_size,
        arguments.workers,
    )
    print(
        f"Wrote {len(competition.train_study_ids)} train and {len(competition.test_study_ids)} test studies "
        f"({len(competition.series)} series) to {competition.root} in {time.perf_counter() - started:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
