"""Stage CPU reservations always fit the cluster (otherwise actor pools would wait forever)."""

import pytest

from laionbuild.config import load_config
from laionbuild.pipeline import _plan_cpus


def _need(cfg, plan, use_gpu=False):
    r = cfg.ray
    return (plan["extract"] + plan["write"] + r.langid_actors * plan["langid"] + r.fetch_actors * plan["fetch"]
            + (0 if use_gpu else cfg.clip.actors * plan["clip"]))


@pytest.mark.parametrize("cpus", [0.5, 1, 2, 3])
def test_reservations_fit_small_machines(cpus):
    cfg = load_config(None)
    plan = _plan_cpus(cfg, "pairs", False, False, float(cpus))
    assert _need(cfg, plan) <= cpus + 1e-6
    assert all(v > 0 for v in plan.values())


def test_reservations_kept_when_they_fit():
    cfg = load_config(None, ["ray.fetch_actors=4", "ray.fetch_num_cpus=1"])
    plan = _plan_cpus(cfg, "pairs", True, True, 64.0)
    assert plan["fetch"] == 1.0 and plan["extract"] == cfg.ray.extract_num_cpus
    # on GPU the CLIP actors reserve no CPU, so 8 fetch actors of 1 CPU fit in 10 CPUs
    cfg = load_config(None, ["ray.fetch_actors=8", "ray.fetch_num_cpus=1", "clip.actors=4"])
    assert _plan_cpus(cfg, "pairs", True, False, 10.0)["fetch"] == 1.0
    assert _plan_cpus(cfg, "pairs", False, False, 10.0)["fetch"] < 1.0
