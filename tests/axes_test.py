"""aya_jax.axes: every preset maps every logical axis, to mesh axes only."""

import pytest

from aya_jax import axes


@pytest.mark.parametrize("preset", sorted(axes.PRESETS))
def test_rules_name_every_logical_axis_once_and_only_mesh_axes(preset):
  table = axes.rules(preset)
  names = [name for name, _ in table]
  assert sorted(names) == sorted(axes.LOGICAL_AXES)  # each once: no shadowed rule
  for _, target in table:
    targets = target if isinstance(target, tuple) else (target,)
    assert all(t is None or t in axes.MESH_AXES for t in targets)


def test_presets_shard_what_their_names_say():
  dp, fsdp, tp = (dict(axes.rules(p)) for p in ("dp", "fsdp", "fsdp_tp"))
  assert dp["batch"] == ("data", "fsdp") and dp["embed"] is None and dp["vocab"] is None
  assert fsdp["embed"] == "fsdp" and fsdp["mlp"] is None and fsdp["heads"] is None
  assert tp["embed"] == "fsdp" and tp["mlp"] == tp["heads"] == tp["vocab"] == "tensor"
  assert all(r["length"] is None for r in (dp, fsdp, tp))  # sequences are never split


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown sharding preset 'fsdp_pt'.*'dp', 'fsdp'"):
    axes.rules("fsdp_pt")
