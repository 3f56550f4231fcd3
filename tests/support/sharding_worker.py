"""Sharding checks on simulated CPU devices: test_sharding.py runs this in subprocesses.

Run as ``python tests/support/sharding_worker.py GROUP WORKDIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. It runs every check of
GROUP ("devices8" on 8 devices, "devices4" on 4, fresh from the checkpoint the
first wrote) and writes WORKDIR/GROUP.json: ``{check: "ok" | traceback}``, so that
each check passes or fails on its own in pytest, with its traceback.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

import ema_jax
from support import sharded

STEPS = 3
SAVED_LAYOUT = "mixed"
# The standalone transform under each way of counting non-finite entries.
EMA_VARIANTS = {
    "default": {},
    "uncounted": {"count_nonfinite": False},
    "unguarded": {"skip_nonfinite": False},
}
CHECKS: dict[str, dict[str, Callable[[Path], None]]] = {"devices8": {}, "devices4": {}}


def check(group: str, name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        CHECKS[group][name] = fn
        return fn

    return register


def assert_same_sharding(got: jax.Array, want: Any, what: str) -> None:
    want = want.sharding if isinstance(want, jax.Array) else want
    assert got.sharding.is_equivalent_to(want, got.ndim), f"{what}: {got.sharding} != {want}"


def assert_ema_follows(state: ema_jax.EmaTrainState, what: str) -> None:
    for path, src, ema in sharded.params_and_ema_pairs(state):
        assert_same_sharding(ema, src, f"{what} EMA{path}")


@functools.cache
def host_variables(param_dtype: Any) -> dict[str, Any]:
    """The model's initial variables as NumPy arrays."""
    model = sharded.ShardNet(param_dtype=param_dtype)
    init = jax.jit(model.init)
    return jax.device_get(init(jax.random.key(0), jnp.ones((2, sharded.IN))))


def placed_params(layout: sharded.Layout, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Model variables put on the layout's mesh leaf by leaf (no jit)."""
    mesh = sharded.make_mesh(layout)
    variables = host_variables(param_dtype)
    return jax.device_put(variables, sharded.shardings_for(variables, mesh, layout.rule))


def _result_shapes(hlo: str, op: str) -> list[str]:
    types = re.findall(rf"=\s*(\([^)]*\)|\S+)\s+{op}(?:-start)?\(", hlo)
    return [shape for t in types for shape in re.findall(r"\w+\[[^\]]*\]", t)]


def all_reduce_operand_shapes(hlo: str) -> list[str]:
    """The result shapes of every all-reduce in ``hlo`` (``f32[]`` for a scalar)."""
    return _result_shapes(hlo, "all-reduce")


def all_gather_shapes(hlo: str) -> list[str]:
    """The result shapes of every all-gather in ``hlo``."""
    return _result_shapes(hlo, "all-gather")


# --- The standalone transform: init and update ----------------------------------------


def _check_init(names: list[str], explicit: bool) -> None:
    for name in names:
        layout = sharded.LAYOUTS[name]
        dtypes = [(jnp.float32, None)]
        if name in ("fsdp", "mixed"):  # an fp32 EMA of bf16 parameters
            dtypes.append((jnp.bfloat16, jnp.float32))
        for param_dtype, ema_dtype in dtypes:
            params = placed_params(layout, param_dtype)
            if explicit:  # the same shardings on a mesh with Explicit axes (make_mesh's default)
                mesh = jax.make_mesh(layout.mesh_shape, layout.axis_names)
                params = jax.device_put(params, sharded.shardings_for(params, mesh, layout.rule))
            ema = sharded.make_ema(ema_dtype=ema_dtype)
            eager = ema.init(params)
            inits = [("eager", eager)]
            if name in ("fsdp", "mixed"):
                # Eager init's step counters are uncommitted: they go with sharded inputs.
                jax.block_until_ready(jax.jit(ema.update)(params, eager))
                inits.append(("jit", jax.jit(ema.init)(params)))
            for how, state in inits:
                what = f"{name} {how} init, {np.dtype(param_dtype)} params"
                for (p_path, p), e in zip(
                    jax.tree_util.tree_flatten_with_path(params)[0],
                    jax.tree.leaves(state.ema),
                    strict=True,
                ):
                    assert_same_sharding(e, p, f"{what}: ema{jax.tree_util.keystr(p_path)}")
                    assert e.dtype == (ema_dtype or p.dtype), (what, e.dtype)
                    np.testing.assert_array_equal(
                        np.asarray(e, np.float32), np.asarray(p, np.float32)
                    )


@check("devices8", "init_keeps_the_sharding_of_every_leaf")
def _(path: Path) -> None:
    _check_init(list(sharded.LAYOUTS), explicit=False)


@check("devices8", "init_keeps_the_sharding_on_explicit_axes")
def _(path: Path) -> None:
    _check_init(["fsdp", "mixed"], explicit=True)


@functools.cache
def compiled_update(name: str, variant: str) -> tuple[Any, Any, Any]:
    """(params, moved params, the update jitted without out_shardings and compiled)."""
    params = placed_params(sharded.LAYOUTS[name])
    moved = jax.tree.map(lambda p: p * 1.5 + 0.25, params)
    ema = sharded.make_ema(**EMA_VARIANTS[variant])
    update = jax.jit(ema.update, donate_argnums=1)
    return params, moved, update.lower(moved, ema.init(params)).compile()


@check("devices8", "update_keeps_the_sharding_and_the_values")
def _(path: Path) -> None:
    for variant, kwargs in EMA_VARIANTS.items():
        ema = sharded.make_ema(**kwargs)
        local_update = jax.jit(ema.update)
        for name in sharded.LAYOUTS:
            params, moved, update = compiled_update(name, variant)
            state = update(moved, ema.init(params))
            # Elementwise math: the sharded update equals the one-device update, bit for bit.
            local = local_update(jax.device_get(moved), ema.init(jax.device_get(params)))
            for p, e, want in zip(
                jax.tree.leaves(params),
                jax.tree.leaves(state.ema),
                jax.tree.leaves(local.ema),
                strict=True,
            ):
                assert_same_sharding(e, p, f"{name}/{variant} update")
                np.testing.assert_array_equal(np.asarray(e), np.asarray(want))


@check("devices8", "update_communicates_only_to_count_nonfinite")
def _(path: Path) -> None:
    for name, layout in sharded.LAYOUTS.items():
        for variant in EMA_VARIANTS:
            hlo = compiled_update(name, variant)[2].as_text()
            found = sharded.collectives(hlo)
            if variant == "default" and name not in ("replicated", "data_parallel"):
                # sum(p - p) over a sharded leaf: a scalar all-reduce per mesh axis, no more.
                assert found and set(found) == {"all-reduce"}, (name, found)
                shapes = all_reduce_operand_shapes(hlo)
                assert all(s.endswith("[]") for s in shapes), (name, shapes)
                assert len(found) <= len(layout.mesh_shape), (name, found)
            else:
                assert found == [], f"{name}/{variant}: {found}"


# --- EmaTrainState: create and a sharded train step -----------------------------------


@check("devices8", "a_donated_update_compiles_once_from_inits_state")
def _(path: Path) -> None:
    # init used to leave the counters on one device (and, host-resident, spell a leaf's
    # sharding as the parameter's, not as the update returns it): the jitted update
    # compiled twice, once for init's state and once for its own output.
    fast, slow = ema_jax.schedules.constant(0.9), ema_jax.schedules.constant(0.99)
    transforms = {
        "one": lambda kind: ema_jax.ema(fast, memory_kind=kind),
        "two": lambda kind: ema_jax.ema({"fast": fast, "slow": slow}, memory_kind=kind),
        "bema": lambda kind: ema_jax.bema(update_period=1, memory_kind=kind),
    }
    for name in sharded.LAYOUTS:
        params = placed_params(sharded.LAYOUTS[name])
        for what, make in transforms.items():
            for kind in (None, "pinned_host"):
                ema = make(kind)
                update = jax.jit(ema.update, donate_argnums=1)
                state = ema.init(params)
                for _ in range(3):
                    state = update(params, state)
                jax.block_until_ready(state)
                assert update._cache_size() == 1, (name, what, kind, update._cache_size())


@check("devices8", "create_puts_the_ema_on_the_parameters_shards")
def _(path: Path) -> None:
    for name, layout in sharded.LAYOUTS.items():
        for param_dtype, ema_dtype in [(jnp.float32, None), (jnp.bfloat16, jnp.float32)]:
            variables = placed_params(layout, param_dtype)
            ema = sharded.make_ema(ema_dtype=ema_dtype)

            def create(variables: Any, ema: Any = ema, param_dtype: Any = param_dtype) -> Any:
                return ema_jax.EmaTrainState.create(
                    apply_fn=sharded.ShardNet(param_dtype=param_dtype).apply,
                    params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    tx=optax.sgd(0.1, momentum=0.9),
                    ema=ema,
                )

            for how, state in [("eager", create(variables)), ("jit", jax.jit(create)(variables))]:
                assert_ema_follows(state, f"{name} {how} create {np.dtype(param_dtype)}")
                for _, src, e in sharded.params_and_ema_pairs(state):
                    assert e.dtype == (ema_dtype or src.dtype)


@functools.cache
def reference_run() -> list[ema_jax.EmaTrainState]:
    """The training on one device: states after 0..STEPS steps."""
    layout = sharded.LAYOUTS["replicated"]
    mesh = sharded.make_mesh(layout, shape=(1,), devices=jax.devices()[:1])
    states = [sharded.create_state(sharded.make_ema(count_nonfinite=False))]
    step = jax.jit(sharded.train_step)
    for i in range(STEPS):
        states.append(step(states[-1], *sharded.global_batch(i, mesh, layout.batch_spec))[0])
    return states


KINDS = {  # the EMA of each kind of train state (None: no EMA)
    "plain": None,
    "uncounted": sharded.make_ema(count_nonfinite=False),
    "default": sharded.make_ema(),
}


class Compiled(NamedTuple):
    state: Any
    shardings: Any
    step: Any  # jax.stages.Compiled
    mesh: jax.sharding.Mesh


def compiled_step(name: str, kind: str, loose: bool = False) -> Compiled:
    """The train step on layout ``name`` for a state of ``kind``, compiled once.

    The state's layout is pinned (``out_shardings``) and the gradients constrained
    to the parameters' shardings, the recipe of docs/scaling.md; ``loose`` leaves
    the gradients where XLA puts them.
    """
    return _compiled_step(name, kind, loose)  # one cache key however it is called


@functools.cache
def _compiled_step(name: str, kind: str, loose: bool) -> Compiled:
    layout = sharded.LAYOUTS[name]
    mesh = sharded.make_mesh(layout)
    state = sharded.sharded_state(KINDS[kind], mesh, layout.rule)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    batch = sharded.global_batch(0, mesh, layout.batch_spec)
    fn = sharded.make_train_step(None if loose else shardings.params)
    step = jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None))
    return Compiled(state, shardings, step.lower(state, *batch).compile(), mesh)


def step_collectives(name: str, kind: str, loose: bool = False) -> Counter[str]:
    return Counter(sharded.collectives(compiled_step(name, kind, loose).step.as_text()))


@check("devices8", "train_step_keeps_the_ema_on_the_parameters_shards")
def _(path: Path) -> None:
    want = reference_run()[-1]
    for name, layout in sharded.LAYOUTS.items():
        c = compiled_step(name, "uncounted")
        state = jax.tree.map(jnp.copy, c.state)  # the step donates its input
        for i in range(STEPS):
            state, _ = c.step(state, *sharded.global_batch(i, c.mesh, layout.batch_spec))
            assert_ema_follows(state, f"{name} step {i}")
            for got, s in zip(jax.tree.leaves(state), jax.tree.leaves(c.shardings), strict=True):
                assert_same_sharding(got, s, f"{name} step {i}: pinned layout")
        # The sharded run computes what one device computes.
        for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


@check("devices8", "unpinned_train_step_moves_the_ema_with_the_parameters")
def _(path: Path) -> None:
    # Without out_shardings XLA may re-shard the parameters (here it splits the
    # replicated Dense_0 bias over "model"): the EMA goes where they go.
    layout = sharded.LAYOUTS["mixed"]
    mesh = sharded.make_mesh(layout)
    state = sharded.sharded_state(KINDS["uncounted"], mesh, layout.rule)
    before = state.params["Dense_0"]["bias"].sharding
    step = jax.jit(sharded.train_step, donate_argnums=0)
    for i in range(STEPS):
        state, _ = step(state, *sharded.global_batch(i, mesh, layout.batch_spec))
        assert_ema_follows(state, f"unpinned step {i}")
    moved = state.params["Dense_0"]["bias"].sharding
    assert not moved.is_equivalent_to(before, 1), "XLA kept the layout: the check is vacuous"


@check("devices8", "train_step_adds_no_collectives")
def _(path: Path) -> None:
    for name in sharded.LAYOUTS:
        plain, uncounted = step_collectives(name, "plain"), step_collectives(name, "uncounted")
        assert uncounted == plain, f"{name}: {uncounted} with the EMA, {plain} without"
    for name in ("fsdp", "mixed"):  # the default also counts non-finite entries
        plain, default = step_collectives(name, "plain"), step_collectives(name, "default")
        extra = default - plain
        assert set(extra) <= {"all-reduce"} and not plain - default, (name, default, plain)


@check("devices8", "without_the_gradient_constraint_the_ema_is_gathered_like_the_momentum")
def _(path: Path) -> None:
    # "mixed" pins Dense_0's bias replicated while its gradient comes out split over
    # "model": XLA updates it split and all-gathers the results, the new parameter
    # and momentum, and then the EMA too. The same shape, and nothing else.
    plain, ema = (
        Counter(all_gather_shapes(compiled_step("mixed", k, loose=True).step.as_text()))
        for k in ("plain", "uncounted")
    )
    assert ema - plain == Counter({"f32[32]": 1}) and plain["f32[32]"] == 2, (plain, ema)
    assert step_collectives("mixed", "uncounted", loose=True) - Counter(
        {"all-gather": 1}
    ) == step_collectives("mixed", "plain", loose=True)
    # A layout that agrees with its gradients needs no constraint.
    assert step_collectives("fsdp", "plain", True) == step_collectives("fsdp", "uncounted", True)


@check("devices8", "ema_memory_per_device_is_its_share")
def _(path: Path) -> None:
    for name in sharded.LAYOUTS:
        c = compiled_step(name, "uncounted")
        ema_leaves = jax.tree.leaves(dict(c.state.ema_state.ema))
        total = sum(e.nbytes for e in ema_leaves)
        share = sum(
            e.nbytes // len({str(s.index) for s in e.addressable_shards}) for e in ema_leaves
        )
        for device in jax.devices():
            held = sum(
                s.data.nbytes
                for e in ema_leaves
                for s in e.addressable_shards
                if s.device == device
            )
            assert held == share, (name, device, held, share)
        if name == "fsdp":  # every leaf split 8 ways
            assert share * 8 == total, (share, total)
        # The compiled step takes exactly that share more per device as arguments, and
        # its scratch memory grows by less than it: no gathered copy of the EMA.
        plain = compiled_step(name, "plain").step.memory_analysis()
        mine = c.step.memory_analysis()
        counters = 2 * 4  # ema_state.step and nonfinite_updates, int32 scalars
        assert mine.argument_size_in_bytes - plain.argument_size_in_bytes == share + counters
        assert mine.temp_size_in_bytes - plain.temp_size_in_bytes <= share, (name, mine, plain)


@check("devices8", "fp32_ema_of_bf16_params_takes_twice_their_share")
def _(path: Path) -> None:
    layout = sharded.LAYOUTS["fsdp"]
    mesh = sharded.make_mesh(layout)
    ema = sharded.make_ema(ema_dtype=jnp.float32, count_nonfinite=False)
    state = sharded.sharded_state(ema, mesh, layout.rule, param_dtype=jnp.bfloat16)
    pairs = sharded.params_and_ema_pairs(state)
    for path_, src, e in pairs:
        assert src.dtype == jnp.bfloat16 or "batch_stats" in path_, (path_, src.dtype)
        assert e.dtype == jnp.float32

    def per_device(leaves: list[jax.Array]) -> int:
        return sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)

    params = [src for p, src, _ in pairs if "batch_stats" not in p]
    emas = [e for p, _, e in pairs if "batch_stats" not in p]
    assert per_device(emas) == 2 * per_device(params)
    assert per_device(emas) * 8 == sum(e.nbytes for e in emas)


# --- Checkpoints: save on 8 devices, restore on 8, 4 and 1 ----------------------------


def flat_by_path(tree: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in flat}


Target = Callable[[Any], Any]  # an abstract state -> its shardings


def restore_and_check(ckpt: Path, targets: dict[str, Target], saved: dict[str, np.ndarray]) -> None:
    """Restores onto each target layout: same values bit for bit, shardings as asked."""
    ema = sharded.make_ema(count_nonfinite=False)
    abstract = jax.eval_shape(lambda: sharded.create_state(ema))
    manager = ocp.CheckpointManager(ckpt)
    try:
        for label, shardings_of in targets.items():
            # The abstract state, its shardings and the train step share one tx and
            # apply_fn: jit and orbax compare those static fields.
            shardings = shardings_of(abstract)
            target = sharded.abstract_like(abstract, shardings)
            state = manager.restore(STEPS, args=ocp.args.StandardRestore(target))
            assert isinstance(state, ema_jax.EmaTrainState) and state.ema == ema, label
            for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
                assert_same_sharding(got, want, f"restored on {label}")
            got = flat_by_path(state)
            assert got.keys() == saved.keys(), label
            for key, value in saved.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{label}: {key}")
            # Training goes on from the restored layout, EMA on the parameters' shards.
            step = jax.jit(
                sharded.make_train_step(shardings.params), out_shardings=(shardings, None)
            )
            batch = sharded.numpy_batch(STEPS)  # uncommitted: jit puts it on the state's devices
            state, _ = step(state, *batch)
            assert_ema_follows(state, f"after a step on {label}")
            assert int(state.ema_state.step) == STEPS + 1, label
    finally:
        manager.close()


def by_rule(name: str, shape: tuple[int, ...], devices: list[Any]) -> Target:
    layout = sharded.LAYOUTS[name]
    mesh = sharded.make_mesh(layout, shape=shape, devices=devices)
    return lambda abstract: sharded.shardings_for(abstract, mesh, layout.rule)


def restore_targets(devices: list[Any]) -> dict[str, Target]:
    """Layouts to restore onto: FSDP over ``devices``, 2 x 2 tensor parallel, one device."""
    n = len(devices)
    one = SingleDeviceSharding(devices[0])
    return {
        f"fsdp on {n}": by_rule("fsdp", (n,), devices),
        "tensor parallel on 2x2": by_rule("tensor_parallel", (2, 2), devices[-4:]),
        "one device": lambda abstract: jax.tree.map(lambda _: one, abstract),
    }


@check("devices8", "checkpoint_restores_on_8_4_and_1_devices")
def _(path: Path) -> None:
    layout = sharded.LAYOUTS[SAVED_LAYOUT]
    c = compiled_step(SAVED_LAYOUT, "uncounted")
    state = jax.tree.map(jnp.copy, c.state)
    for i in range(STEPS):
        state, _ = c.step(state, *sharded.global_batch(i, c.mesh, layout.batch_spec))
    manager = ocp.CheckpointManager(path / "ckpt")
    manager.save(STEPS, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    saved = flat_by_path(state)
    np.savez(path / "state.npz", **saved)
    targets = {f"{SAVED_LAYOUT} on 8": by_rule(SAVED_LAYOUT, layout.mesh_shape, jax.devices())}
    targets |= restore_targets(jax.devices()[:4])
    restore_and_check(path / "ckpt", targets, saved)


@check("devices4", "fresh_process_restores_on_4_and_1_devices")
def _(path: Path) -> None:
    assert (path / "ckpt").exists(), "the 8-device save did not run or failed"
    with np.load(path / "state.npz") as data:
        saved = {k: data[k] for k in data.files}
    restore_and_check(path / "ckpt", restore_targets(jax.devices()), saved)


def main(group: str, workdir: Path) -> None:
    want = {"devices8": 8, "devices4": 4}[group]
    assert jax.device_count() == want, f"{group} needs {want} devices, got {jax.devices()}"
    results = {}
    for name, fn in CHECKS[group].items():
        start = time.perf_counter()
        try:
            fn(workdir)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    (workdir / f"{group}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
