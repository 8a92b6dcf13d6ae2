"""Training metrics on disk: metrics.jsonl, TensorBoard scalars and the training-curve PNG.

Rows of metrics.jsonl are `{"step": int, "kind": "train" | "eval", <scalar name>: float, ...}`;
TensorBoard gets the same scalars as `{kind}/{name}`. Only process 0 writes (`enabled`). A
resumed run first drops what was logged after its checkpoint (`resume_at`).
"""
import json
import os
import socket
import time
from typing import Mapping


class MetricWriter:
  """metrics.jsonl, TensorBoard scalars and the training-curve PNG (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.plot_path = os.path.join(workdir, "training_curves.png")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self._events = None
    if enabled:
      # TensorBoard's own record writer on a plain file (EventFileWriter would import TensorFlow).
      from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(self.tensorboard_dir, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
      path, again = os.path.join(self.tensorboard_dir, name), 0
      while os.path.exists(path):  # a second writer in this process within the second.
        again += 1
        path = os.path.join(self.tensorboard_dir, f"{name}.{again}")
      self._events = RecordWriter(open(path, "xb"))
      self._add_event(file_version="brain.Event:2")

  def _add_event(self, **fields) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._events.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self._events.flush()

  def write(self, step: int, kind: str, scalars: Mapping[str, float]) -> None:
    """Appends one row to metrics.jsonl and the scalars `{kind}/{name}` to TensorBoard."""
    if not self.enabled:
      return
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    row = {"step": int(step), "kind": kind}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    values = [summary_pb2.Summary.Value(tag=f"{kind}/{k}", simple_value=float(v))
              for k, v in scalars.items()]
    self._add_event(step=int(step), summary=summary_pb2.Summary(value=values))

  def resume_at(self, step: int) -> None:
    """A run resumed from its checkpoint at `step` redoes the steps after it: drops their rows
    from metrics.jsonl (rewritten whole, then renamed over the old file) and tells TensorBoard to
    purge them (a SessionLog START event at step + 1), so no step is listed twice."""
    if not self.enabled:
      return
    rows = self.rows()
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) != len(rows):
      partial = self.jsonl_path + ".tmp"
      with open(partial, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(partial, self.jsonl_path)
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._add_event(step=int(step) + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def rows(self) -> list[dict]:
    """The rows of metrics.jsonl, oldest first ([] before the first write, or if not enabled)."""
    if not self.enabled or not os.path.exists(self.jsonl_path):
      return []
    with open(self.jsonl_path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def plot(self) -> None:
    """Redraws training_curves.png from metrics.jsonl."""
    rows = self.rows()
    if not rows:
      return
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    # (A file from before `resume_at` may repeat steps: the last row of a step wins.)
    train = sorted({r["step"]: r for r in rows if r["kind"] == "train"}.values(),
                   key=lambda r: r["step"])
    evals = sorted({r["step"]: r for r in rows if r["kind"] == "eval"}.values(),
                   key=lambda r: r["step"])
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
      ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="total (weighted)")
      for term in ("loss_ce", "loss_bbox", "loss_giou"):
        ax_loss.plot([r["step"] for r in train], [r[term] for r in train], label=term, lw=0.8)
      ax_loss.set_yscale("log")
      ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    if evals:
      for name in ("AP", "AP50"):
        ax_ap.plot([r["step"] for r in evals], [r[name] for r in evals], "o-", label=name)
      ax_ap.legend(fontsize=8)
    ax_ap.set(xlabel="step", ylabel="COCO bbox", title="evaluation", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(self.plot_path, dpi=100)
    plt.close(fig)

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
