"""Other libraries' weight EMAs, transcribed literally into plain NumPy: the anchors.

Each anchor is a function ``<library>_ema(trajectory, **hyperparameters)`` that returns the
list of EMA values after each call, and, where the anchor has a schedule, a function
``<library>_decay(i, **hyperparameters)`` that returns the decay it uses at our call ``i``.

Conventions, the same as ``pycls_reference.py``:

* ``trajectory[0]`` is the initial model; ``trajectory[i + 1]`` is the model after optimizer
  step ``i``. A model is a NumPy array or a (nested) dict of arrays.
* The EMA is called once per optimizer step, right after it: our call ``i`` (0-based) sees
  ``trajectory[i + 1]``. Each docstring says which of the anchor's counters call ``i`` is,
  and the returned list has one entry per call: ``out[i]`` is the EMA after call ``i``.
* The EMA before the first call is whatever the anchor starts from (a copy of
  ``trajectory[0]`` for most; zeros for the debiased ones).
* A decay function returns the anchor's decay ``d`` at call ``i`` (the blend keeps ``d`` of
  the old EMA); ``0.0`` where the anchor copies the model or blends with weight 1, and
  ``None`` where the anchor leaves the EMA untouched.
* Arithmetic is float64 with the anchor's order of operations, except ``nnx_ema_float32``
  (float32, to be bit-identical to flax) and where a docstring says the anchor rounds its
  decay to float32 first (TensorFlow, praxis, ema-pytorch: a flag turns that off).
* Non-float leaves follow what each anchor does with integer tensors (said per anchor).

Sources were read at the revisions named in each docstring; "wheel" means the file as
shipped in that release on PyPI. EDM2's power-function EMA is written from the paper's
equations only (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024), not from its code.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

Tree = Any  # an np.ndarray or a dict of Trees


def _map(fn: Callable[..., np.ndarray], *trees: Tree) -> Tree:
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*(np.asarray(t) for t in trees))


def _is_float(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating)


def _copy64(tree: Tree) -> Tree:
    """A copy with float leaves as float64 and the other leaves as they are."""
    return _map(lambda x: np.array(x, np.float64 if _is_float(x) else x.dtype), tree)


def torch_lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """``torch.lerp(start, end, weight)`` with a scalar weight, in ``start``'s float dtype.

    ATen's scalar formula (pytorch/pytorch ``aten/src/ATen/native/cpu/LerpKernel.cpp`` at
    d5cc3c9, ``lerp_kernel_scalar``; later moved to ``aten/src/ATen/native/Lerp.h``,
    ``lerp()`` with ``is_lerp_weight_small``: "return is_lerp_weight_small(weight) ? self +
    weight * (end - self) : end - (end - self) * (opmath_t(1) - weight)"), with the weight
    first converted to the tensor's type (``weight.to<scalar_t>()``). Newer CPU kernels
    vectorise it as ``fmadd(coeff, end - start, base)`` with ``coeff = weight`` or
    ``weight - 1``, and CUDA builds may contract it to an FMA: those round once where this
    rounds twice, so float32 agreement with them is to an ulp, not bitwise.
    """
    start = np.asarray(start)
    dtype = start.dtype.type
    w = dtype(weight)
    if abs(w) < dtype(0.5):
        return start + w * (end - start)
    return end - (end - start) * (dtype(1) - w)


# --- 1. timm ModelEmaV3 ------------------------------------------------------------------


def timm_decay(
    i: int,
    *,
    decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    pass_step: bool = True,
) -> float:
    """timm ``ModelEmaV3.get_decay(step)`` at our call ``i``.

    Source: huggingface/pytorch-image-models ``timm/utils/model_ema.py`` (timm 1.0.31
    wheel, lines 251-268; the same body at commit 0a044bf): "step = max(0, step -
    self.update_after_step - 1)", "if step <= 0: return 0.0", "decay = 1 - (1 + step /
    self.warmup_gamma) ** -self.warmup_power", "decay = max(min(decay, self.decay),
    self.min_decay)". With ``step=None`` it returns ``self.decay`` (no warmup, no copy).

    At our call i, timm's ``train.py`` has just done "num_updates += 1" and calls
    "model_ema.update(model, step=num_updates)", so step = i + 1 and the warmup uses
    ``max(0, i - update_after_step)`` (``num_updates`` starts at ``epoch *
    updates_per_epoch``, so the count is global across epochs). ``pass_step=False`` is
    ``update(model)`` with no step, as older train.py versions (ModelEmaV2) did.
    """
    if not pass_step:
        return decay
    step = max(0, (i + 1) - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        d = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(d, decay), min_decay)
    return decay


def timm_ema(trajectory: Sequence[Tree], **hyper: Any) -> list[Tree]:
    """timm ``ModelEmaV3.update(model, step)``, once per optimizer step.

    Source: timm 1.0.31 wheel ``timm/utils/model_ema.py`` ``update`` (lines 271-276) and
    ``apply_update_`` (lines 310-328): float tensors "lerp(..., weight=1. - decay)", other
    tensors "ema_v.copy_(model_v)". The EMA starts as ``deepcopy(model)`` (trajectory[0]);
    there is no update_every. At our call i, step = i + 1 (see ``timm_decay``), so with the
    defaults call 0 (and every call up to ``update_after_step``) copies the model via a lerp
    of weight 1.
    """
    ema = _copy64(trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        d = timm_decay(i, **hyper)
        ema = _map(lambda e, m, d=d: torch_lerp(e, m, 1.0 - d) if _is_float(e) else m, ema, model)
        out.append(ema)
    return out


# --- 2. ema-pytorch EMA and KarrasEMA --------------------------------------------------


def ema_pytorch_decay(
    i: int,
    *,
    beta: float = 0.9999,
    update_after_step: int = 100,
    update_every: int = 10,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_value: float = 0.0,
    float32_decay: bool = True,
) -> float | None:
    """ema-pytorch ``EMA``: what call ``i`` of ``update()`` does (None = nothing, 0.0 = copy).

    Source: lucidrains/ema-pytorch ``ema_pytorch/ema_pytorch.py`` (ema-pytorch 0.8.3 wheel,
    ``get_current_decay`` lines 270-277, ``update`` lines 279-301). ``update`` reads "step =
    self.step.item()", then "self.step += 1", so at our call i ``step == i`` and
    ``get_current_decay`` (called later, inside ``update_moving_average``) sees ``self.step
    == i + 1``: "epoch = (self.step - self.update_after_step - 1).clamp(min = 0.)", i.e.
    ``epoch = max(i - update_after_step, 0)``, "value = 1 - (1 + epoch / self.inv_gamma) **
    - self.power", "if epoch.item() <= 0: return 0.", "value.clamp(min = self.min_value, max =
    self.beta).item()". Call 0 copies (the ``initted`` branch); later calls copy when
    ``step % update_every == 0 and step <= update_after_step`` and blend when ``step %
    update_every == 0`` after that. ``beta == 1`` freezes the EMA (``is_frozen``).

    ``epoch`` is a torch tensor: ``clamp(min=0.)`` of an int64 tensor gives a float32 tensor
    (clamp's bounds take part in type promotion since pytorch/pytorch PR 77035), so the decay
    is computed and clamped in float32 and handed on as that float32 value;
    ``float32_decay=True`` mirrors it with NumPy float32 (its ``pow`` may differ from
    torch's by an ulp; not checked against torch here).
    """
    step = i
    if step == 0:
        return 0.0
    if step % update_every != 0:
        return None
    if step <= update_after_step:
        return 0.0
    if beta == 1.0:
        return None
    f = np.float32 if float32_decay else np.float64
    epoch = f(max((step + 1) - update_after_step - 1, 0))
    value = f(1) - (f(1) + epoch / f(inv_gamma)) ** -f(power)
    if epoch <= 0:
        return 0.0
    return float(np.clip(value, f(min_value), f(beta)))


def ema_pytorch_ema(trajectory: Sequence[Tree], **hyper: Any) -> list[Tree]:
    """ema-pytorch ``EMA.update()``, called once after each optimizer step.

    Source: ema-pytorch 0.8.3 wheel ``ema_pytorch/ema_pytorch.py`` lines 279-301 (update),
    304-379 (update_moving_average: "self.inplace_lerp(tgt, src, 1. - current_decay)", i.e.
    ``tensor.lerp_``), 244-251 (copy_params_from_model_to_ema). At our call i,
    ``self.step`` is i before the call and i + 1 after it; see ``ema_pytorch_decay``.
    The EMA starts as ``deepcopy(model)``; only float (and complex) parameters and buffers
    are tracked (``parameter_names``/``buffer_names``, lines 202-203): integer leaves keep
    their initial values, even through the copies.

    Older versions differ: at commit b0d4346 ``update`` returned unless ``step %
    update_every == 0``, copied while ``step <= update_after_step`` and otherwise copied once
    (``initted``) then blended in the same call; there was no copy at call 0.
    """
    ema = _copy64(trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        d = ema_pytorch_decay(i, **hyper)
        if d is not None:
            ema = _map(
                lambda e, m, d=d: torch_lerp(e, m, 1.0 - d) if _is_float(e) else e, ema, model
            )
        out.append(ema)
    return out


def karras_ema_beta(i: int, gamma: float, *, update_every: int = 100) -> float | None:
    """ema-pytorch ``KarrasEMA.beta`` at our call ``i`` (None when the call does nothing).

    Source: ema-pytorch 0.8.3 wheel ``ema_pytorch/post_hoc_ema.py`` lines 136-138: "return
    (1. - 1. / (self.step.item() + 1.)) ** (1. + self.gamma)", read inside
    ``update_moving_average`` after ``update`` (lines 177-188) did "self.step += 1", so at
    our call i it is ``(1 - 1 / (i + 2)) ** (1 + gamma)``: the paper's ``(1 - 1/t) **
    (gamma + 1)`` with t = i + 2, one more than the number of steps taken. ``update`` returns
    unless "step % self.update_every == 0" (step = i), and beta does not depend on
    ``update_every``: updating every k steps uses the one-step beta each time (the time
    between updates is ignored), which is not the power-function EMA of the paper.
    """
    if i % update_every != 0:
        return None
    return (1.0 - 1.0 / ((i + 1) + 1.0)) ** (1.0 + gamma)


def karras_ema(
    trajectory: Sequence[Tree],
    *,
    gamma: float | None = None,
    sigma_rel: float | None = None,
    update_every: int = 100,
) -> list[Tree]:
    """ema-pytorch ``KarrasEMA.update()`` (the EMA inside ``PostHocEMA``), once per step.

    Source: ema-pytorch 0.8.3 wheel ``ema_pytorch/post_hoc_ema.py``: ``sigma_rel_to_gamma``
    (lines 43-45, "np.roots([1, 7, 16 - t, 12 - t]).real.max()"), ``__init__`` (lines
    69-74), ``update`` (lines 177-188: skip unless ``step % update_every == 0``; the first
    such call copies the model, "self.initted", then blends), ``update_moving_average``
    (lines 216-254: "lerp(ma_params.data, current_params.data, 1. - current_decay)").
    At our call i, ``self.step`` is i before the call (see ``karras_ema_beta``); call 0
    copies ``trajectory[1]`` and its blend with beta = 2 ** -(gamma + 1) changes nothing.
    Only float/complex leaves are tracked; integer leaves keep their initial values.
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError("give exactly one of gamma and sigma_rel")
    if gamma is None:
        t = sigma_rel**-2
        gamma = float(np.roots([1, 7, 16 - t, 12 - t]).real.max())
    ema = _copy64(trajectory[0])
    initted = False
    out = []
    for i, model in enumerate(trajectory[1:]):
        beta = karras_ema_beta(i, gamma, update_every=update_every)
        if beta is not None:
            if not initted:
                ema = _map(lambda e, m: np.array(m, e.dtype) if _is_float(e) else e, ema, model)
                initted = True
            ema = _map(
                lambda e, m, b=beta: torch_lerp(e, m, 1.0 - b) if _is_float(e) else e, ema, model
            )
        out.append(ema)
    return out


# --- 3. diffusers EMAModel --------------------------------------------------------------


def diffusers_decay(
    i: int,
    *,
    decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_ema_warmup: bool = False,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
) -> float:
    """diffusers ``EMAModel.get_decay(optimization_step)`` at our call ``i``.

    Source: huggingface/diffusers ``src/diffusers/training_utils.py`` (diffusers 0.42.1
    wheel, lines 738-755): "step = max(0, optimization_step - self.update_after_step - 1)",
    "if step <= 0: return 0.0", warmup "1 - (1 + step / self.inv_gamma) ** -self.power",
    else "(1 + step) / (10 + step)", then "min(cur_decay_value, self.decay)" and
    "max(cur_decay_value, self.min_decay)". ``step()`` does "self.optimization_step += 1"
    before calling it (line 774), so at our call i optimization_step = i + 1 and the
    schedule uses ``max(0, i - update_after_step)``. The training scripts call
    ``ema_unet.step(unet.parameters())`` once per ``accelerator.sync_gradients``, i.e. once
    per optimizer step.
    """
    step = max(0, (i + 1) - update_after_step - 1)
    if step <= 0:
        return 0.0
    d = 1 - (1 + step / inv_gamma) ** -power if use_ema_warmup else (1 + step) / (10 + step)
    d = min(d, decay)
    return max(d, min_decay)


def diffusers_ema(trajectory: Sequence[Tree], **hyper: Any) -> list[Tree]:
    """diffusers ``EMAModel.step(parameters)``, once per optimizer step.

    Source: diffusers 0.42.1 wheel ``src/diffusers/training_utils.py`` lines 758-813:
    "one_minus_decay = 1 - decay", "s_param.sub_(one_minus_decay * (s_param - param))" for
    parameters that require grad, "s_param.copy_(param)" for the others (non-float leaves
    here). The shadow starts as "p.clone().detach()" (line 691). The warm-up "copy" (decay
    0) is this subtraction with weight 1, ``s - (s - p)``, which is not always bitwise ``p``.
    """
    ema = _copy64(trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        omd = 1 - diffusers_decay(i, **hyper)
        ema = _map(lambda s, p, omd=omd: s - omd * (s - p) if _is_float(s) else p, ema, model)
        out.append(ema)
    return out


# --- 4. TensorFlow ExponentialMovingAverage and praxis ---------------------------------


def tf_decay(
    i: int, *, decay: float, num_updates_offset: int | None = 1, float32_decay: bool = True
) -> float:
    """``tf.train.ExponentialMovingAverage(decay, num_updates)`` decay at our call ``i``.

    Source: tensorflow/tensorflow ``tensorflow/python/training/moving_averages.py``,
    ``ExponentialMovingAverage.apply``: at commit d9cf039 "decay =
    ops.convert_to_tensor(self._decay, name='decay')" (a Python float becomes float32;
    later versions say "dtype=dtypes.float32"), "num_updates =
    math_ops.cast(self._num_updates, dtypes.float32, name='num_updates')", "decay =
    math_ops.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))": all float32.

    ``num_updates`` is whatever tensor the user passed, read when the averaging op runs:
    usually the global step. Built as ``with tf.control_dependencies([apply_gradient_op]):
    ema.apply(...)``, with ``apply_gradients(..., global_step=global_step)``, it reads the
    incremented step, so num_updates = i + 1 (``num_updates_offset=1``). The cifar10-style
    ``tf.group(apply_gradient_op, variables_averages_op)`` leaves the two ops unordered
    (the read may see i or i + 1, and the variable before or after the step).
    ``num_updates_offset=None`` is no ``num_updates``: the constant decay.
    """
    f = np.float32 if float32_decay else np.float64
    d = f(decay)
    if num_updates_offset is not None:
        n = f(i + num_updates_offset)
        d = min(d, (f(1.0) + n) / (f(10.0) + n))
    return float(d)


def tf_ema(trajectory: Sequence[Tree], **hyper: Any) -> list[Tree]:
    """``ExponentialMovingAverage.apply`` run once after each optimizer step.

    Source: ``moving_averages.py`` ``assign_moving_average``: "decay =
    ops.convert_to_tensor(1.0 - decay, name='decay')" (float32, then cast to the variable's
    dtype), "state_ops.assign_sub(v, (v - value) * decay)". Shadow variables start as the
    variable's initial value (``slot_creator.create_slot(var, var.initialized_value())``):
    trajectory[0]. There is no copy phase: the first update already blends, with decay
    ``min(decay, 2/11)`` when num_updates = 1. Only float variables are accepted ("The
    variables must be half, float, or double").
    """
    f = np.float32 if hyper.get("float32_decay", True) else np.float64
    ema = _copy64(trajectory[0])
    for leaf in _leaves(ema):
        if not _is_float(leaf):
            raise TypeError("The variables must be half, float, or double")
    out = []
    for i, model in enumerate(trajectory[1:]):
        omd = float(f(1.0) - f(tf_decay(i, **hyper)))
        ema = _map(lambda v, x, omd=omd: v - (v - x) * omd, ema, model)
        out.append(ema)
    return out


def _leaves(tree: Tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [np.asarray(tree)]


def praxis_ema(
    trajectory: Sequence[Tree], *, decay: float, float32_decay: bool = True
) -> list[Tree]:
    """praxis ``apply_ema_weights(decay)``: TF's schedule on the weights *before* each step.

    Source: google/praxis ``praxis/optimizers.py`` ``apply_ema_weights`` (commit 01d8ab7;
    a later, fiddle-based copy adds "If it is integer, we directly return the new
    variable"):
    ``init_fn``: "count=jnp.array(0, dtype=jnp.int32), ema=jax.tree_map(jnp.copy, params)";
    ``update_fn``: "ema_decay = jnp.minimum(decay, (1. + state.count) / (10. + state.count))",
    "old_v - (1. - ema_decay) * (old_v - new_v)", then "count_inc = state.count + 1". It is
    the last link of the optax chain, and optax passes it the params before this step's
    update ("this implementation averages the weight before optimization"): its k-th
    update (count = k) sees trajectory[k], and its first one (k = 0, decay 0.1) blends
    trajectory[0] into its own copy, a bitwise no-op. Praxis's EMA therefore lags one step:
    ``out[i]`` here, our call i, is praxis's state after its update k = i + 1 (made during
    optimizer step i + 1), which saw trajectory[i + 1] with count = i + 1, decay ``min(decay,
    (2 + i) / (11 + i))``: TensorFlow's rule with num_updates = i + 1. The decay is float32
    (jnp without x64). Integer leaves take the new value.
    """
    f = np.float32 if float32_decay else np.float64
    ema = _copy64(trajectory[0])
    out = []
    for count, new in enumerate(trajectory):
        d = min(f(decay), (f(1.0) + f(count)) / (f(10.0) + f(count)))
        omd = float(f(1.0) - d)
        ema = _map(lambda o, n, omd=omd: o - omd * (o - n) if _is_float(o) else n, ema, new)
        if count > 0:
            out.append(ema)
    return out


# --- 5. EDM (NVlabs/edm) ----------------------------------------------------------------


def edm_beta(
    i: int,
    *,
    batch_size: int,
    ema_halflife_kimg: float = 500,
    ema_rampup_ratio: float | None = 0.05,
    resume_kimg: float = 0,
) -> float:
    """EDM's ``ema_beta`` at our call ``i``.

    Source: NVlabs/edm ``training/training_loop.py`` (commit 008a4e5), ``training_loop``,
    block "# Update EMA.": "ema_halflife_nimg = ema_halflife_kimg * 1000", "if
    ema_rampup_ratio is not None: ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg *
    ema_rampup_ratio)", "ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))".
    The block runs right after ``optimizer.step()`` and before "cur_nimg += batch_size", so
    at our call i ``cur_nimg = resume_kimg * 1000 + i * batch_size``: the images seen
    *before* this step. With the ramp-up, call 0 has beta 0.5 ** (batch_size / 1e-8) = 0.0,
    a copy.
    """
    cur_nimg = resume_kimg * 1000 + i * batch_size
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def edm_ema(trajectory: Sequence[Tree], **hyper: Any) -> list[Tree]:
    """EDM's EMA update, once per optimizer step.

    Source: NVlabs/edm ``training/training_loop.py``: "ema = copy.deepcopy(net)" (so the
    EMA starts at trajectory[0]) and "p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))"
    over ``zip(ema.parameters(), net.parameters())``: torch lerp from the *net* towards the
    EMA with weight beta. Only parameters are averaged: buffers (and here every non-float
    leaf) keep the values they had when the EMA was copied.
    """
    ema = _copy64(trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        beta = edm_beta(i, **hyper)
        ema = _map(lambda e, m, b=beta: torch_lerp(m, e, b) if _is_float(e) else e, ema, model)
        out.append(ema)
    return out


# --- 6. EDM2 power-function EMA (from the paper's equations) ---------------------------


def sigma_rel_from_gamma(gamma: float) -> float:
    """The paper's relative standard deviation of the profile ``t ** gamma``:
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The largest real root of ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2)``.

    That cubic is ``sigma_rel_from_gamma(g) == s`` with the square root cleared (the
    paper's Algorithm 2; ema-pytorch's ``sigma_rel_to_gamma`` takes ``.real.max()`` over all
    three roots, which are real for sigma_rel in the useful range).
    """
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_function_beta(t: float, dt: float, gamma: float) -> float:
    """Per-update decay ``(1 - dt / t) ** (gamma + 1)``: t samples seen after this update,
    dt samples since the previous one (t_0 = 0, so the first update copies)."""
    return (1.0 - dt / t) ** (gamma + 1.0)


def edm2_power_ema(
    trajectory: Sequence[Tree], *, gamma: float, batch_size: float = 1, update_every: int = 1
) -> list[Tree]:
    """The power-function EMA, updated after every ``update_every``-th optimizer step.

    From the paper's equations (not its code): at our call i the model has seen t = (i + 1)
    * batch_size samples; calls with ``(i + 1) % update_every == 0`` blend
    ``ema = beta * ema + (1 - beta) * theta`` with ``beta = power_function_beta(t, t -
    t_prev, gamma)`` (t_prev: samples at the previous update, 0 at first), the others leave
    the EMA alone. The result is ``sum_j w_j theta_j`` with ``power_function_weights``:
    trajectory[0] gets no weight. Non-float leaves take the new value.
    """
    ema = _copy64(trajectory[0])
    t_prev = 0.0
    out = []
    for i, model in enumerate(trajectory[1:]):
        if (i + 1) % update_every == 0:
            t = (i + 1) * float(batch_size)
            b = power_function_beta(t, t - t_prev, gamma)
            ema = _map(lambda e, m, b=b: b * e + (1.0 - b) * m if _is_float(e) else m, ema, model)
            t_prev = t
        out.append(ema)
    return out


def power_function_weights(times: Sequence[float], gamma: float) -> np.ndarray:
    """Weights of the exact power-function average of parameters sampled at ``times``.

    For updates at sample counts t_1 < ... < t_J, ``w_j`` is proportional to ``t_j **
    (gamma + 1) - t_{j-1} ** (gamma + 1)`` with t_0 = 0 (the profile ``t ** gamma``
    integrated over the interval each sample stands for); normalised to sum to 1, computed
    as differences of ``(t_j / t_J) ** (gamma + 1)``.
    """
    t = np.asarray(times, np.float64)
    scaled = (t / t[-1]) ** (gamma + 1.0)
    return np.diff(np.concatenate([[0.0], scaled]))


def power_function_recursion_error(
    times: Sequence[float], gamma: float, values: np.ndarray
) -> float:
    """Largest gap between the beta recursion and ``power_function_weights`` (a test helper).

    ``values[j]`` is the parameter blended in at ``times[j]`` (leading axis: the updates).
    """
    values = np.asarray(values, np.float64)
    ema = np.zeros_like(values[0])
    t_prev = 0.0
    for t, v in zip(times, values, strict=True):
        b = power_function_beta(float(t), float(t) - t_prev, gamma)
        ema = b * ema + (1.0 - b) * v
        t_prev = float(t)
    closed = np.tensordot(power_function_weights(times, gamma), values, axes=1)
    return float(np.max(np.abs(ema - closed)))


def edm2_profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The inner product of two power-function profiles, as the paper states it.

    EDM2 (Karras et al. 2024), App. C.2: a profile read at time t with exponent gamma is
    ``(gamma + 1) tau**gamma / t**(gamma + 1)`` on (0, t]; two of them integrate to
    ``(g_a + 1)(g_b + 1)(t_a / t_b)**e / ((g_a + g_b + 1) max(t_a, t_b))`` with
    ``e = g_b`` if ``t_a < t_b`` else ``-g_a``. Scalars, one at a time.
    """
    e = gamma_b if t_a < t_b else -gamma_a
    numerator = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** e
    return numerator / ((gamma_a + gamma_b + 1.0) * max(t_a, t_b))


def edm2_posthoc_weights(
    times: Sequence[float], gammas: Sequence[float], target_time: float, target_gamma: float
) -> np.ndarray:
    """EDM2's Algorithm 3, literally: ``A[i][j] = <p_i, p_j>``, ``b[i] = <p_i, p_target>``,
    ``x = solve(A, b)`` (no scaling, a plain LU solve), normalised to sum to 1."""
    n = len(times)
    a = [
        [edm2_profile_dot(times[i], gammas[i], times[j], gammas[j]) for j in range(n)]
        for i in range(n)
    ]
    b = [edm2_profile_dot(times[i], gammas[i], target_time, target_gamma) for i in range(n)]
    x = np.linalg.solve(np.array(a), np.array(b))
    return x / np.sum(x)


# --- 7. Flax nnx.EMA --------------------------------------------------------------------


def _fma_f32(a: np.float32, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``fma(a, b, c)`` in float32, rounded once (float32 inputs, finite results)."""
    p = np.float64(a) * b.astype(np.float64)  # exact: 24 + 24 bits
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # s + err == p + c exactly (TwoSum)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    toward = np.where(s > r64, np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(r, toward)
    tie = (s == (r64 + other.astype(np.float64)) / 2) & (err != 0)
    flip = tie & (np.sign(err) == np.sign(other.astype(np.float64) - r64))
    return np.where(flip, other, r)


def nnx_ema_float32(trajectory: Sequence[Tree], *, decay: float, fused: bool = False) -> list[Tree]:
    """Flax ``nnx.EMA(model, decay).update(model)``, once per step, in float32.

    Source: google/flax ``flax/nnx/training/ema.py`` (flax 0.12.8, as installed): ``update``
    line 138 "ema[...] = self.decay * ema + (1.0 - self.decay) * update". In float32 that is
    ``float32(decay) * ema`` plus ``float32(1.0 - decay) * p`` (``1.0 - decay`` is a Python
    float, rounded once to float32), rounded after each product and after the sum: this
    order is kept here. ``fused=True`` is ``fma(float32(decay), ema, float32(1 - decay) *
    p)``, which is what ``nnx.jit`` produced for the same line on XLA:CPU with jax 0.10.2
    (checked bitwise in the self-check); eager calls are unfused.

    The EMA starts as ``jnp.copy`` of every selected Variable (lines 29-43): ``only=...``
    (the default, line 100) selects every ``nnx.Variable`` (Param, BatchStat, counters,
    RNG state). Integer Variables go through the same float blend and are written back with
    ``.at[...].set`` (``variablelib.Variable.set_value``), which truncates towards zero and
    raises a FutureWarning ("scatter inputs have incompatible types"); RNG keys fail
    ("multiply does not accept dtypes float32, key<fry>"). Float leaves here are cast to
    float32 first.
    """
    d32 = np.float32(decay)
    omd32 = np.float32(1.0 - decay)

    def blend(e: np.ndarray, p: np.ndarray) -> np.ndarray:
        if not _is_float(e):
            value = d32 * e.astype(np.float32) + omd32 * p.astype(np.float32)
            return np.trunc(value).astype(e.dtype)
        p = p.astype(np.float32)
        if fused:
            return _fma_f32(d32, e, omd32 * p)
        return d32 * e + omd32 * p

    ema = _map(lambda x: np.array(x, np.float32 if _is_float(x) else x.dtype), trajectory[0])
    out = []
    for model in trajectory[1:]:
        ema = _map(blend, ema, model)
        out.append(ema)
    return out


# --- 8. optax and Haiku -----------------------------------------------------------------


def optax_incremental_update_ema(trajectory: Sequence[Tree], *, step_size: float) -> list[Tree]:
    """``old = optax.incremental_update(new, old, step_size)`` after each step.

    Source: google-deepmind/optax ``optax/_src/update.py`` (optax 0.2.8, as installed)
    lines 50-76: "step_size * new + (1.0 - step_size) * old". The step size is the user's
    (``1 - decay`` for an EMA); no schedule, no copy. The EMA starts at trajectory[0].
    Every leaf goes through the float expression (optax does not special-case integers).
    """
    ema = _copy64(trajectory[0])
    out = []
    for model in trajectory[1:]:
        ema = _map(lambda old, new: step_size * new + (1.0 - step_size) * old, ema, model)
        out.append(ema)
    return out


def optax_ema_debiased(trajectory: Sequence[Tree], *, decay: float) -> list[Tree]:
    """``optax.ema(decay, debias=True)`` fed the parameters as "updates": its output per call.

    Source: optax 0.2.8 ``optax/transforms/_accumulation.py`` ``ema`` (lines 89-131):
    ``init_fn`` "count=jnp.zeros([], jnp.int32), ema=optax.tree.zeros_like(params)";
    ``update_fn`` "optax.tree.update_moment(updates, state.ema, decay, order=1)", i.e.
    ``(1 - decay) * g + decay * t`` (``optax/tree_utils/_tree_math.py`` lines 394-403),
    "count_inc = numerics.safe_increment(state.count)", then
    "optax.tree.bias_correction(new_ema, decay, count_inc)", i.e. ``t / (1 - decay **
    count_inc)`` (lines 442-452). At our call i, count_inc = i + 1, so call 0 returns
    trajectory[1] and trajectory[0] never gets weight. ``decay ** count_inc`` is computed by
    jnp in its default float dtype (float32 without x64); here in float64.
    """
    hidden = _map(lambda x: np.zeros(x.shape, np.float64), trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        hidden = _map(lambda t, g: (1 - decay) * g + decay * t, hidden, model)
        correction = 1 - decay ** (i + 1)
        out.append(_map(lambda t, c=correction: t / c, hidden))
    return out


def haiku_ema(
    trajectory: Sequence[Tree],
    *,
    decay: float,
    zero_debias: bool = True,
    warmup_length: int = 0,
) -> list[Tree]:
    """``hk.EMAParamsTree(decay, zero_debias, warmup_length)`` applied after each step.

    Source: google-deepmind/dm-haiku ``haiku/_src/moving_averages.py`` (dm-haiku 0.0.17
    wheel): ``EMAParamsTree.__call__`` (lines 198-215) runs one ``ExponentialMovingAverage``
    per leaf, whose ``__call__`` (lines 93-133) reads "counter = hk.get_state('counter', ...,
    init=Constant(-self.warmup_length))", "counter = counter + 1", "hidden =
    hk.get_state('hidden', ..., init=jnp.zeros)", "hidden = hidden * decay + value * (one -
    decay)", "average /= (one - jnp.power(decay, counter))" if zero_debias, and returns
    ``average``. ``init`` keeps the state's initial values (``StatePair`` in
    ``haiku/_src/base.py``), so at our call i (the i-th ``apply`` after ``init``) counter =
    i + 1 - warmup_length: the counter starts at 0 and is 1 at the first update, which
    returns trajectory[1] exactly when debiased. With warmup_length > 0 (which requires
    zero_debias=False) the decay is 0 while counter <= 0 (a copy). Integer leaves: the
    decay is cast to the leaf's dtype (0), so they are copied (as floats, after the
    division).
    """
    if warmup_length < 0:
        raise ValueError(f"`warmup_length` is {warmup_length}, but should be non-negative.")
    if warmup_length and zero_debias:
        raise ValueError("zero_debias and warmup_length cannot be used together (Haiku)")
    hidden = _map(lambda x: np.zeros(x.shape, np.float64), trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        counter = i + 1 - warmup_length
        d = 0.0 if (warmup_length > 0 and counter <= 0) else decay

        def step(h: np.ndarray, v: np.ndarray, d: float = d) -> np.ndarray:
            dd = d if _is_float(v) else 0.0
            return h * dd + v.astype(np.float64) * (1.0 - dd)

        hidden = _map(step, hidden, model)
        if zero_debias:
            average = _map(
                lambda h, v, d=d, c=counter: h / (1.0 - (d if _is_float(v) else 0.0) ** c),
                hidden,
                model,
            )
        else:
            average = hidden
        out.append(average)
    return out


# --- 9. torch.optim.swa_utils -------------------------------------------------------------


def torch_averaged_model_ema(
    trajectory: Sequence[Tree],
    *,
    decay: float = 0.999,
    multi_avg_fn: bool = True,
    use_buffers: bool = False,
) -> list[Tree]:
    """``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))`` (or ``avg_fn=
    get_ema_avg_fn(decay)``), ``update_parameters(model)`` after each step.

    Source: pytorch/pytorch ``torch/optim/swa_utils.py`` (commit 7c5cdb7):
    ``get_ema_multi_avg_fn``: "torch._foreach_lerp_(ema_param_list, current_param_list, 1 -
    decay)" for float tensors, else "p_ema.copy_(p_ema * decay + p_model * (1 - decay))";
    ``get_ema_avg_fn``: "decay * ema_param + (1 - decay) * current_param" (not a lerp);
    ``update_parameters``: "if self.n_averaged == 0: p_averaged.detach().copy_(p_model_)",
    averaging only "if self.n_averaged > 0", then "self.n_averaged += 1". At our call i,
    n_averaged = i before the call: call 0 copies trajectory[1], later calls blend with the
    constant decay. Non-float leaves stand for buffers: with ``use_buffers=False`` they are
    copied from the model every call; with ``use_buffers=True`` they take the float blend
    (computed in float32, torch's default dtype for int * float) truncated by ``copy_``.
    """
    ema = _copy64(trajectory[0])
    out = []
    for n_averaged, model in enumerate(trajectory[1:]):

        def blend(e: np.ndarray, m: np.ndarray, n_averaged: int = n_averaged) -> np.ndarray:
            if not _is_float(e):
                if not use_buffers or n_averaged == 0:
                    return np.array(m, e.dtype)
                value = e.astype(np.float32) * np.float32(decay) + m.astype(np.float32) * (
                    np.float32(1 - decay)
                )
                return np.trunc(value).astype(e.dtype)
            if n_averaged == 0:
                return np.array(m, e.dtype)
            if multi_avg_fn:
                return torch_lerp(e, m, 1 - decay)
            return decay * e + (1 - decay) * m

        ema = _map(blend, ema, model)
        out.append(ema)
    return out


# --- 10. TRL BEMACallback ---------------------------------------------------------------


def trl_bema(
    trajectory: Sequence[Tree],
    *,
    update_freq: int = 400,
    ema_power: float = 0.5,
    bias_power: float = 0.2,
    lag: int = 10,
    update_after: int = 0,
    multiplier: float = 1.0,
    min_ema_multiplier: float = 0.0,
) -> list[Tree]:
    """TRL ``BEMACallback``: its ``running_model`` after each ``on_step_end``.

    Source: huggingface/trl ``trl/trainer/callbacks.py``, class ``BEMACallback`` ("Code
    from https://github.com/abblock/bema under MIT license"; the stored copy read here has
    no line numbers, so the methods are named): ``on_train_begin`` loads the model's
    state_dict into ``running_model`` and sets "theta0 = param.detach().clone()" and
    "self.ema_params.append(theta0.clone())  # initialize EMA with θ₀" for every parameter
    that requires grad; ``_ema_beta``: "beta = (self.lag + self.multiplier * step) **
    (-self.ema_power)", "return max(beta, self.min_ema_multiplier)"; ``_bema_alpha``:
    "(self.lag + self.multiplier * step) ** (-self.bias_power)"; ``_update_bema_weights``:
    "ema.mul_(1 - beta).add_(thetat, alpha=beta)", "run_param.copy_(ema + alpha *
    (thetat - theta0))"; ``on_step_end``: "step = state.global_step", "if step <
    self.update_after: return", "if step == self.update_after:" copy θₜ into theta0 and
    the EMA (the running model is left as it is), "elif (step - self.update_after) %
    self.update_freq == 0: self._update_bema_weights(step)".

    ``on_step_end`` runs after each optimizer step with ``global_step`` already
    incremented, so at our call i, step = i + 1; with update_after = 0 the snapshot
    branch never runs (global_step >= 1) and theta0 is the initial model. Every leaf here
    stands for a trainable parameter; float64 throughout.
    """
    theta0 = _copy64(trajectory[0])
    ema = _copy64(trajectory[0])
    running = _copy64(trajectory[0])
    out = []
    for i, model in enumerate(trajectory[1:]):
        step = i + 1
        if step == update_after:
            theta0 = _copy64(model)
            ema = _copy64(model)
        elif step > update_after and (step - update_after) % update_freq == 0:
            beta = max((lag + multiplier * step) ** (-ema_power), min_ema_multiplier)
            alpha = (lag + multiplier * step) ** (-bias_power)
            ema = _map(lambda e, t, b=beta: e * (1 - b) + b * t, ema, model)
            running = _map(lambda e, t, t0, a=alpha: e + a * (t - t0), ema, model, theta0)
        out.append(running)
    return out


# --- 11. More peers, for docs/migrating.md ----------------------------------------------


def timm_v2_ema(trajectory: Sequence[Tree], *, decay: float = 0.9999) -> list[Tree]:
    """timm ``ModelEmaV2(model, decay).update(model)``, once per optimizer step.

    Source: huggingface/pytorch-image-models ``timm/utils/model_ema.py`` (commit 0a044bf),
    ``ModelEmaV2.update``: "self._update(model, update_fn=lambda e, m: self.decay * e + (1.
    - self.decay) * m)", ``_update``: "ema_v.copy_(update_fn(ema_v, model_v))" over
    ``state_dict()`` in order; the EMA starts as "deepcopy(model)". No step, no copy, no
    warmup: the same blend at every call. Float leaves only here (``copy_`` truncates
    the blend of an integer buffer).
    """
    ema = _copy64(trajectory[0])
    out = []
    for model in trajectory[1:]:
        ema = _map(lambda e, m: decay * e + (1.0 - decay) * m, ema, model)
        out.append(ema)
    return out


def torch_swa(trajectory: Sequence[Tree]) -> list[Tree]:
    """``AveragedModel(model)`` (no ``avg_fn``): SWA's equal average, ``update_parameters``
    after each step.

    Source: pytorch/pytorch ``torch/optim/swa_utils.py``, ``get_swa_multi_avg_fn``:
    "torch._foreach_lerp_(averaged_param_list, current_param_list, 1 / (num_averaged +
    1))" for float tensors; ``update_parameters`` copies at "n_averaged == 0" and uses
    ``get_swa_multi_avg_fn()`` when neither ``avg_fn`` nor ``multi_avg_fn`` is given. At
    our call i, n_averaged = i: the average of trajectory[1..i+1].
    """
    ema = _copy64(trajectory[0])
    out = []
    for n, model in enumerate(trajectory[1:]):
        ema = _map(lambda e, m, n=n: torch_lerp(e, m, 1.0 / (n + 1)), ema, model)
        out.append(ema)
    return out


def lightning_ema(
    trajectory: Sequence[Tree],
    *,
    decay: float = 0.999,
    update_every_n_steps: int = 1,
    update_starting_at_step: int | None = None,
) -> list[Tree]:
    """Lightning ``EMAWeightAveraging(decay, update_every_n_steps, update_starting_at_step)``.

    Source: Lightning-AI/pytorch-lightning ``src/lightning/pytorch/callbacks/
    weight_averaging.py`` (commit 0b35b0a): ``EMAWeightAveraging.__init__`` passes
    "avg_fn=get_ema_avg_fn(decay=decay)" to ``AveragedModel``; ``should_update``: "step_idx
    >= self.update_starting_at_step" (or None) and "step_idx % self.update_every_n_steps
    == 0"; ``WeightAveraging.on_train_batch_end``: "step_idx = trainer.global_step - 1",
    then ``update_parameters``. torch ``get_ema_avg_fn``: "decay * ema_param + (1 - decay)
    * current_param"; ``update_parameters`` copies at its first call (n_averaged == 0). At
    our call i, step_idx = i. The averaged model is a deepcopy of the model at ``setup``
    (trajectory[0]). ``update_starting_at_epoch`` (epoch-end updates) is left out.
    """
    ema = _copy64(trajectory[0])
    n_averaged = 0
    out = []
    for i, model in enumerate(trajectory[1:]):
        start = update_starting_at_step
        if (start is None or i >= start) and i % update_every_n_steps == 0:
            if n_averaged == 0:
                ema = _copy64(model)
            else:
                ema = _map(lambda e, m: decay * e + (1 - decay) * m, ema, model)
            n_averaged += 1
        out.append(ema)
    return out


def keras_ema(
    steps: Sequence[Tree],
    start: Tree,
    *,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
) -> tuple[list[Tree], list[Tree]]:
    """Keras 3 ``optimizer(use_ema=True, ema_momentum, ema_overwrite_frequency)``.

    Returns (the EMA after each step, the model after each step). ``steps[i]`` is the
    optimizer's change to the model at step i (the model may have been overwritten with
    the EMA before it), ``start`` the initial model.

    Source: keras-team/keras ``keras/src/optimizers/base_optimizer.py`` (commit 001750d):
    ``_update_model_variables_moving_average``: "not_first_step =
    ops.not_equal(self.iterations, 0)", "momentum = ops.cast(not_first_step, var.dtype) *
    self.ema_momentum", "average.assign(momentum * average + (1 - momentum) * var)";
    ``_backend_apply_gradients`` calls it after the update step, then, with
    ``ema_overwrite_frequency``, "should_overwrite_model_vars = (self.iterations + 1) %
    self.ema_overwrite_frequency == 0" and ``_overwrite_model_variables_with_average_value``
    (the model's variables become the averages), and only then increments
    ``iterations``. At our call i, iterations = i: call 0 copies the model.
    """
    model = _copy64(start)
    average = _copy64(start)
    averages, models = [], []
    for i, step in enumerate(steps):
        model = _map(lambda v, s: v + s, model, step)
        momentum = (i != 0) * ema_momentum
        average = _map(lambda a, v, m=momentum: m * a + (1 - m) * v, average, model)
        if ema_overwrite_frequency and (i + 1) % ema_overwrite_frequency == 0:
            model = _copy64(average)
        averages.append(average)
        models.append(model)
    return averages, models


def optax_ema_biased(trajectory: Sequence[Tree], *, decay: float) -> list[Tree]:
    """``optax.ema(decay, debias=False)`` fed the parameters: the zero-started EMA.

    Source: as ``optax_ema_debiased`` (optax 0.2.8 ``optax/transforms/_accumulation.py``
    ``ema``), without "optax.tree.bias_correction": the output is ``new_ema`` itself,
    ``(1 - decay) * g + decay * t`` from ``t = 0``.
    """
    hidden = _map(lambda x: np.zeros(x.shape, np.float64), trajectory[0])
    out = []
    for model in trajectory[1:]:
        hidden = _map(lambda t, g: (1 - decay) * g + decay * t, hidden, model)
        out.append(hidden)
    return out
