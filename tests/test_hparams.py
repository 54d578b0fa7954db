"""TensorBoard's HPARAMS tab for a real local sweep, read with TensorBoard's own reader: each run folder is a
session holding its swept and fixed settings and its results (its curves in `tb/` below it), and the hparams
plugin's backend builds the experiment from them (optim.lr differing, the results and curves as metrics)."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context, metadata
from tensorboard.util import tensor_util

from sweep_runs import local_sweep  # noqa: F401 - the session's sweep fixture

pytestmark = pytest.mark.slow  # the sweep trains and tests two runs (about 20 s)


def _multiplexer(logdir):
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return mux


def _last_value(mux, run: str, tag: str) -> float:
    return float(tensor_util.make_ndarray(mux.Tensors(run, tag)[-1].tensor_proto).item())


def test_each_run_is_a_session_with_its_settings_and_results(local_sweep):
    mux = _multiplexer(local_sweep.scratch / "sweep")
    sessions = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    assert sorted(sessions) == [p.name for p in local_sweep.runs]  # a session per run, named by its run id
    lrs = set()
    for run_id, tags in sessions.items():
        start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        hparams = {k: v.number_value if v.HasField("number_value") else v.string_value
                   for k, v in start.hparams.items()}
        lrs.add(hparams["optim.lr"])
        assert hparams["train.batch_size"] == 2 and hparams["gpus"] == 0 and hparams["train.precision"] == "fp32"
        run = run_id
        assert "loss/train" in mux.GetAccumulator(f"{run}/tb").Tags()["tensors"]  # its curves, below the session
        progress = (local_sweep.scratch / "sweep" / run_id / "progress.json").read_text()
        assert _last_value(mux, run, "results/best_val_dice_mean") == pytest.approx(json.loads(progress)["best_dice"])
        summary = json.loads((local_sweep.scratch / "sweep" / run_id / "test" / "test_data" / "summary.json")
                             .read_text())
        assert _last_value(mux, run, "results/test_dice_mean") == pytest.approx(summary["mean_dice"])
        assert _last_value(mux, run, "results/test_dice_csf") == pytest.approx(summary["dice_per_class"]["csf"])
        assert _last_value(mux, run, "results/epochs") == 3
        assert _last_value(mux, run, "results/wall_time_s") > 0
    assert lrs == {1e-3, 3e-3}


def test_the_hparams_plugin_builds_the_sweep_from_the_sessions(local_sweep):
    """What the HPARAMS tab lists: the settings (optim.lr differing, batch the same) and the results as metrics."""
    logdir = local_sweep.scratch / "sweep"
    mux = _multiplexer(logdir)
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                               data_provider=MultiplexerDataProvider(mux, str(logdir)))
    context = backend_context.Context(tb)
    ctx = RequestContext()
    experiment = context.experiment_from_metadata(ctx, "", True, context.hparams_metadata(ctx, ""),
                                                  context.hparams_from_data_provider(ctx, "", None))
    infos = {h.name: h for h in experiment.hparam_infos}
    assert infos["optim.lr"].differs and not infos["train.batch_size"].differs
    assert (infos["optim.lr"].domain_interval.min_value, infos["optim.lr"].domain_interval.max_value) == (1e-3, 3e-3)
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert {("", "results/best_val_dice_mean"), ("", "results/test_dice_mean"), ("tb", "dice/mean"),
            ("tb", "loss/train")} <= metrics


def test_a_collected_folder_shows_the_same_sessions(local_sweep, tmp_path):
    from click.testing import CliRunner

    from hpcseg.cli import main

    dest = tmp_path / "collected"
    result = CliRunner().invoke(main, ["collect", "sweep", "--dest", str(dest)],
                                env={"HPCSEG_SCRATCH": str(local_sweep.scratch)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mux = _multiplexer(dest)
    content = mux.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    assert sorted(content) == [p.name for p in local_sweep.runs]
    for run in content:
        assert "loss/train" in mux.GetAccumulator(f"{run}/tb").Tags()["tensors"]
        assert _last_value(mux, run, "results/epochs") == 3
