"""Token accuracy, written in Python and built with componentize-py from the same WIT as the
Rust plugins (plugin-sdk/wit/0.1.0). It declares only the metrics hook; the other interfaces of
the world are exported with the SDK's defaults spelled out, and the runtime never calls them.

    componentize-py -d ../../plugin-sdk/wit/0.1.0 -w plugin componentize app -o python_token_accuracy.wasm
"""
from typing import List

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import callbacks, loss, loss_logits, metrics, padding
from wit_world.imports import host, types

IGNORE_INDEX = -100


class Info(exports.Info):
    def describe(self) -> types.PluginInfo:
        return types.PluginInfo(name="python-token-accuracy", version="0.1.0", hooks=[types.Hook.METRICS])


_state = {"correct": 0, "total": 0}


class Metrics(exports.Metrics):
    def reset(self) -> None:
        _state["correct"], _state["total"] = 0, 0

    def update(self, batch: metrics.EvalBatch) -> None:
        if batch.kind != metrics.PredictionKind.ARGMAX:
            raise Err("python-token-accuracy scores argmax predictions")
        for label, pred in zip(batch.labels, batch.predictions):
            if label != IGNORE_INDEX:
                _state["total"] += 1
                _state["correct"] += int(label == pred)

    def compute(self) -> List[types.Metric]:
        if _state["total"] == 0:
            raise Err("no labelled tokens were evaluated")
        host.log(types.LogLevel.DEBUG, f"{_state['correct']} of {_state['total']} tokens right")
        return [types.Metric(name="py_accuracy", value=_state["correct"] / _state["total"])]


# Hooks this plugin does not declare: the world exports them, the runtime never calls them.
class Loss(exports.Loss):
    def requested_statistics(self) -> loss.Statistics:
        return loss.Statistics.LABEL_LOGPROB

    def compute_loss(self, batch: loss.TokenBatch) -> loss.LossOutput:
        raise Err("not implemented")


class LossLogits(exports.LossLogits):
    def compute_chunk(self, chunk: loss_logits.LogitsChunk) -> loss_logits.ChunkOutput:
        raise Err("not implemented")


class Padding(exports.Padding):
    def pad(self, examples: List[padding.Example], options: padding.PadOptions) -> padding.Padded:
        raise Err("not implemented")


class Callbacks(exports.Callbacks):
    def on_event(self, event: callbacks.Event, state: callbacks.TrainerState, control: callbacks.TrainerControl) -> callbacks.Response:
        return callbacks.Response(control=control, logs=[])

    def save_state(self) -> bytes:
        return b""

    def load_state(self, state: bytes) -> None:
        pass
