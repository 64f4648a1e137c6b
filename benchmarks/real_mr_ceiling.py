"""
How far the real-MR truth lets "slice within one" go (issue 25): the share of the disc points on a slice within one of
their labelled one, for oracles that know each subject's spine exactly but not the truth's own lateral scatter.

    python benchmarks/real_mr_ceiling.py          # needs SPINE_MR_DIR, else <repository>/../shared/real/spine_mr

The points of `vb3_shared30.npz` are derived from vertebral-body masks (its README): their coordinate across the body
strays from the subject's midline by a few mm, and L5/S1's, extrapolated along L4→L5, by 5-17 mm in half the
subjects. The sagittal slices of the built competitions are 3.5-4.5 mm apart with a random phase
(tests/real_mr_competition.py); here each subject gets 500 such draws. Oracles, each placing a level at one
coordinate across the body:
- midline: every level at the median of the subject's five true coordinates;
- midline + L5/S1's mean offset: the median of L1/L2-L4/L5, and L5/S1 that plus the other subjects' mean offset;
- four exact: L1/L2-L4/L5 on their true coordinates, L5/S1 at L4/L5's plus the other subjects' mean step.
"""

import sys
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))

import real_mr_competition as R  # noqa: E402

SCOLIOSIS = 29  # the subject index with a marked scoliosis (tests/real_mr_competition.py)


def within_one(guesses, truth, rng, draws=500):
    """The share of (draw, subject, level) whose guessed slice is within one of the true one."""
    hits = []
    for _ in range(draws):
        spacing = rng.uniform(3.5, 4.5, (len(truth), 1))
        phase = rng.uniform(0, 1, (len(truth), 1)) * spacing
        hits.append(np.abs(np.floor((guesses - phase) / spacing) - np.floor((truth - phase) / spacing)) <= 1)
    return float(np.mean(hits))


def main():
    data = R.load_data()
    across = np.asarray(data["points"], float)[:, :, 2]  # (subjects, 5 levels): mm across the body
    subjects = len(across)
    others = [np.delete(np.arange(subjects), subject) for subject in range(subjects)]
    l5_offset = np.array([np.mean(across[o, 4] - np.median(across[o, :4], axis=1)) for o in others])
    l5_step = np.array([np.mean(across[o, 4] - across[o, 3]) for o in others])
    midline = np.repeat(np.median(across, axis=1, keepdims=True), 5, axis=1)
    upper = np.median(across[:, :4], axis=1)
    with_offset = np.column_stack([np.repeat(upper[:, None], 4, axis=1), upper + l5_offset])
    four_exact = np.column_stack([across[:, :4], across[:, 3] + l5_step])
    rng = np.random.default_rng(0)
    print("| oracle | all 30 | the 29 without the scoliosis |\n| --- | --- | --- |")
    for name, guesses in (
        ("midline", midline),
        ("midline + L5/S1's mean offset", with_offset),
        ("L1/L2-L4/L5 exact, L5/S1 from L4/L5", four_exact),
    ):
        every = within_one(guesses, across, rng)
        straight = within_one(np.delete(guesses, SCOLIOSIS, 0), np.delete(across, SCOLIOSIS, 0), rng)
        print(f"| {name} | {every:.1%} | {straight:.1%} |")


if __name__ == "__main__":
    main()
