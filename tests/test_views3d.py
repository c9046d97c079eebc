"""views3d.py: the 3D views and probe windows sample the places they claim, by a ramp volume whose
intensity is its own coordinate (trilinear interpolation reproduces a linear function exactly)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import views3d


class RampData:
    """A prepared split of two volumes whose HU encode the coordinate (mm) along one axis."""

    def __init__(self, axis, counts=(23, 17), S=20, z_mm=3.0, mm_per_px=(2.5, 1.7)):
        self.count, self.z_mm = np.array(counts), np.full(len(counts), z_mm, np.float32)
        self.mm_per_px = np.array(mm_per_px, np.float32)
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        vols = []
        for n, px in zip(counts, mm_per_px):
            z, y, x = np.meshgrid((np.arange(n) + 0.5) * z_mm, (np.arange(S) + 0.5) * px, (np.arange(S) + 0.5) * px,
                                  indexing="ij")
            vols.append({"x": x, "y": y, "z": z}[axis])
        self.slices = np.concatenate(vols).astype(np.float64)  # mm; HU below
        self.mm = self.slices.copy()
        self.slices = np.round(-1000 + self.slices * 10).astype(np.int16)  # 10 HU per mm: inside [-1000, 1000]

    def __len__(self):
        return len(self.count)


def cfg(**kw):
    base = dict(seed=3, n_local=3, block_mm=30.0, global_size=8, local_size=4, global_scale_min=0.5,
                global_scale_max=1.0, local_scale_min=0.2, local_scale_max=0.5, p_flip=0.5, p_gamma=0.0,
                gamma_min=0.9, gamma_max=1.1)
    return SimpleNamespace(**{**base, **kw})


def expected_coordinate(centre, side, size, flip):
    """mm (from the tensor corner) of each output voxel centre along one axis."""
    offset = -side / 2 + (np.arange(size) + 0.5) * side / size
    return centre - offset if flip else centre + offset


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_views_sample_where_the_plan_says(axis):
    ds, c = RampData(axis), cfg()
    plan = views3d.plan_blocks(ds, c, step=5, slots=range(6))
    batch = views3d.gather_blocks(ds, plan, c.block_mm)
    out = views3d.make_views3d(batch, c, "cpu")
    B = len(plan["vol"])
    assert out["xg"].shape == (2 * B, 1, 8, 8, 8) and out["xl"].shape == (3 * B, 1, 4, 4, 4)
    a = "xyz".index(axis)
    extent = batch["extent"].numpy()
    checked = 0
    for kind, x, size in (("g", out["xg"], 8), ("l", out["xl"], 4)):
        n_views = plan[f"{kind}_scale"].shape[1]
        for j in range(n_views):
            for b in range(B):
                r = plan[f"{kind}_scale"][b, j]
                centre = plan["block_xyz"][b] + (plan[f"{kind}_pos"][b, j] - 0.5) * (1 - r) * c.block_mm
                side = r * c.block_mm
                flips = [plan[f"{kind}_flip"][b, j] > 0, False, False]
                want = [expected_coordinate(centre[k], side, size, flips[k]) for k in range(3)]
                # the gathered tensor's mm -> the volume's mm: z is offset by the block's first slice
                z0 = (plan["centre"][b] - views3d.block_half(3.0, c.block_mm)) * 3.0
                vox = np.array([float(ds.mm_per_px[plan["vol"][b]])] * 2 + [3.0])
                inside = [(w > vox[k] / 2 + 1e-6) & (w < extent[b, k] - vox[k] / 2 - 1e-6) for k, w in enumerate(want)]
                if a == 2:  # within the volume too (past its ends the block holds air)
                    zz = want[2] + z0
                    inside[2] &= (zz > 1.5 + 1e-6) & (zz < ds.count[plan["vol"][b]] * 3.0 - 1.5 - 1e-6)
                got = x[j * B + b, 0].numpy()  # (z, y, x)
                u = want[a] + (z0 if a == 2 else 0)  # the ramp's value: the coordinate in mm
                expect = np.broadcast_to({0: u[None, None, :], 1: u[None, :, None], 2: u[:, None, None]}[a],
                                         got.shape) * 10 / 2000  # 10 HU/mm, [-1000, 1000] -> [0, 1]
                m = inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]
                np.testing.assert_allclose(got[m], expect[m], atol=0.5 / 2000 + 1e-5)  # the int16 rounding
                checked += m.sum()
    assert checked > 1000


def test_blocks_past_the_ends_hold_air_and_plans_are_per_slot():
    ds, c = RampData("z", counts=(5, 40)), cfg(block_mm=45.0)  # volume 0: 15 mm, shorter than the cube
    plan = views3d.plan_blocks(ds, c, step=0, slots=range(40))
    batch = views3d.gather_blocks(ds, plan, c.block_mm)
    half = views3d.block_half(3.0, 45.0)
    assert batch["blocks"].shape[1] == 2 * half + 1
    short = np.flatnonzero(plan["vol"] == 0)
    assert len(short) and (plan["centre"][short] == 2).all()
    blk = batch["blocks"][short[0]].numpy()
    assert (blk[:half - 2] == -1000).all() and (blk[half + 3:] == -1000).all() and (blk[half - 2:half + 3] > -1000).all()
    long = np.flatnonzero(plan["vol"] == 1)
    assert (plan["centre"][long] >= half).all() and (plan["centre"][long] < 40 - half).all()  # the cube fits
    # a slot's plan does not depend on the batch around it (sampling is a function of seed, step, slot)
    again = views3d.plan_blocks(ds, c, step=0, slots=[7, 3])
    for k in ("vol", "centre", "g_scale", "l_pos"):
        np.testing.assert_array_equal(again[k], plan[k][[7, 3]])


@pytest.mark.parametrize("extent,side", [(10.0, 30.0), (30.0, 30.0), (31.0, 30.0), (175.0, 160.0), (290.0, 160.0)])
def test_windows_tile_with_half_overlap(extent, side):
    c = views3d.window_centres(extent, side)
    if extent <= side:
        assert c.tolist() == [extent / 2]
        return
    assert c[0] == pytest.approx(side / 2) and c[-1] == pytest.approx(extent - side / 2)
    assert (np.diff(c) <= side / 2 + 1e-9).all()  # neighbours overlap by at least half a window


@pytest.mark.parametrize("axis", ["x", "z"])
def test_volume_windows_span_the_slice_at_the_block_spacing(axis):
    ds = RampData(axis, counts=(23,), mm_per_px=(2.5,))  # 50 mm in-plane, 69 mm deep
    hu = torch.from_numpy(ds.slices.astype(np.int16))
    wins, slice_of = views3d.volume_windows(hu, 3.0, 2.5, block_mm=30.0, size=6)  # 5 mm voxels
    zs = views3d.window_centres(69.0, 30.0)
    assert wins.shape == (len(zs), 1, 6, 10, 10)  # 50 mm in-plane at 5 mm
    for w, zc in enumerate(zs):
        assert slice_of[w] == int(zc / 3.0)
        if axis == "z":
            want, got = expected_coordinate(zc, 30.0, 6, False), wins[w, 0].mean((1, 2)).numpy()
            ok = (want > 1.5) & (want < 69 - 1.5)
        else:
            want, got = expected_coordinate(25.0, 50.0, 10, False), wins[w, 0].mean((0, 1)).numpy()
            ok = (want > 1.25) & (want < 50 - 1.25)
        np.testing.assert_allclose(got[ok], want[ok] * 10 / 2000, atol=1e-3)


def test_window_split_is_bags_of_windows_with_their_depths():
    ds = RampData("z", counts=(23, 17))
    ds.depth_pos = np.arange(40, dtype=np.float32) / 100  # a distinct value per slice
    ds.depth_mm = np.arange(40, dtype=np.float32)
    ds.names, ds.labels, ds.manifest, ds.has_labels = ["a", "b"], np.zeros((2, 18), np.float32), {}, True
    ds.volume = lambda v: slice(int(ds.start[v]), int(ds.start[v] + ds.count[v]))
    split = views3d.WindowSplit(ds, block_mm=30.0)
    per_volume = [views3d.window_centres(69.0, 30.0), views3d.window_centres(51.0, 30.0)]
    assert split.count.tolist() == [len(c) for c in per_volume] and split.start.tolist() == [0, len(per_volume[0])]
    want = np.concatenate([ds.start[v] + (c / 3.0).astype(int) for v, c in enumerate(per_volume)]) / 100
    np.testing.assert_allclose(split.depth_pos, want)

    class Mean(torch.nn.Module):  # an "encoder" whose embedding is the window's mean intensity
        def embed(self, x):
            return x.mean((2, 3, 4))
    out = views3d.window_features(Mean(), split, 6, torch.device("cpu"), np.zeros((split.count.sum(), 1), np.float32))
    assert (np.diff(out[:split.count[0], 0]) > 0).all()  # a z ramp: deeper windows are brighter
