"""`ema_jax.explain`: one front door, one report type, for a schedule or an EMA."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

import ema_jax
from ema_jax import schedules

PYCLS = dict(ema_alpha=2.5e-4, batch_size=128, max_epoch=100, steps_per_epoch=390)
SUBJECTS = {
    "pycls keywords": lambda: ema_jax.explain(**PYCLS),
    "pycls schedule": lambda: ema_jax.explain(schedules.pycls(**PYCLS)),
    "other schedule": lambda: ema_jax.explain(schedules.constant(0.999), total_steps=1000),
    "ema": lambda: ema_jax.explain(
        ema_jax.ema(schedules.halflife(halflife_samples=1e4, batch_size=8))
    ),
    "several": lambda: ema_jax.explain(
        ema_jax.ema({"fast": schedules.constant(0.9), "slow": schedules.constant(0.999999)})
    ),
}


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
def test_every_answer_is_one_report_type_with_text_and_json(subject):
    report = SUBJECTS[subject]()
    assert isinstance(report, ema_jax.Report)
    assert json.loads(report.to_json()) == report.to_dict()
    assert str(report).startswith(("EMA of weights:", "== average"))
    assert isinstance(report.warnings, tuple)


def test_the_old_report_classes_are_reports():
    assert isinstance(ema_jax.explain(**PYCLS), ema_jax.EmaReport)
    assert isinstance(ema_jax.explain(schedules.constant(0.9)), ema_jax.ScheduleReport)
    assert issubclass(ema_jax.EmaReport, ema_jax.Report)
    assert issubclass(ema_jax.ScheduleReport, ema_jax.Report)


def test_an_ema_is_explained_as_its_schedule_in_its_dtype():
    schedule = schedules.pycls(**PYCLS)
    ema = ema_jax.ema(schedule, ema_dtype=jnp.bfloat16)
    assert ema_jax.explain(ema) == ema_jax.explain(schedule, dtype="bfloat16")
    assert ema.explain() == ema_jax.explain(ema)
    assert ema_jax.explain(ema, dtype="float32").dtype == "float32"
    assert ema_jax.explain(ema_jax.ema(schedule)).dtype == "float32"


def test_several_averages_give_one_report_of_one_per_average():
    slow = schedules.constant(0.999999)
    ema = ema_jax.ema({"fast": schedules.constant(0.9), "slow": slow})
    report = ema.explain(total_steps=1000)
    assert isinstance(report, ema_jax.AveragesReport)
    alone = ema_jax.explain(slow, total_steps=1000)
    assert report["slow"] == report[1] == report.averages[1] == alone
    first, second = report  # what the former tuple gave
    assert first == report["fast"] and second == alone and len(report) == 2
    assert report.warnings == tuple(f"[slow] {w}" for w in alone.warnings) and report.warnings
    data = report.to_dict()
    assert data["names"] == ["fast", "slow"] and data["averages"][1] == alone.to_dict()
    assert "== average fast ==" in str(report) and "== average slow ==" in str(report)
    unnamed = ema_jax.ema((schedules.constant(0.9), slow)).explain()
    assert unnamed.labels == ("0", "1") and unnamed.to_dict()["names"] is None
    with pytest.raises(KeyError, match="which must be one of the names"):
        report["medium"]


@pytest.mark.bad_input
def test_explain_refuses_what_it_cannot_explain():
    with pytest.raises(TypeError, match=r"explain takes a schedule from ema_jax\.schedules or an"):
        ema_jax.explain(0.999)
    with pytest.raises(TypeError, match="pass one or the other"):
        ema_jax.explain(schedules.constant(0.9), ema_alpha=1e-5)
    with pytest.raises(ValueError, match="dataset_size=10 applies to pycls schedules only"):
        ema_jax.explain(ema_jax.ema(schedules.constant(0.9)), dataset_size=10)
