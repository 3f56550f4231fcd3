"""The rows of ``docs/migrating.md``: each peer's call and the ema_jax line that reproduces it.

``tests/test_migrating.py`` runs every row against the peer's code transcribed in
``tests/support/anchors.py`` (the function named in ``anchor``) and checks each measured number;
``python docs/migrating_table.py`` writes the table into the doc between
``<!-- BEGIN GENERATED: peers -->`` and ``<!-- END GENERATED: peers -->``.

Run: python docs/migrating_table.py          (rewrites the generated block)
     python docs/migrating_table.py --check  (exit 1 if the doc is out of date)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any
from typing import NamedTuple

DOC = pathlib.Path(__file__).resolve().parent / "migrating.md"
D = 0.999  # the decay of every row, a common one (after 400 calls 67% of the start remains)
CALLS = 400


class Row(NamedTuple):
    """One peer's EMA and ema_jax's line for it.

    ``ours`` is a Python expression in ``ema_jax`` and ``schedules``; ``feed`` says how
    the parameters reach it: ``"as is"`` (one ``update`` per optimizer step),
    ``"first twice"`` (the first step's weights fed twice), ``"zeros"`` (``init`` from
    zeros), ``"keras"`` (the loop writes the EMA into the weights every
    ``ema_overwrite_frequency`` steps, as Keras does). ``exact``: the line reproduces
    the peer (to float64 rounding, or float32 where ``float32``); otherwise
    ``measured`` is how far it is. ``naive``/``measured`` with ``exact``: the tempting
    line and how far *it* is from the peer. A measured number is the largest
    |difference| of any weight after the last of 400 calls, relative to the
    trajectory's range, with 2 significant digits (the tempting line is fed "as is").
    ``bitwise``: equal bit for bit (float32, jitted on XLA:CPU).
    """

    peer: str
    theirs: str
    ours: str
    anchor: str
    anchor_kwargs: Any  # a dict, or a tuple of dicts (one per average)
    differs: str = ""
    feed: str = "as is"
    exact: bool = True
    naive: str | None = None
    measured: str | None = None
    float32: bool = False
    compare_from: int = 0
    bitwise: bool = False


ROWS: tuple[Row, ...] = (
    Row(
        "timm ModelEmaV2",
        "ModelEmaV2(model, decay=d); ema.update(model)",
        "ema_jax.ema(schedules.constant(d))",
        "timm_v2_ema",
        {"decay": D},
        'timm blends as `d*e + (1-d)*m` (nnx.EMA\'s form, `form="nnx"`); the lerp is the'
        " more accurate in float32",
    ),
    Row(
        "timm ModelEmaV3, no `step=`",
        "ModelEmaV3(model, decay=d); ema.update(model)",
        "ema_jax.ema(schedules.constant(d))",
        "timm_ema",
        {"decay": D, "pass_step": False},
    ),
    Row(
        "timm ModelEmaV3, `step=` (timm's train.py)",
        "ModelEmaV3(model, decay=d); ema.update(model, step=num_updates)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "timm_ema",
        {"decay": D},
        "with `step=` timm copies the weights at its first update; `constant(d)` does"
        " not and is off by {measured}",
        naive="ema_jax.ema(schedules.constant(d))",
        measured="0.013",
    ),
    Row(
        "timm ModelEmaV3, `use_warmup=True`, `step=`",
        "ModelEmaV3(model, decay=d, use_warmup=True, warmup_gamma=1.0, warmup_power=0.75);"
        " ema.update(model, step=num_updates)",
        "ema_jax.ema(schedules.warmup_power(decay=d, inv_gamma=1.0, power=0.75))",
        "timm_ema",
        {"decay": D, "use_warmup": True, "warmup_gamma": 1.0, "warmup_power": 0.75},
    ),
    Row(
        "timm ModelEmaV3, `use_warmup=True`, no `step=`",
        "ModelEmaV3(model, decay=d, use_warmup=True); ema.update(model)",
        "ema_jax.ema(schedules.constant(d))",
        "timm_ema",
        {"decay": D, "use_warmup": True, "pass_step": False},
        "without `step=` timm ignores its warmup (`get_decay(None)` is `decay`): the"
        " warmup you asked for, `warmup_power(decay=d)`, is off by {measured}",
        naive="ema_jax.ema(schedules.warmup_power(decay=d))",
        measured="0.33",
    ),
    Row(
        "ema-pytorch EMA",
        "EMA(model, beta=d, update_after_step=100, update_every=10); ema.update()",
        "ema_jax.ema(schedules.warmup_power(decay=d, update_after_step=100, update_period=10))",
        "ema_pytorch_ema",
        {"beta": D, "update_after_step": 100, "update_every": 10, "float32_decay": True},
        "ema-pytorch computes its decay in float32 (a torch tensor); ema_jax in float64:"
        " {measured} apart (equal to 1e-9 with ema-pytorch's decay in float64)",
        exact=False,
        measured="8.5e-09",
    ),
    Row(
        "ema-pytorch KarrasEMA",
        "KarrasEMA(model, sigma_rel=0.1, update_every=1); ema.update()",
        "ema_jax.ema(schedules.power_function(sigma_rel=0.1, batch_size=1))",
        "karras_ema",
        {"sigma_rel": 0.1, "update_every": 1},
        "KarrasEMA reads its step after incrementing it: `(1 - 1/(i+2))**(gamma+1)` where"
        " EDM2 and ema_jax use `(1 - 1/(i+1))**(gamma+1)`; feeding the first weights twice"
        " reproduces it; fed once, ema_jax is off by {measured}",
        feed="first twice",
        naive="ema_jax.ema(schedules.power_function(sigma_rel=0.1, batch_size=1))",
        measured="0.00021",
    ),
    Row(
        "ema-pytorch KarrasEMA, `update_every=10`",
        "KarrasEMA(model, sigma_rel=0.1, update_every=10); ema.update()",
        "ema_jax.ema(schedules.power_function(sigma_rel=0.1, batch_size=1, update_period=10))",
        "karras_ema",
        {"sigma_rel": 0.1, "update_every": 10},
        "KarrasEMA ignores the steps between updates (its profile is far wider than"
        " sigma_rel says); ema_jax's is the power profile, {measured} away",
        exact=False,
        measured="0.25",
    ),
    Row(
        "ema-pytorch PostHocEMA",
        "PostHocEMA(model, sigma_rels=(0.05, 0.28), update_every=1); ema.update()",
        "ema_jax.ema((schedules.power_function(sigma_rel=0.05, batch_size=1),"
        " schedules.power_function(sigma_rel=0.28, batch_size=1)))",
        "karras_ema",
        ({"sigma_rel": 0.05, "update_every": 1}, {"sigma_rel": 0.28, "update_every": 1}),
        "its two KarrasEMAs, in one pass (first weights fed twice, as above); snapshots"
        " and synthesis: `ema_jax.posthoc` (docs/posthoc.md)",
        feed="first twice",
    ),
    Row(
        "diffusers EMAModel",
        "EMAModel(model.parameters(), decay=d); ema.step(model.parameters())",
        "ema_jax.ema(schedules.tf_warmup(d))",
        "diffusers_ema",
        {"decay": D},
    ),
    Row(
        "diffusers EMAModel, `use_ema_warmup=True`",
        "EMAModel(model.parameters(), decay=d, use_ema_warmup=True, inv_gamma=1.0,"
        " power=2/3); ema.step(model.parameters())",
        "ema_jax.ema(schedules.warmup_power(decay=d, inv_gamma=1.0, power=2/3))",
        "diffusers_ema",
        {"decay": D, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 2 / 3},
    ),
    Row(
        "torch AveragedModel, `get_ema_multi_avg_fn`",
        "AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)); ema.update_parameters(model)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "torch_averaged_model_ema",
        {"decay": D},
        "AveragedModel copies the weights at its first call; `constant(d)` is off by {measured}",
        naive="ema_jax.ema(schedules.constant(d))",
        measured="0.013",
    ),
    Row(
        "torch AveragedModel, `get_ema_avg_fn`",
        "AveragedModel(model, avg_fn=get_ema_avg_fn(d)); ema.update_parameters(model)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "torch_averaged_model_ema",
        {"decay": D, "multi_avg_fn": False},
    ),
    Row(
        "torch swa_utils AveragedModel (SWA)",
        "AveragedModel(model); ema.update_parameters(model)",
        "ema_jax.ema(schedules.power_function(gamma=1e-6, batch_size=1))",
        "torch_swa",
        {},
        "SWA's equal average is no EMA; the power function at gamma -> 0 is it, {measured}"
        " away at gamma = 1e-6",
        exact=False,
        measured="1.3e-07",
    ),
    Row(
        "flax nnx.EMA",
        "nnx.EMA(model, decay=d); ema.update(model)",
        "ema_jax.ema(schedules.constant(d))",
        "nnx_ema_float32",
        {"decay": D},
        "the same average, more accurate: after 30,000 float32 updates at 0.9999 the lerp"
        " is under 2e-6 of the range from the exact average, nnx.EMA's two-weight blend"
        " over 1e-5 (tests/test_constant_accuracy.py)",
        float32=True,
    ),
    Row(
        "flax nnx.EMA, bit for bit",
        "nnx.EMA(model, decay=d); ema.update(model)",
        'ema_jax.ema(schedules.constant(d, form="nnx"), nonfinite="propagate")',
        "nnx_ema_float32",
        {"decay": D, "fused": True},
        "nnx.EMA's float32 operations in its order (bit for bit under `nnx.jit`,"
        " tests/test_nnx.py); no guard, as nnx.EMA",
        float32=True,
        bitwise=True,
    ),
    Row(
        "optax incremental_update",
        "ema_params = optax.incremental_update(params, ema_params, step_size=1 - d)",
        "ema_jax.ema(schedules.constant(d))",
        "optax_incremental_update_ema",
        {"step_size": 1 - D},
    ),
    Row(
        "optax ema, `debias=True`",
        "tx = optax.ema(d); averaged, state = tx.update(params, state)",
        "ema_jax.ema(schedules.constant(d, debias=True))",
        "optax_ema_debiased",
        {"decay": D},
    ),
    Row(
        "optax ema, `debias=False`",
        "tx = optax.ema(d, debias=False); averaged, state = tx.update(params, state)",
        "ema_jax.ema(schedules.constant(d))",
        "optax_ema_biased",
        {"decay": D},
        "optax starts from zeros: `init` the EMA from zeros too (`jax.tree.map(jnp.zeros_like,"
        " params)`)",
        feed="zeros",
    ),
    Row(
        "Keras `use_ema=True`",
        "keras.optimizers.SGD(learning_rate, use_ema=True, ema_momentum=d)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "keras_ema",
        {"ema_momentum": D},
        "Keras copies the weights at its first step (momentum 0 at iteration 0)",
        feed="keras",
    ),
    Row(
        "Keras `ema_overwrite_frequency`",
        "keras.optimizers.SGD(learning_rate, use_ema=True, ema_momentum=d,"
        " ema_overwrite_frequency=50)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "keras_ema",
        {"ema_momentum": D, "ema_overwrite_frequency": 50},
        "Keras writes the EMA into the model every 50 steps; ema_jax leaves the weights"
        " alone: do it in the loop, `if (i + 1) % 50 == 0: params = state.ema`",
        feed="keras",
    ),
    Row(
        "Lightning EMAWeightAveraging",
        "Trainer(callbacks=[EMAWeightAveraging(decay=d)])",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d))",
        "lightning_ema",
        {"decay": D},
        "its AveragedModel copies the weights at its first update",
    ),
    Row(
        "Lightning EMAWeightAveraging, period and start",
        "EMAWeightAveraging(decay=d, update_every_n_steps=4, update_starting_at_step=10)",
        "ema_jax.ema(schedules.warmup_power(decay=d, min_decay=d, update_after_step=12,"
        " update_period=4))",
        "lightning_ema",
        {"decay": D, "update_every_n_steps": 4, "update_starting_at_step": 10},
        "equal from its first update (step 12, the first multiple of 4 from 10) on; before"
        " it Lightning keeps the initial weights where ema_jax copies the current ones",
        compare_from=12,
    ),
    Row(
        "TRL BEMACallback",
        "BEMACallback(update_freq=5, update_after=20)",
        "ema_jax.bema(update_period=5, update_after=20)",
        "trl_bema",
        {"update_freq": 5, "update_after": 20},
        "the same numbers step for step; `state.ema` is TRL's running model",
    ),
)

PEERS = (  # every peer the doc must name (tests/test_migrating.py)
    "ModelEmaV2",
    "ModelEmaV3",
    "use_warmup",
    "step=",
    "ema-pytorch EMA",
    "KarrasEMA",
    "PostHocEMA",
    "diffusers EMAModel",
    "AveragedModel",
    "get_ema_multi_avg_fn",
    "swa_utils",
    "nnx.EMA",
    "incremental_update",
    "optax ema",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "EMAWeightAveraging",
    "BEMACallback",
)


def markdown() -> str:
    """The table, one line per row."""
    lines = [
        "| peer | their call | ema_jax | where they differ on purpose |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        differs = row.differs.format(measured=row.measured) if row.differs else "-"
        lines.append(f"| {row.peer} | `{row.theirs}` | `{row.ours}` | {differs} |")
    return "\n".join(lines)


def fill(doc: str) -> str:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import generated_blocks

    return generated_blocks.fill(doc, {"peers": markdown()}, "docs/migrating.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args()
    new = fill(DOC.read_text(encoding="utf-8"))  # puts docs/ on the path
    import generated_blocks

    return generated_blocks.write_or_check(DOC, new, "docs/migrating_table.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
