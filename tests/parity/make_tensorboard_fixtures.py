"""TensorBoard's own reading of an event file that `runtime train --report_to tensorboard` wrote,
for the Rust test that checks the runtime's event files (tests/tuning.rs).

Runs a short training of the addition example with the runtime built by
`cargo build --release`, copies its event file to tests/fixtures/tensorboard/, then reads it with
the `tensorboard` package: every record through TensorBoard's CRC-checking record reader
(`EventFileLoader`), the scalars and texts through `EventAccumulator` (the legacy reader) and
through `plugin_event_accumulator.EventAccumulator` (what the TensorBoard server uses, which
migrates `simple_value` scalars to tensors). Both readings must agree; the result is written to
tests/fixtures/tensorboard/reading.json. Needs only `pip install tensorboard`. Re-run from the
repository root:

    python tests/parity/make_tensorboard_fixtures.py
"""

import glob
import json
import shutil
import subprocess
from pathlib import Path

import tensorboard
from tensorboard.backend.event_processing import event_accumulator, event_file_loader, plugin_event_accumulator
from tensorboard.util import tensor_util

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "fixtures" / "tensorboard"
RUN = "target/tensorboard-fixture"
# the same settings are in tests/tuning.rs
SETTINGS = [
    "--max_steps", "20", "--logging_steps", "5", "--logging_first_step", "true", "--eval_steps", "10",
    "--save_strategy", "no", "--load_best_model_at_end", "false", "--report_to", "tensorboard",
    "--disable_tqdm", "true",
]


def text_of(tensor_proto):
    return tensor_util.make_ndarray(tensor_proto).reshape(-1)[0].decode("utf-8")


if __name__ == "__main__":
    shutil.rmtree(ROOT / RUN, ignore_errors=True)
    cmd = ["target/release/runtime", "train", "--config", "examples/addition/train.toml", *SETTINGS,
           "--output_dir", RUN, "--logging_dir", f"{RUN}/tb"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (written,) = glob.glob(str(ROOT / RUN / "tb" / "events.out.tfevents.*"))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "events.out.tfevents.runtime"
    shutil.copy(written, path)

    # every record, CRCs checked by TensorBoard's reader
    records = list(event_file_loader.RawEventFileLoader(str(path)).Load())
    events = list(event_file_loader.LegacyEventFileLoader(str(path)).Load())
    assert len(records) == len(events)

    legacy = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    legacy.Reload()
    scalars = {t: [[e.step, e.value] for e in legacy.Scalars(t)] for t in legacy.Tags()["scalars"]}
    texts = {t: [[e.step, text_of(e.tensor_proto)] for e in legacy.Tensors(t)] for t in legacy.Tags()["tensors"]}

    server = plugin_event_accumulator.EventAccumulator(str(path), size_guidance={plugin_event_accumulator.TENSORS: 0})
    server.Reload()
    by_plugin = server.PluginTagToContent("scalars")
    served = {t: [[e.step, float(tensor_util.make_ndarray(e.tensor_proto))] for e in server.Tensors(t)] for t in by_plugin}
    assert served == scalars, "the server's reading differs from the legacy reading"
    served_texts = {t: [[e.step, text_of(e.tensor_proto)] for e in server.Tensors(t)] for t in server.PluginTagToContent("text")}
    assert served_texts == texts, "the server's texts differ from the legacy reading"

    reading = {
        "tensorboard": tensorboard.__version__,
        "settings": SETTINGS,
        "records": len(records),
        "file_version": events[0].file_version,
        "scalars": scalars,
        "texts": texts,
    }
    (OUT / "reading.json").write_text(json.dumps(reading, indent=1, sort_keys=True) + "\n")
    print(f"{len(records)} records, {len(scalars)} scalar tags, {len(texts)} text tags -> {OUT}")
